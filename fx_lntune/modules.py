"""Submodule surgery by qualified path, shared by the capture builder and the passes."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["set_submodule"]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> nn.Module | None:
    """Put ``module`` at ``path`` under ``root`` (in place), creating empty parents where none exist.

    Returns the module that was there before, or ``None``.
    """
    parent_path, _, name = path.rpartition(".")
    parent = root
    for part in parent_path.split(".") if parent_path else ():
        child = parent._modules.get(part)
        if child is None:
            child = nn.Module()
            parent.add_module(part, child)
        parent = child
    previous = parent._modules.get(name)
    parent.add_module(name, module)
    return previous
