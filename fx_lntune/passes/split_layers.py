"""Split a flat captured graph into one GraphModule per model layer, called by the root graph; and flatten it back."""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.passes._graphs import layer_calls, submodule_or_none
from fx_lntune.passes.fold import _stack_above  # the same trim of a node's module stack as a folded call

__all__ = ["split_layers", "inline_layers", "layer_calls"]


def split_layers(gm: torch.fx.GraphModule, *, layers: Sequence[str]) -> PassResult:
    """Move the nodes of each layer in ``layers`` into a ``GraphModule`` at the layer's own path (in place).

    A layer's nodes are those whose ``nn_module_stack`` holds it (outermost layer wins) and every node between its
    first and last one; the root keeps the rest and calls the layer with ``call_module``. Values the layer reads
    from outside (hidden states, rotary cos/sin, masks, sizes) become its inputs, in order of first use; values
    read after it become its outputs (a tuple when there are several). The layer module is the container that
    held the layer's state, so parameters, buffers and leaf modules keep their paths and the state dict its keys.
    Before, for ``layers=["layers.0"]``::

        root:  x -> add(x, 1) -> call_module[layers.0.norm] -> linear(., layers.0.fc.weight) -> y

    after::

        root:      x -> call_module[layers.0](x) -> y
        layers.0:  x -> add(x, 1) -> call_module[norm] -> linear(., fc.weight) -> output

    A layer is left in the root graph when it is called more than once (a layer shared across depth, as albert's),
    when it is itself a leaf of the graph, when no node belongs to it, or when its nodes interleave with another
    layer's. Its parameters read only from inside it move into it as ``get_attr`` nodes; anything else it reads
    (lifted constants, another module's weights) is read in the root and passed in.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    owner, calls = _owners(nodes, set(layers))
    spans: dict[str, tuple[int, int]] = {}
    for node, path in owner.items():
        first, last = spans.get(path, (position[node], position[node]))
        spans[path] = (min(first, position[node]), max(last, position[node]))
    called = {str(node.target) for node in nodes if node.op == "call_module"}
    splittable = [
        path
        for path in sorted(spans, key=lambda path: spans[path][0])
        if len(calls[path]) == 1 and path not in called and type(submodule_or_none(gm, path)) is nn.Module
    ]
    splittable = _disjoint(splittable, spans)
    for path in splittable:
        first, last = spans[path]
        members = [node for node in nodes[first : last + 1] if node.op not in ("placeholder", "output", "get_attr")]
        _move_layer(gm, path, members)
    return PassResult(gm, bool(splittable))


def _owners(nodes: list[torch.fx.Node], layers: set[str]) -> tuple[dict[torch.fx.Node, str], dict[str, set[str]]]:
    """Each node's layer (the outermost entry of its module stack that is a layer) and each layer's call keys."""
    owner: dict[torch.fx.Node, str] = {}
    calls: dict[str, set[str]] = {}
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        for key, entry in (node.meta.get("nn_module_stack") or {}).items():
            path = entry[0] if isinstance(entry, tuple) else None
            if path in layers:
                owner[node] = path
                calls.setdefault(path, set()).add(key)
                break
    return owner, calls


def _disjoint(paths: list[str], spans: dict[str, tuple[int, int]]) -> list[str]:
    """The layers (sorted by first node) whose node ranges overlap no other layer's."""
    keep = []
    for index, path in enumerate(paths):
        first, last = spans[path]
        if all(spans[other][1] < first or spans[other][0] > last for other in paths[:index] + paths[index + 1 :]):
            keep.append(path)
    return keep


