"""Give a captured graph the model's keyword interface: its output object built in the graph, optional inputs with
the model's defaults, and ``labels``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch.fx.graph import CodeGen, _PyTreeCodeGen
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune import graph_inputs

__all__ = ["model_output_in_graph", "keyword_inputs"]


def model_output_in_graph(gm: torch.fx.GraphModule, output_class: type | None = None) -> PassResult:
    """Build the model's output object with a node of the graph instead of in the code around it (in place).

    `torch.export` returns flat outputs and rebuilds the ``ModelOutput`` in generated code from ``gm._out_spec``,
    which also flattens the inputs, so that its placeholders can take no default. Before::

        def forward(self, input_ids, attention_mask):
            input_ids, attention_mask, = fx_pytree.tree_flatten_spec(([], {...}), self._in_spec)
            ...
            return pytree.tree_unflatten((linear_13,), self._out_spec)

    after::

        def forward(self, input_ids, attention_mask):
            ...
            model_output = fx_lntune_graph_inputs_model_output('...:SequenceClassifierOutput', logits=linear_13)
            return model_output

    A graph returning a dict (``transformers.utils.fx``) returns ``output_class(**dict)`` when one is given.
    """
    graph = gm.graph
    output = next(node for node in reversed(graph.nodes) if node.op == "output")
    codegen = graph._codegen
    if isinstance(codegen, _PyTreeCodeGen) and codegen.pytree_info is not None:
        spec = codegen.pytree_info.out_spec
        if spec is not None:
            value = output.args[0]
            leaves = iter(value if isinstance(value, (tuple, list)) else [value])
            with graph.inserting_before(output):
                output.args = (_build(graph, spec, leaves),)
        graph._codegen = CodeGen()
        for stale in ("_in_spec", "_out_spec"):  # what the old code read; nothing reads them now
            gm.__dict__.pop(stale, None)
        return PassResult(gm, True)
    if output_class is not None and isinstance(output.args[0], Mapping):
        with graph.inserting_before(output):
            node = graph.call_function(graph_inputs.model_output, (_path(output_class),), dict(output.args[0]))
        output.args = (node,)
        return PassResult(gm, True)
    return PassResult(gm, False)


def _path(cls: type) -> str:
    path = f"{cls.__module__}:{cls.__qualname__}"
    graph_inputs.resolve(path)  # fails here, not at the first call, if the class cannot be found by its path
    return path


def _build(graph: torch.fx.Graph, spec: Any, leaves: Any) -> Any:
    if spec.is_leaf():
        return next(leaves)
    children = [_build(graph, child, leaves) for child in spec.children()]
    kind = spec.type
    if kind is tuple or kind is list:
        return kind(children)
    if kind is dict:
        return dict(zip(spec.context, children, strict=True))
    if kind is type(None):
        return None
    fields = dict(zip(spec.context, children, strict=True))
    return graph.call_function(graph_inputs.model_output, (_path(kind),), fields)


def keyword_inputs(
    gm: torch.fx.GraphModule,
    signature: Sequence[str],
    defaults: Mapping[str, tuple[str, tuple]],
) -> PassResult:
    """Give the graph's forward the parameters ``signature`` in that order (in place), those in ``defaults``
    optional: each gets ``= None`` and a node that computes the model's default when it is left out.

    ``defaults`` maps an input to ``(function in fx_lntune.graph_inputs, extra arguments)``; an argument
    ``"@name"`` is input ``name`` after its own default (``defaults`` lists inputs after those they read).
    A name in ``signature`` the graph does not read yet (``labels``) becomes a new placeholder, default ``None``.
    Before::

        def forward(self, input_ids, attention_mask, token_type_ids):
            embedding_1 = embedding(weight, token_type_ids)

    after::

        def forward(self, input_ids, attention_mask = None, token_type_ids = None, labels = None):
            default_mask = fx_lntune_graph_inputs_default_mask(attention_mask, input_ids)
            default_token_type_ids = fx_lntune_graph_inputs_default_token_type_ids(token_type_ids, input_ids)
            embedding_1 = embedding(weight, default_token_type_ids)
    """
    graph = gm.graph
    placeholders = {str(node.target): node for node in graph.nodes if node.op == "placeholder"}
    first = next(node for node in graph.nodes if node.op != "placeholder")
    new = [name for name in signature if name not in placeholders]
    for name in new:
        with graph.inserting_before(first):
            placeholders[name] = graph.placeholder(name)
    for name in signature:
        first.prepend(placeholders[name])
    for name in [*defaults, *new]:
        placeholders[name].args = (None,)
    filled: dict[str, torch.fx.Node] = {}
    for name, (function, extra) in defaults.items():
        args = tuple(_argument(value, filled, placeholders) for value in extra)
        with graph.inserting_before(first):
            node = graph.call_function(getattr(graph_inputs, function), (placeholders[name], *args))
        if "val" in placeholders[name].meta:
            node.meta["val"] = placeholders[name].meta["val"]
        filled[name] = node
    for name, node in filled.items():
        placeholders[name].replace_all_uses_with(node, delete_user_cb=lambda user, node=node: user is not node)
    return PassResult(gm, True)


def _argument(value: Any, filled: Mapping[str, torch.fx.Node], placeholders: Mapping[str, torch.fx.Node]) -> Any:
    if isinstance(value, str) and value.startswith("@"):
        return filled.get(value[1:], placeholders[value[1:]])
    return value
