"""The model's repeated layers as submodules of a tuned graph: finding them, listing them, checkpointing them.

Capture splits the flat graph so that each layer of the model (``model.layers.i``, ``encoder.layer.i``, ``h.i``,
...) is a ``torch.fx.GraphModule`` at its own path that the root graph calls (`passes.split_layers`). FSDP2 can
then shard per layer (``fully_shard(layer)`` for each of `layer_modules`), and `gradient_checkpointing` can
recompute each layer's activations in backward.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.checkpoint_layers import checkpoint_layers
from fx_lntune.passes.split_layers import layer_calls
from fx_lntune.state import get_state

__all__ = ["find_layers", "layer_modules", "gradient_checkpointing", "graph_modules", "leaf_calls"]

_CHECKPOINTING = "gradient_checkpointing"


def find_layers(model: nn.Module) -> list[str]:
    """The paths of ``model``'s layers: the elements of every ``nn.ModuleList`` whose elements are all of one class
    (``model.layers.0``, ...), in module order. Found by structure, for any architecture; ``model`` is unchanged.

    Which of them become submodules is decided on the graph (`passes.split_layers`): a layer called more than
    once (albert shares one layer across depth) stays in the root graph.
    """
    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(child) for child in module}) == 1:
            found.extend(f"{path}.{name}" if path else name for name in module._modules)
    return found


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


def graph_modules(gm: torch.fx.GraphModule) -> list[tuple[str, torch.fx.GraphModule]]:
    """``gm`` and every GraphModule inside it (its layers), with their paths (``""`` for ``gm``), in module order."""
    return [(path, module) for path, module in gm.named_modules() if isinstance(module, torch.fx.GraphModule)]


def leaf_calls(gm: torch.fx.GraphModule) -> dict[str, list[torch.fx.Node]]:
    """Every ``call_module`` node of ``gm`` and of its layer graphs, by the called module's full path (not the
    layer calls themselves): where a layer's graph calls ``input_layernorm``, the path is
    ``model.layers.0.input_layernorm``."""
    calls: dict[str, list[torch.fx.Node]] = {}
    for prefix, module in graph_modules(gm):
        for node in module.graph.nodes:
            if node.op != "call_module":
                continue
            path = f"{prefix}.{node.target}" if prefix else str(node.target)
            if not isinstance(gm.get_submodule(path), torch.fx.GraphModule):
                calls.setdefault(path, []).append(node)
    return calls
