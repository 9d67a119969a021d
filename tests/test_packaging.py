"""Packaging: a regular (non-editable) install holds the whole library under `fx_lntune`, passes included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    # --no-build-isolation: the venv's own setuptools builds it, so the test needs no download.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    return target


def test_install_ships_passes_inside_the_package_and_nothing_at_top_level(installed):
    top_level = sorted(p.name for p in installed.iterdir() if not p.name.endswith((".dist-info", "__pycache__")))
    assert top_level == ["bin", "fx_lntune"] or top_level == ["fx_lntune"], top_level
    assert (installed / "fx_lntune" / "passes" / "inject.py").is_file()
    assert (installed / "fx_lntune" / "capture" / "export.py").is_file()


def test_installed_package_imports_without_the_repository(installed, tmp_path):
    code = (
        "import json, fx_lntune, fx_lntune.passes as p, fx_lntune.capture as c;"
        "print(json.dumps([fx_lntune.__file__, p.__file__, c.__file__, p.inject_adapters.__module__]))"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    command = [sys.executable, "-c", code]
    out = subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    init, passes_init, capture_init, module = json.loads(out.stdout.strip().splitlines()[-1])
    for path in (init, passes_init, capture_init):
        assert Path(path).is_relative_to(installed), path
    assert module == "fx_lntune.passes.inject"
