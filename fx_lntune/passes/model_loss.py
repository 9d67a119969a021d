"""Add the model's own loss to a captured graph: with ``labels`` the output carries ``loss`` first, as in HF."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune import graph_inputs

__all__ = ["add_model_loss"]


def add_model_loss(gm: torch.fx.GraphModule, loss_type: str, **constants: Any) -> PassResult:
    """Compute transformers' ``LOSS_MAPPING[loss_type]`` from the output's ``logits`` and the ``labels``
    placeholder (`passes.keyword_inputs` adds it) and put it first in the output object (in place). Without
    labels the loss node gives ``None`` and the output is what it was. Before::

        model_output = model_output('...:CausalLMOutputWithPast', logits=linear_7)

    after::

        model_loss = model_loss(linear_7, labels, 'ForCausalLM', vocab_size=100)
        model_output = model_output('...:CausalLMOutputWithPast', loss=model_loss, logits=linear_7)

    ``constants`` are the loss's own arguments (``vocab_size``; ``num_labels`` and ``problem_type``).
    """
    graph_inputs.resolve("transformers.loss.loss_utils:LOSS_MAPPING")
    graph = gm.graph
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    labels = next(node for node in graph.nodes if node.op == "placeholder" and node.target == "labels")
    root = output.args[0]
    if isinstance(root, torch.fx.Node) and root.target is graph_inputs.model_output:
        fields = dict(root.kwargs)
    elif isinstance(root, Mapping):
        fields = dict(root)
    else:
        raise ValueError(f"the graph's output is {type(root).__name__}, not the model's output object")
    anchor = root if isinstance(root, torch.fx.Node) else output
    with graph.inserting_before(anchor):
        loss = graph.call_function(graph_inputs.model_loss, (fields["logits"], labels, loss_type), dict(constants))
    fields = {"loss": loss, **{key: value for key, value in fields.items() if key != "loss"}}
    if isinstance(root, torch.fx.Node):
        root.kwargs = fields
    else:
        output.args = (fields,)
    return PassResult(gm, True)
