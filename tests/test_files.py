"""`files.staged_files`: the files of a write appear together or not at all, and nothing temporary is left."""

from __future__ import annotations

import os

import pytest

from fx_lntune.files import staged_files, write_atomic


def _contents(directory):
    """Every entry of ``directory``: a file's bytes, or None for a directory (a staging directory left behind)."""
    return {path.name: path.read_bytes() if path.is_file() else None for path in directory.iterdir()}


def test_the_new_files_replace_the_old_ones_and_nothing_else_is_left(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "keep").write_bytes(b"keep")
    with staged_files(tmp_path, last="a") as staging:
        (staging / "a").write_bytes(b"new a")
        (staging / "b").write_bytes(b"new b")
        files = {name: data for name, data in _contents(tmp_path).items() if data is not None}
        assert files == {"a": b"old a", "keep": b"keep"}  # nothing new is visible before the block ends
    assert _contents(tmp_path) == {"a": b"new a", "b": b"new b", "keep": b"keep"}


def test_a_failing_block_changes_nothing(tmp_path):
    (tmp_path / "a").write_bytes(b"old a")
    with pytest.raises(RuntimeError, match="writer failed"), staged_files(tmp_path) as staging:
        (staging / "a").write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert _contents(tmp_path) == {"a": b"old a"}


def test_a_failing_rename_puts_back_the_files_already_replaced(tmp_path, monkeypatch):
    (tmp_path / "a").write_bytes(b"old a")
    real_replace = os.replace

    def replace(source, target):
        if str(target).endswith("/b"):
            raise OSError("disk full")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk full"), staged_files(tmp_path, last="b") as staging:
        (staging / "a").write_bytes(b"new a")
        (staging / "b").write_bytes(b"new b")
    assert _contents(tmp_path) == {"a": b"old a"}


def test_write_atomic_writes_the_whole_file(tmp_path):
    write_atomic(tmp_path / "x.svg", b"<svg/>")
    write_atomic(tmp_path / "x.svg", b"<svg></svg>")
    assert _contents(tmp_path) == {"x.svg": b"<svg></svg>"}
