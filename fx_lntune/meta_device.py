"""A clear error, instead of torch's, when a graph whose weights are still on the meta device gets real inputs."""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.fx

from fx_lntune.errors import LNTuneStateError

__all__ = ["guard_meta_weights"]


def guard_meta_weights(gm: torch.fx.GraphModule) -> None:
    """Make ``gm`` refuse real inputs while any of its weights is on the meta device (in place).

    Capturing a model built on ``torch.device("meta")`` is cheap and supported; running the graph needs real
    weights first (``gm.to_empty(device=...)`` and ``load_state_dict``). Meta inputs stay allowed: that is
    torch's shape inference. The check is a forward pre-hook registered only on a graph that has meta weights at
    capture; it removes itself at the first call that finds none, so a materialised graph pays nothing. It is
    registered again on every ``copy.deepcopy`` of ``gm`` (torch.fx's deepcopy hooks).
    """
    if not _has_meta(gm):
        return
    guard = _MetaGuard()
    guard.handle = gm.register_forward_pre_hook(guard, with_kwargs=True)
    if guard_meta_weights not in gm._deepcopy_hooks:
        gm._deepcopy_hooks.append(guard_meta_weights)


class _MetaGuard:
    handle: torch.utils.hooks.RemovableHandle | None = None

    def __call__(self, gm: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if not _has_meta(gm):
            self.handle.remove()
            return
        real = [
            name
            for name, value in [*enumerate(args), *kwargs.items()]
            if isinstance(value, torch.Tensor) and not value.is_meta
        ]
        if real:
            meta = next(name for name, tensor in [*gm.named_parameters(), *gm.named_buffers()] if tensor.is_meta)
            raise LNTuneStateError(
                f"this graph's weights are on the meta device (e.g. {meta!r}: it was captured from a model built "
                f"on torch.device('meta')), so it cannot run on the real inputs {real}. Materialise it first: "
                "gm.to_empty(device='cpu') (or 'cuda'), then gm.load_state_dict(real_weights)."
            )


def _has_meta(module: torch.nn.Module) -> bool:
    return any(tensor.is_meta for tensor in itertools.chain(module.parameters(), module.buffers()))
