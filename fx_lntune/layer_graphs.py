"""The model's layers as submodules of a tuned graph: listing them, checkpointing them.

Capture splits the flat graph so that each layer of the model is a ``torch.fx.GraphModule`` at its own path that
the root graph calls (`passes.split_layers`). FSDP2 can then shard per layer (``fully_shard(layer)`` for each of
`layer_modules`), and `gradient_checkpointing` can recompute each layer's activations in backward.
"""

from __future__ import annotations

import torch
import torch.fx

from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.checkpoint_layers import checkpoint_layers
from fx_lntune.passes.chunk_loss import chunk_loss
from fx_lntune.passes.split_layers import layer_calls
from fx_lntune.state import get_state

__all__ = ["layer_modules", "gradient_checkpointing", "chunked_loss"]

_CHECKPOINTING = "gradient_checkpointing"
_CHUNKED_LOSS = "chunked_loss"


def layer_modules(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    """The layer submodules of ``gm`` in the order the root graph calls them (empty for a graph without any).

    Works on tuned graphs and on the plain graphs `merge_and_unload` returns. For per-layer FSDP2::

        for layer in fl.layer_modules(gm):
            fully_shard(layer)
        fully_shard(gm)
    """
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"layer_modules needs a torch.fx.GraphModule, got {type(gm).__name__}.")
    modules: list[torch.fx.GraphModule] = []
    for _, path in layer_calls(gm):
        layer = gm.get_submodule(path)
        if all(layer is not seen for seen in modules):
            modules.append(layer)
    return modules


def gradient_checkpointing(gm: torch.fx.GraphModule, enabled: bool = True) -> None:
    """Recompute each layer's activations in backward instead of keeping them (in place; ``enabled=False`` undoes it).

    Every layer call of the root graph runs under ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``,
    as Hugging Face's ``model.gradient_checkpointing_enable()`` does per decoder layer: gradients are the same, and
    only each layer's inputs stay alive between forward and backward. Turning it off gives the plain graph back,
    code and outputs. The setting is kept in the graph's state and survives ``copy.deepcopy`` and pickling.
    """
    state = get_state(gm)
    run_pass(checkpoint_layers, gm, enabled=bool(enabled))
    state.extra[_CHECKPOINTING] = bool(enabled)


def chunked_loss(gm: torch.fx.GraphModule, enabled: bool = True) -> None:
    """Compute the causal / masked LM loss from the head's input chunk by chunk (in place; ``enabled=False`` undoes
    it): in training mode with ``labels`` the output carries ``loss`` and no ``logits``, and the whole
    ``batch x seq x vocab`` logits tensor is never materialized; in eval mode or without labels the output is as
    before. Heads other than a plain (frozen) linear, optionally plus a bias tensor, are left as they are.
    """
    state = get_state(gm)
    run_pass(chunk_loss, gm, enabled=bool(enabled))
    state.extra[_CHUNKED_LOSS] = bool(enabled)