def _move_layer(gm: torch.fx.GraphModule, path: str, members: list[torch.fx.Node]) -> None:
    graph = gm.graph
    prefix = path + "."
    inside = set(members)
    # Its own state read only here moves in with it; everything else it reads comes in as an input.
    for node in members:
        for arg in node.all_input_nodes:
            if (
                arg.op == "get_attr"
                and str(arg.target).startswith(prefix)
                and arg not in inside
                and all(user in inside for user in arg.users)
            ):
                inside.add(arg)
    ordered = [node for node in graph.nodes if node in inside]
    inputs: list[torch.fx.Node] = []
    for node in ordered:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    outputs = [node for node in ordered if any(user not in inside for user in node.users)]

    sub = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for arg in inputs:
        env[arg] = sub.placeholder(arg.name)
        env[arg].meta = {key: value for key, value in arg.meta.items() if key in ("val", "tensor_meta")}
    for node in ordered:
        moved = sub.node_copy(node, env.__getitem__)
        if node.op in ("get_attr", "call_module"):
            moved.target = str(node.target)[len(prefix) :]
        env[node] = moved
    results = [env[node] for node in outputs]
    sub.output(results[0] if len(results) == 1 else tuple(results))
    sub._tracer_cls = graph._tracer_cls  # how a pickled layer is re-traced on load, as the root is

    container = gm.get_submodule(path)
    stack = next(entry for entry in (members[0].meta.get("nn_module_stack") or {}).values() if entry[0] == path)
    layer = torch.fx.GraphModule(container, sub, class_name=_class_name(stack[1]))
    # The container's own children and tensors (torch.fx copied only what nodes name, through new empty parents).
    layer._modules = dict(container._modules)
    layer._parameters = dict(container._parameters)
    layer._buffers = dict(container._buffers)
    layer._non_persistent_buffers_set = set(container._non_persistent_buffers_set)
    layer.train(container.training)
    parent_path, _, name = path.rpartition(".")
    gm.get_submodule(parent_path).add_module(name, layer)

    with graph.inserting_after(ordered[-1]):
        call = graph.call_module(path, tuple(inputs))
    call.meta["nn_module_stack"] = _stack_above(members[0].meta.get("nn_module_stack") or {}, path)
    if len(outputs) == 1:
        call.meta.update({key: value for key, value in outputs[0].meta.items() if key in ("val", "tensor_meta")})
        outputs[0].replace_all_uses_with(call, delete_user_cb=lambda user: user not in inside)
    else:
        anchor = call
        for index, node in enumerate(outputs):
            with graph.inserting_after(anchor):
                item = graph.call_function(operator.getitem, (call, index))
            item.meta = {key: value for key, value in node.meta.items() if key in ("val", "tensor_meta")}
            item.meta["nn_module_stack"] = dict(call.meta["nn_module_stack"])
            node.replace_all_uses_with(item, delete_user_cb=lambda user: user not in inside)
            anchor = item
    for node in reversed(ordered):
        graph.erase_node(node)


def _class_name(module_type: object) -> str:
    name = getattr(module_type, "__name__", None) or str(module_type).rsplit(".", 1)[-1]
    return name.strip("'<>") or "GraphModule"


def inline_layers(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A flat copy of ``gm``'s graph with every layer call replaced by the layer's nodes: the graph as captured.

    The inverse of `split_layers`, for reading (pictures, comparisons): returns a new ``GraphModule`` over the same
    modules and tensors (nothing is copied); ``gm`` is unchanged. Node names are the captured ones.
    """
    flat = torch.fx.Graph()
    env: dict[torch.fx.Node, object] = {}
    layers = dict(layer_calls(gm))
    paths = set(layers.values())
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in paths:
            continue  # the layer a checkpointed call names: its nodes are inlined instead
        if node in layers:
            env[node] = _inline_one(flat, gm.get_submodule(layers[node]), layers[node], node, env)
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in layers:
            env[node] = env[node.args[0]][node.args[1]]
        elif node.op == "output":
            flat.output(torch.fx.map_arg(node.args[0], env.__getitem__))
        else:
            env[node] = flat.node_copy(node, env.__getitem__)
    flat._tracer_cls = gm.graph._tracer_cls
    flat._codegen = copy.deepcopy(gm.graph._codegen)  # export's pytree in/out (keyword inputs, a ModelOutput)
    return torch.fx.GraphModule(gm, flat, class_name=type(gm).__name__)


def _inline_one(flat: torch.fx.Graph, layer: torch.fx.GraphModule, path: str, call: torch.fx.Node, env: dict):
    args = [env[arg] for arg in (call.args if call.op == "call_module" else call.args[1:])]
    inner: dict[torch.fx.Node, object] = {}
    placeholders = [node for node in layer.graph.nodes if node.op == "placeholder"]
    inner.update(zip(placeholders, args, strict=True))
    result = None
    for node in layer.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            result = torch.fx.map_arg(node.args[0], inner.__getitem__)
            continue
        moved = flat.node_copy(node, inner.__getitem__)
        if node.op in ("get_attr", "call_module"):
            moved.target = f"{path}.{node.target}"
        inner[node] = moved
    return result
