"""Activation checkpointing per layer: each layer call of the root graph recomputes its activations in backward."""

from __future__ import annotations

import torch
import torch.fx
import torch.utils.checkpoint
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.passes._graphs import checkpointed_call, layer_calls

__all__ = ["checkpoint_layers", "checkpointed_call"]


def checkpoint_layers(gm: torch.fx.GraphModule, *, enabled: bool) -> PassResult:
    """Route every layer call of the root graph through `checkpointed_call`, or back to ``call_module`` (in place).

    The call node keeps its name, so turning checkpointing off gives the plain graph's code back exactly. Before,
    with ``enabled=True``::

        model_layers_0 = call_module[model.layers.0](hidden, cos, sin)

    after::

        model_layers_0_1 = get_attr[model.layers.0]
        model_layers_0 = call_function[checkpointed_call](model_layers_0_1, hidden, cos, sin)
    """
    modified = False
    graph = gm.graph
    for node, path in layer_calls(gm):
        if enabled and node.op == "call_module":
            with graph.inserting_before(node):
                layer = graph.get_attr(path)
            node.op, node.target, node.args = "call_function", checkpointed_call, (layer, *node.args)
            modified = True
        elif not enabled and node.op == "call_function":
            layer = node.args[0]
            node.op, node.target, node.args = "call_module", path, tuple(node.args[1:])
            graph.erase_node(layer)
            modified = True
    return PassResult(gm, modified)
