"""Give every dropout that `torch.export` baked into the graph back to an `nn.Dropout` module.

Export records ``F.dropout(x, p, training)`` with ``training`` frozen at capture, and attention dropout as a
constant ``dropout_p`` of ``scaled_dot_product_attention``. After this pass each is a ``call_module`` of an
``nn.Dropout`` whose ``train()``/``eval()`` decides, as in the eager model.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.modules import set_submodule

__all__ = ["fold_dropout"]

_DROPOUT_OPS = {torch.ops.aten.dropout.default, torch.ops.aten.feature_dropout.default}
_SDPA = torch.ops.aten.scaled_dot_product_attention.default


def fold_dropout(gm: torch.fx.GraphModule) -> PassResult:
    """Rewrite functional and attention dropout into ``nn.Dropout`` calls (in place).

    ``dropout(x, p, train)`` (not inside an ``nn.Dropout``; those are folded as module calls) becomes::

        x -> call_module[<owner>.fx_dropout](x)          (p > 0; with p == 0 the node is dropped)

    and ``scaled_dot_product_attention(q, k, v, mask, dropout_p=p)`` with ``p > 0`` is spelled out so that
    the dropout sits where the fused kernel applies it::

        softmax(q @ k^T * scale + mask) -> call_module[<owner>.fx_attention_dropout] -> @ v
    """
    modified = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _DROPOUT_OPS:
            p = float(node.args[1])
            if p > 0:
                path = _new_dropout(gm, node, "fx_dropout", p)
                with gm.graph.inserting_before(node):
                    call = gm.graph.call_module(path, (node.args[0],))
                call.meta = dict(node.meta)
                node.replace_all_uses_with(call)
            else:
                node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            modified = True
        elif node.target is _SDPA and _sdpa_dropout(node) > 0:
            _spell_out_attention(gm, node)
            modified = True
    return PassResult(gm, modified)


def _sdpa_dropout(node: torch.fx.Node) -> float:
    if len(node.args) > 4:
        return float(node.args[4])
    return float(node.kwargs.get("dropout_p", 0.0))


def _new_dropout(gm: torch.fx.GraphModule, node: torch.fx.Node, name: str, p: float) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    owner = list(stack.values())[-1][0] if stack else ""
    stem = f"{owner}.{name}" if owner else name
    path, index = stem, 1
    while _has_submodule(gm, path):
        path, index = f"{stem}{index}", index + 1
    set_submodule(gm, path, nn.Dropout(p))
    return path


def _has_submodule(gm: torch.fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def _spell_out_attention(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    mask, is_causal = bound.get("attn_mask"), bool(bound.get("is_causal", False))
    head_dim = q.meta["val"].shape[-1]
    scale = bound.get("scale")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    path = _new_dropout(gm, node, "fx_attention_dropout", _sdpa_dropout(node))

    graph = gm.graph
    first_new = node.prev
    with graph.inserting_before(node):
        if bound.get("enable_gqa", False):
            groups = q.meta["val"].shape[-3] // k.meta["val"].shape[-3]
            k = graph.call_function(torch.repeat_interleave, (k, groups), {"dim": -3})
            v = graph.call_function(torch.repeat_interleave, (v, groups), {"dim": -3})
        scores = graph.call_function(torch.matmul, (q, graph.call_function(torch.transpose, (k, -2, -1))))
        scores = graph.call_function(torch.mul, (scores, scale))
        if mask is not None:
            if mask.meta["val"].dtype == torch.bool:
                blocked = graph.call_function(torch.logical_not, (mask,))
                scores = graph.call_function(torch.masked_fill, (scores, blocked, -math.inf))
            else:
                scores = graph.call_function(torch.add, (scores, mask))
        if is_causal:
            ones = graph.call_function(torch.ones_like, (scores,), {"dtype": torch.bool})
            blocked = graph.call_function(torch.logical_not, (graph.call_function(torch.tril, (ones,)),))
            scores = graph.call_function(torch.masked_fill, (scores, blocked, -math.inf))
        probs = graph.call_function(torch.softmax, (scores, -1))
        probs = graph.call_module(path, (probs,))
        out = graph.call_function(torch.matmul, (probs, v))
    out.meta = {key: value for key, value in node.meta.items() if key in ("val", "nn_module_stack")}
    # The spelled-out nodes belong to the attention module as the fused call did (module-level views group by it).
    stack = node.meta.get("nn_module_stack")
    created = first_new.next
    while stack and created is not node:
        created.meta.setdefault("nn_module_stack", dict(stack))
        created = created.next
    node.replace_all_uses_with(out)
    graph.erase_node(node)
