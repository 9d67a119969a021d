"""File writing shared by the modules that write files: a whole file or nothing."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["write_atomic", "file_in_the_way"]


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file beside it and one rename: a reader sees the old file or
    the whole new one, and a failure leaves no temporary file behind."""
    # Beside the target (same file system, so the rename is atomic); opened as a normal file, so the umask applies.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temporary, "xb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


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
