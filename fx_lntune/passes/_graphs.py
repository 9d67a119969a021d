"""Graph helpers under every pass: walking a graph's GraphModules (the root and its layer graphs), the module calls
inside them, and the root graph's layer calls (plain or checkpointed). Imports nothing of ours, so any pass,
capture step or verb can use it.
"""

from __future__ import annotations

import torch
import torch.fx
import torch.utils.checkpoint

__all__ = ["checkpointed_call", "graph_modules", "layer_calls", "leaf_calls", "submodule_or_none"]


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


@torch.fx.wrap
def checkpointed_call(layer: torch.nn.Module, *args):
    """``layer(*args)`` under non-reentrant `torch.utils.checkpoint`: only the inputs are kept for backward.

    A function of its own (wrapped for torch.fx), so that a pickled graph, which torch.fx re-traces on load,
    keeps the call as one node instead of tracing into the checkpoint machinery.
    """
    return torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False)


def layer_calls(gm: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, str]]:
    """The root graph's calls of layer modules (plain or checkpointed), with each layer's path, in call order."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            path = str(node.target)
        elif node.op == "call_function" and node.target is checkpointed_call and node.args[0].op == "get_attr":
            path = str(node.args[0].target)
        else:
            continue
        if isinstance(submodule_or_none(gm, path), torch.fx.GraphModule):
            found.append((node, path))
    return found


def submodule_or_none(gm: torch.nn.Module, path: str) -> torch.nn.Module | None:
    """The submodule of ``gm`` at ``path``, or ``None`` where there is none."""
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None
