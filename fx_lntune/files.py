"""File writing shared by the modules that write files: a whole file or nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["staged_files", "write_atomic", "file_in_the_way"]


@contextlib.contextmanager
def staged_files(directory: Path, last: str | None = None) -> Iterator[Path]:
    """An empty directory to write files into; when the block succeeds, each of its files replaces the file of the
    same name in ``directory`` by one rename (``last`` renamed last), so a reader sees every old file or the whole
    new one. If the block or a rename fails, the files already replaced are put back, and nothing temporary is left.

    The staging directory sits in ``directory`` (same file system, so renames are atomic); files written in it are
    plain files, so the umask applies.
    """
    staging = Path(tempfile.mkdtemp(prefix=".staging.", dir=directory))
    backups = Path(tempfile.mkdtemp(prefix=".backup.", dir=directory))
    replaced: list[str] = []
    try:
        yield staging
        files = sorted(staging.iterdir(), key=lambda file: file.name == last)
        for file in files:
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
        for file in files:
            target = directory / file.name
            if target.exists():
                _keep_copy(target, backups / file.name)
            os.replace(file, target)
            replaced.append(file.name)
    except BaseException:
        for name in reversed(replaced):
            if (backups / name).exists():
                os.replace(backups / name, directory / name)
            else:
                (directory / name).unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(backups, ignore_errors=True)


def _keep_copy(source: Path, backup: Path) -> None:
    # A hard link keeps the old file in place (readers never see it missing) at no cost.
    try:
        os.link(source, backup)
    except OSError:
        shutil.copy2(source, backup)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` at once (`staged_files`): a reader sees the old file or the whole new one."""
    with staged_files(path.parent) as staging:
        (staging / path.name).write_bytes(data)


def file_in_the_way(path: str | os.PathLike) -> Path | None:
    """The existing file (not a directory) among the parents of ``path``, where a directory would have to be for
    ``path`` to be written; ``None`` when there is none. E.g. ``config.json/out`` -> ``config.json``.

    Writers check it first, so that a path under a file is refused with our error naming that file, not with a raw
    ``NotADirectoryError`` after some directories were made."""
    for parent in Path(path).parents:
        if parent.is_dir():
            return None
        if parent.exists():
            return parent
    return None
