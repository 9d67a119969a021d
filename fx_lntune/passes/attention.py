"""Attention without what the traced model computes and the eager model does not: grouped key/value heads, the
float mask, and a mask at all where no token is padded.

A training step of the captured graph kept, per layer, two tensors the eager model does not keep on the same
inputs: the key and value repeated to the query's head count (``repeat_kv``; 135 MiB on SmolLM2-135M at 2 x 512),
and the float mask ``scaled_dot_product_attention`` makes of the boolean one on each call (60 MiB). A decoder step
builds the boolean mask from ``attention_mask`` at every token, where the eager model passes none when nothing is
padded (`unmasked_attention`).
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.graph_inputs import attention, attention_mask
from fx_lntune.passes._graphs import graph_modules, layer_calls

__all__ = ["group_query_heads", "share_attention_mask", "unmasked_attention"]

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_ATTENTION = (_SDPA, attention)
_END = 2**62  # a slice end at or past this is export's "to the end" (sys.maxsize)


def group_query_heads(gm: torch.fx.GraphModule) -> PassResult:
    """Give ``scaled_dot_product_attention`` the key and value before ``repeat_kv`` (in place). Before::

        unsqueeze = aten.unsqueeze(key, 2)
        expand = aten.expand(unsqueeze, [b, 3, 3, s, 64])
        reshape = aten.reshape(expand, [b, 9, s, 64])
        ...  (the same for value)
        attention = aten.scaled_dot_product_attention(query, reshape, reshape_1, mask, p, scale=0.125)

    after (the repeats left dead and removed by the runner's clean-up)::

        attention = attention(query, key, value, mask, p, scale=0.125)

    `fx_lntune.graph_inputs.attention` lets the kernel read each key/value head for its group of query
    heads where it can (CPU), so the repeated copies are neither made nor kept for backward.
    """
    modified = False
    for _, module in graph_modules(gm):
        for node in list(module.graph.nodes):
            if node.target is not _SDPA or len(node.args) < 3 or node.kwargs.get("enable_gqa"):
                continue
            key, value = _before_repeat(node.args[1]), _before_repeat(node.args[2])
            if key is None or value is None or key[1] != value[1]:
                continue
            node.target = attention
            node.args = (node.args[0], key[0], value[0], *node.args[3:])
            modified = True
    return PassResult(gm, modified)


def _before_repeat(node) -> tuple[torch.fx.Node, int] | None:
    """``(x, groups)`` when ``node`` is ``repeat_kv(x, groups)``:
    ``reshape(expand(unsqueeze(x, 2), [b, h, groups, s, d]), [b, h * groups, s, d])``, whole slices skipped."""
    if not isinstance(node, torch.fx.Node) or node.target is not torch.ops.aten.reshape.default:
        return None
    expand = _unsliced(node.args[0])
    if expand.target is not torch.ops.aten.expand.default or len(expand.args[1]) != 5:
        return None
    unsqueeze = _unsliced(expand.args[0])
    if unsqueeze.target is not torch.ops.aten.unsqueeze.default or unsqueeze.args[1] != 2:
        return None
    heads, groups = expand.args[1][1:3]
    shape = node.args[1]
    if not (isinstance(heads, int) and isinstance(groups, int)) or len(shape) != 4 or shape[1] != heads * groups:
        return None
    return _unsliced(unsqueeze.args[0]), groups


def _unsliced(node: torch.fx.Node) -> torch.fx.Node:
    """``node`` with every whole slice (``aten.slice(x, dim, 0, <end>)``, a no-op) around it skipped."""
    while (
        isinstance(node, torch.fx.Node)
        and node.target is torch.ops.aten.slice.Tensor
        and len(node.args) == 4
        and node.args[2] == 0
        and isinstance(node.args[3], int)
        and node.args[3] >= _END
    ):
        node = node.args[0]
    return node


def share_attention_mask(gm: torch.fx.GraphModule) -> PassResult:
    """Make the attention mask passed to every layer once, before the layers (in place). Before::

        model_layers_0 = model.layers.0(embedding, ..., expand)      # expand: the boolean 4-D mask
        model_layers_1 = model.layers.1(model_layers_0, ..., expand)

    after::

        attention_mask = attention_mask(expand, embedding)
        model_layers_0 = model.layers.0(embedding, ..., attention_mask)
        model_layers_1 = model.layers.1(model_layers_0, ..., attention_mask)

    and in each layer ``scaled_dot_product_attention(q, k, v, expand, ...)`` becomes
    ``attention(q, k, v, expand, ..., unmasked_is_causal=True)``. Only for an argument that every layer passes
    straight to attention as its mask, and nothing else. A boolean mask would be converted to a float one by every
    attention call, each conversion kept for backward; now the layers share one, or none where the mask is exactly
    causal (`fx_lntune.graph_inputs.attention_mask`), as the eager model drops it.
    """
    calls = [node for node, _ in layer_calls(gm) if node.op == "call_module"]
    if not calls or any(len(node.args) != len(calls[0].args) or node.kwargs for node in calls):
        return PassResult(gm, False)
    modified = False
    for index, mask in enumerate(calls[0].args):
        if index == 0 or not isinstance(mask, torch.fx.Node) or any(node.args[index] is not mask for node in calls):
            continue
        if not all(_only_attention_mask(gm.get_submodule(str(node.target)), index) for node in calls):
            continue
        with gm.graph.inserting_before(calls[0]):
            shared = gm.graph.call_function(attention_mask, (mask, calls[0].args[0]))
        for node in calls:
            node.update_arg(index, shared)
        for layer in {id(layer): layer for layer in (gm.get_submodule(str(node.target)) for node in calls)}.values():
            placeholder = [node for node in layer.graph.nodes if node.op == "placeholder"][index]
            for user in list(placeholder.users):
                user.target = attention
                user.kwargs = {**user.kwargs, "unmasked_is_causal": True}
        modified = True
    return PassResult(gm, modified)


def _only_attention_mask(layer: torch.nn.Module, index: int) -> bool:
    if not isinstance(layer, torch.fx.GraphModule):
        return False
    placeholders = [node for node in layer.graph.nodes if node.op == "placeholder"]
    if index >= len(placeholders):
        return False
    users = placeholders[index].users
    return bool(users) and all(
        user.target in _ATTENTION
        and len(user.args) > 3
        and user.args[3] is placeholders[index]
        and placeholders[index] not in (*user.args[:3], *user.args[4:], *user.kwargs.values())
        for user in users
    )


def unmasked_attention(gm: torch.fx.GraphModule) -> PassResult:
    """Give every ``scaled_dot_product_attention`` of a causal decoder step no mask (in place). Before::

        expand = aten.expand(and_2, [b, 1, q, past + q])      # the boolean mask, built from attention_mask
        reshape = aten.reshape(aten.expand(aten.unsqueeze(key, 2), [b, 3, 3, s, 64]), [b, 9, s, 64])  # repeat_kv
        attention = aten.scaled_dot_product_attention(query, reshape, reshape_1, expand, scale=0.125)

    after (the mask's and repeats' nodes left dead, removed by the runner's clean-up)::

        sym_size = aten.sym_size.int(query, 2)
        gt = operator.gt(sym_size, 1)
        attention = aten.scaled_dot_product_attention(query, key, value, None, 0.0, gt, scale=0.125, enable_gqa=True)

    what transformers' eager attention runs where ``_ignore_causal_mask_sdpa`` drops the mask: a causal
    (upper-left) mask when the step has more than one query position, none for one. The graph then computes the
    masked graph's outputs only for inputs that mask nothing: no padding, and either no past or one new token (and
    fewer positions than a sliding window); the caller chooses it for those alone. Only where every attention call
    takes a boolean mask and no dropout (any other graph is left unchanged): a float mask may carry a position bias.
    """
    calls = [node for _, module in graph_modules(gm) for node in module.graph.nodes if node.target is _SDPA]
    if not calls or not all(_boolean_mask(node) for node in calls):
        return PassResult(gm, False)
    for node in calls:
        graph = node.graph
        key, value = _before_repeat(node.args[1]), _before_repeat(node.args[2])
        grouped = key is not None and value is not None and key[1] == value[1]
        with graph.inserting_before(node):
            length = graph.call_function(torch.ops.aten.sym_size.int, (node.args[0], 2))
            causal = graph.call_function(operator.gt, (length, 1))
        keys = (key[0], value[0]) if grouped else node.args[1:3]
        node.args = (node.args[0], *keys, None, 0.0, causal)
        node.kwargs = {"scale": node.kwargs.get("scale"), "enable_gqa": grouped or bool(node.kwargs.get("enable_gqa"))}
    return PassResult(gm, True)


def _boolean_mask(node: torch.fx.Node) -> bool:
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    value = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool and dropout == 0.0 and causal is False
