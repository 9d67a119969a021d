"""Submodule surgery by qualified path, shared by the capture builder and the passes."""

from __future__ import annotations

import torch.nn as nn

__all__ = ["ensure_module", "set_submodule"]


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> nn.Module | None:
    """Put ``module`` at ``path`` under ``root`` (in place), creating empty parents where none exist.

    Returns the module that was there before, or ``None``.
    """
    parent_path, _, name = path.rpartition(".")
    parent = ensure_module(root, parent_path)
    previous = parent._modules.get(name)
    parent.add_module(name, module)
    return previous


def ensure_module(root: nn.Module, path: str) -> nn.Module:
    """The submodule of ``root`` at ``path`` (``root`` for ``""``), creating empty ``nn.Module`` parents where none
    exist (in place)."""
    module = root
    for part in path.split(".") if path else ():
        child = module._modules.get(part)
        if child is None:
            child = nn.Module()
            module.add_module(part, child)
        module = child
    return module
