"""Give every dropout that `torch.export` baked into the graph back to an `nn.Dropout` module.

Export records ``F.dropout(x, p, training)`` with ``training`` frozen at capture, and attention dropout as a
constant ``dropout_p`` of ``scaled_dot_product_attention``. After this pass each is decided by an ``nn.Dropout``
module's ``train()``/``eval()``, as in the eager model.
"""

from __future__ import annotations

import operator

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

    and ``scaled_dot_product_attention(q, k, v, mask, dropout_p=p)`` with ``p > 0`` keeps its fused kernel
    and reads its rate from an ``nn.Dropout`` at ``<owner>.fx_attention_dropout`` on every call::

        d = get_attr[<owner>.fx_attention_dropout]
        scaled_dot_product_attention(q, k, v, mask, dropout_p=getattr(d, "training") * getattr(d, "p"))

    (0 in eval mode: the same kernel as the eager model's; spelling the attention out instead would run the
    unfused math path also in eval, ~20% slower for MiniLM.)
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
            _read_attention_dropout(gm, node)
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


def _read_attention_dropout(gm: torch.fx.GraphModule, node: torch.fx.Node) -> None:
    path = _new_dropout(gm, node, "fx_attention_dropout", _sdpa_dropout(node))
    graph = gm.graph
    first_new = node.prev
    with graph.inserting_before(node):
        module = graph.get_attr(path)
        training = graph.call_function(getattr, (module, "training"))
        rate = graph.call_function(getattr, (module, "p"))
        dropout_p = graph.call_function(operator.mul, (training, rate))
    # The new nodes belong to the attention module, as the call does (module-level views group by it).
    stack = node.meta.get("nn_module_stack")
    created = first_new.next
    while stack and created is not node:
        created.meta.setdefault("nn_module_stack", dict(stack))
        created = created.next
    if len(node.args) > 4:
        node.args = (*node.args[:4], dropout_p, *node.args[5:])
    else:
        node.kwargs = {**node.kwargs, "dropout_p": dropout_p}
