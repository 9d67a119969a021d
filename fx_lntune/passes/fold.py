"""Fold the flat nodes of one module call (as `torch.export` records them) back into one `call_module` node."""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.errors import LNTuneTraceError

__all__ = ["fold_module_calls"]

# Ops that return their input unchanged when dtype and device already agree. torch.export records such a
# `.to()` as a node, and later code that used the input (a residual) is wired to that node instead, so the
# alias "escapes" the norm's group although the module returned something else.
_ALIAS_OPS = {
    torch.ops.aten.to.dtype,
    torch.ops.aten.to.device,
    torch.ops.aten.to.dtype_layout,
    torch.ops.aten.to.other,
    torch.ops.aten.alias.default,
}


def fold_module_calls(
    gm: torch.fx.GraphModule, *, paths: Collection[str], required: Collection[str] | None = None
) -> PassResult:
    """Replace every call of a module in ``paths`` by a single ``call_module`` node (in place).

    A call is the run of nodes whose ``nn_module_stack`` holds one entry (one key: repeated calls of a shared
    module get keys of their own) for a module in ``paths``; the outermost such module wins. Its one tensor
    input is the value the run reads from outside that is not the module's own state, its output the one value
    read outside the run. Before, for ``paths={"ln"}``::

        x -> layer_norm(x, ln.weight, ln.bias) -> y

    after::

        x -> call_module[ln](x) -> y

    The module must already be a submodule of ``gm`` at its path. A call that is not one tensor in, one tensor
    out raises `LNTuneTraceError` for a path in ``required`` (default: all of ``paths``) and is left as it
    was for the others.
    """
    required = set(paths if required is None else required)
    wanted = set(paths)
    calls: dict[str, tuple[str, list[torch.fx.Node]]] = {}
    for node in gm.graph.nodes:
        for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
            if path in wanted:
                calls.setdefault(key, (path, []))[1].append(node)
                break
    for path, nodes in calls.values():
        try:
            _fold_call(gm, path, nodes)
        except LNTuneTraceError:
            if path in required:
                raise
    return PassResult(gm, bool(calls))


def _fold_call(gm: torch.fx.GraphModule, path: str, nodes: list[torch.fx.Node]) -> None:
    members = set(nodes)
    own_state = path + "."
    inputs: list[torch.fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg in members or arg in inputs:
                continue
            if arg.op == "get_attr" and str(arg.target).startswith(own_state):
                continue
            if isinstance(arg.meta.get("val"), torch.Tensor):
                inputs.append(arg)

    outputs, aliases = [], []
    for node in nodes:
        if not any(user not in members for user in node.users):
            continue
        source = _alias_source(node, members)
        if source is None:
            outputs.append(node)
        else:
            aliases.append((node, source))

    if len(inputs) != 1 or len(outputs) > 1:
        raise LNTuneTraceError(
            f"the captured call of module '{path}' reads {len(inputs)} tensor input(s) and returns "
            f"{len(outputs)} value(s); fx-lntune can only make a graph leaf of a module called with one tensor "
            "that returns one tensor. Exclude the module from the targets, or capture with tracer='hf_fx' or "
            "tracer='fx', which keep module calls intact."
        )
    for node, source in aliases:
        node.replace_all_uses_with(source, delete_user_cb=lambda user: user not in members)
    if outputs:
        (output,) = outputs
        with gm.graph.inserting_before(output):
            call = gm.graph.call_module(path, (inputs[0],))
        call.meta = {key: value for key, value in output.meta.items() if key in ("val", "tensor_meta")}
        call.meta["nn_module_stack"] = _stack_above(output.meta.get("nn_module_stack") or {}, path)
        output.replace_all_uses_with(call, delete_user_cb=lambda user: user not in members)
    for node in reversed(nodes):
        gm.graph.erase_node(node)


def _alias_source(node: torch.fx.Node, members: set[torch.fx.Node]) -> torch.fx.Node | None:
    """The node outside ``members`` that ``node`` is a no-op alias of, or None."""
    while node in members:
        if node.target not in _ALIAS_OPS or not node.args:
            return None
        source = node.args[0]
        val, source_val = node.meta.get("val"), getattr(source, "meta", {}).get("val")
        if not isinstance(val, torch.Tensor) or not isinstance(source_val, torch.Tensor):
            return None
        if val.dtype != source_val.dtype or val.device != source_val.device:
            return None
        node = source
    return node


def _stack_above(stack: dict, path: str) -> dict:
    above = {}
    for key, entry in stack.items():
        if entry[0] == path:
            break
        above[key] = entry
    return above
