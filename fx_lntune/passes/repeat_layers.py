"""Complete a graph captured with a layer list shortened: a copy of the last captured layer per missing layer."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.modules import set_submodule

__all__ = ["LayerRun", "CannotRepeat", "repeat_layers"]


@dataclass(frozen=True)
class LayerRun:
    """A ``nn.ModuleList`` at ``path`` whose layers from ``first`` on are alike; the capture ran its first
    ``captured`` layers (``first + 3``: the first alike layer, then two more to check the pattern on) of ``total``."""

    path: str
    first: int
    captured: int
    total: int


class CannotRepeat(Exception):
    """The captured layers are not one chain of identical subgraphs; the graph is unchanged."""


def repeat_layers(
    gm: torch.fx.GraphModule, *, runs: Sequence[LayerRun], layer_module: Callable[[str], nn.Module]
) -> PassResult:
    """Add the layers a shortened capture left out, each a copy of the last captured layer's nodes (in place).

    A layer's nodes are those whose ``nn_module_stack`` holds its path. The last two captured layers (``b`` and
    the one before, ``a``) must be the same subgraph node for node: the same ops and constants, reading values
    of their own layer at the same positions, their own parameters under the same names, ``a`` reading the layer
    before it where ``b`` reads ``a`` (the carried hidden states), and otherwise the same outside values (masks,
    rotary cos/sin, sizes). Copy ``i`` of ``b`` then reads the parameters of layer ``i`` (``layer_module(path)``
    is grafted into ``gm`` at its path) and copy ``i - 1`` where ``b`` reads ``a``; whatever read ``b`` after it
    (the final norm) reads the last copy. For ``model.layers`` captured with 3 of 5 layers::

        before:  embed -> [layers.0] -> [layers.1] -> [layers.2] -> norm
        after:   embed -> [layers.0] -> [layers.1] -> [layers.2] -> [layers.3] -> [layers.4] -> norm

    A layer may also have inputs and outputs of its own (a decoder step's past keys/values in, present out):
    placeholders read by that layer only, and values of it the output returns. ``a``'s and ``b``'s must match
    position for position; copy ``i`` gets new placeholders after ``b``'s and its outputs after ``b``'s (layer by
    layer, each contiguous group of ``b``'s kept together), so the graph takes and returns them in layer order::

        before:  step(ids, k0, v0, k1, v1, k2, v2) -> (logits, p0, q0, p1, q1, p2, q2)
        after:   step(ids, k0, v0, ..., k4, v4) -> (logits, p0, q0, ..., p4, q4)

    Raises `CannotRepeat`, with ``gm`` unchanged, when the layers do not form such a chain: the caller then
    captures the whole model.
    """
    plans = [_plan(gm.graph, run) for run in runs]
    for run, plan in zip(runs, plans, strict=True):
        _apply(gm, run, plan, layer_module)
    return PassResult(gm, bool(runs))


@dataclass
class _Plan:
    template: list[torch.fx.Node]  # layer b's nodes, in graph order
    previous: list[torch.fx.Node]  # layer a's nodes, position for position
    readers: dict[torch.fx.Node, list[torch.fx.Node]]  # b's nodes read after the layers -> their readers
    inputs: list[list[torch.fx.Node]]  # b's own placeholders, in contiguous groups
    outputs: list[list[torch.fx.Node]]  # b's nodes the output returns, in contiguous groups


def _plan(graph: torch.fx.Graph, run: LayerRun) -> _Plan:
    if run.captured < run.first + 3:
        raise CannotRepeat(f"{run.path}: {run.captured} captured layers are too few to check the pattern")
    paths = [f"{run.path}.{index}" for index in range(run.captured)]
    regions = _regions(graph, set(paths))
    if any(not regions.get(path) for path in paths[run.first :]):
        raise CannotRepeat(f"{run.path}: a captured layer has no nodes")
    before, a, b = (regions[path] for path in paths[-3:])
    nodes = list(graph.nodes)
    position = {node: index for index, node in enumerate(nodes)}
    span = nodes[position[a[0]] : position[b[-1]] + 1]
    inside = set(a) | set(b)
    if any(node not in inside and node.op != "get_attr" for node in span) or position[a[-1]] > position[b[0]]:
        raise CannotRepeat(f"{run.path}: the last two captured layers are not consecutive blocks of nodes")
    if len(a) != len(b):
        raise CannotRepeat(f"{run.path}: layers {paths[-2]} and {paths[-1]} differ ({len(a)} vs {len(b)} nodes)")
    index_before, index_a, index_b = ({n: i for i, n in enumerate(r)} for r in (before, a, b))
    own = _own_inputs(graph, {node: path for path in paths[-2:] for node in regions[path]})
    inputs_a, inputs_b = own.get(paths[-2], []), own.get(paths[-1], [])
    if len(inputs_a) != len(inputs_b):
        raise CannotRepeat(f"{run.path}: layers {paths[-2]} and {paths[-1]} have different own inputs")
    input_a, input_b = ({n: i for i, n in enumerate(r)} for r in (inputs_a, inputs_b))
    # A layer's own outputs: values the output returns of both layers (a present key/value); a value returned of
    # the last layer only (the final hidden state, as bart's encoder returns it) is read after the layers instead.
    returned = _returned(graph)
    returned_set = {id(node) for node in returned}
    outputs_a = [node for node in returned if node in index_a]
    outputs_b = [node for node in returned if node in index_b and id(a[index_b[node]]) in returned_set]
    if [index_a[node] for node in outputs_a] != [index_b[node] for node in outputs_b]:
        raise CannotRepeat(f"{run.path}: layers {paths[-2]} and {paths[-1]} return different values")
    for node_a, node_b in zip(a, b, strict=True):
        same = node_a.op == node_b.op and node_a.target == node_b.target
        try:  # constants compare with ==; a tensor constant (no plain truth value) counts as a difference
            same = same and bool(
                _tokens(node_a, index_a, index_before, paths[-2], input_a)
                == _tokens(node_b, index_b, index_a, paths[-1], input_b)
            )
        except RuntimeError:
            same = False
        same = same and _stack(node_a, paths[-2]) == _stack(node_b, paths[-1])
        if not same:
            raise CannotRepeat(f"{run.path}: {node_a.name} of {paths[-2]} and {node_b.name} of {paths[-1]} differ")
    output = next(iter(graph.find_nodes(op="output")))
    returned_a = set(outputs_a)
    if any(user not in inside and not (user is output and node in returned_a) for node in a for user in node.users):
        raise CannotRepeat(f"{run.path}: a value of {paths[-2]} is read after the next layer")
    returned_b = set(outputs_b)
    readers = {
        node: [user for user in node.users if user not in index_b and not (user is output and node in returned_b)]
        for node in b
    }
    placeholders = list(graph.find_nodes(op="placeholder"))
    return _Plan(
        b,
        a,
        {node: users for node, users in readers.items() if users},
        _groups(inputs_b, placeholders),
        _groups(outputs_b, returned),
    )


def _own_inputs(graph: torch.fx.Graph, layer_of: dict[torch.fx.Node, str]) -> dict[str, list[torch.fx.Node]]:
    """Per layer, the placeholders only its nodes read (in graph order)."""
    own: dict[str, list[torch.fx.Node]] = {}
    for node in graph.find_nodes(op="placeholder"):
        layers = {layer_of.get(user) for user in node.users}
        if len(layers) == 1 and None not in layers:
            own.setdefault(layers.pop(), []).append(node)
    return own


def _returned(graph: torch.fx.Graph) -> list[Any]:
    """The output node's values, flat (a decoder step returns a flat tuple)."""
    output = next(iter(graph.find_nodes(op="output")))
    values = output.args[0]
    return list(values) if isinstance(values, (tuple, list)) else [values]


def _groups(nodes: list[torch.fx.Node], order: list[Any]) -> list[list[torch.fx.Node]]:
    """``nodes`` split where they are not next to each other in ``order``."""
    position = {id(item): index for index, item in enumerate(order)}
    groups: list[list[torch.fx.Node]] = []
    for node in nodes:
        if groups and position[id(node)] == position[id(groups[-1][-1])] + 1:
            groups[-1].append(node)
        else:
            groups.append([node])
    return groups


def _regions(graph: torch.fx.Graph, paths: set[str]) -> dict[str, list[torch.fx.Node]]:
    regions: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        for entry in (node.meta.get("nn_module_stack") or {}).values():
            if isinstance(entry, tuple) and entry[0] in paths:
                regions.setdefault(entry[0], []).append(node)
                break
    return regions


def _tokens(node: torch.fx.Node, own: dict, previous: dict, path: str, inputs: dict) -> Any:
    """``node``'s arguments with each node named by its role: ``own`` position, ``previous`` layer position,
    own input position, own parameter name, or (for anything else) the node itself."""

    def role(arg: torch.fx.Node) -> Any:
        if arg in own:
            return ("own", own[arg])
        if arg in previous:
            return ("previous", previous[arg])
        if arg in inputs:
            return ("input", inputs[arg])
        if _is_state_of(arg, path):
            return ("state", str(arg.target)[len(path) :])
        return ("outside", arg)

    return torch.fx.node.map_arg((node.args, node.kwargs), role)


def _stack(node: torch.fx.Node, path: str) -> list[Any]:
    """The part of ``node``'s module stack inside the layer at ``path``: relative paths and classes."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    paths = [entry[0] for entry in stack]
    start = paths.index(path)
    return [(entry[0][len(path) :], entry[1]) for entry in stack[start:]]


def _apply(gm: torch.fx.GraphModule, run: LayerRun, plan: _Plan, layer_module: Callable[[str], nn.Module]) -> None:
    graph = gm.graph
    template_path = f"{run.path}.{run.captured - 1}"
    # A new layer's state is read where and in the order the template's is (export reads all state first), so that
    # a copied layer's graph reads like a captured one.
    order = {node: index for index, node in enumerate(graph.nodes)}
    template_state = sorted(
        {arg for node in plan.template for arg in node.all_input_nodes if _is_state_of(arg, template_path)},
        key=order.__getitem__,
    )
    state_cursor = template_state[-1] if template_state else None
    input_cursors = [group[-1] for group in plan.inputs]
    added_outputs: list[list[torch.fx.Node]] = [[] for _ in plan.outputs]
    last, cursor = list(plan.template), plan.template[-1]
    position = {node: index for index, node in enumerate(plan.template)}
    for index in range(run.captured, run.total):
        path = f"{run.path}.{index}"
        set_submodule(gm, path, layer_module(path))
        rename = _renamer(template_path, path)
        env = {before: after for before, after in zip(plan.previous, last, strict=True)}
        for node in template_state:
            with graph.inserting_after(state_cursor):
                env[node] = state_cursor = graph.get_attr(rename(str(node.target)))
            env[node].meta = dict(node.meta)
        for group_index, group in enumerate(plan.inputs):
            for node in group:
                with graph.inserting_after(input_cursors[group_index]):
                    env[node] = input_cursors[group_index] = graph.placeholder(f"{node.name}_{index}")
                env[node].meta = dict(node.meta)
        last = _copy_nodes(graph, plan.template, env, cursor, rename)
        cursor = last[-1]
        for group_index, group in enumerate(plan.outputs):
            added_outputs[group_index] += [last[position[node]] for node in group]
    for node, users in plan.readers.items():
        for user in users:
            user.replace_input_with(node, last[position[node]])
    if plan.outputs:
        _extend_output(graph, plan.outputs, added_outputs)


def _extend_output(graph: torch.fx.Graph, groups: list[list[torch.fx.Node]], added: list[list[torch.fx.Node]]) -> None:
    """The output returns ``added[i]`` right after group ``i`` of the template layer's values."""
    output = next(iter(graph.find_nodes(op="output")))
    after = {id(group[-1]): extra for group, extra in zip(groups, added, strict=True)}
    values = []
    for value in _returned(graph):
        values.append(value)
        values += after.pop(id(value), [])
    output.args = (type(output.args[0])(values),)


def _copy_nodes(
    graph: torch.fx.Graph,
    template: list[torch.fx.Node],
    env: dict[torch.fx.Node, torch.fx.Node],
    cursor: torch.fx.Node,
    rename: Callable[[str], str],
) -> list[torch.fx.Node]:
    """Copies of ``template`` after ``cursor``, reading ``env[arg]`` for an argument ``env`` maps (and each
    other's copies for the template's own values); module paths in their module stacks renamed."""
    copies = []
    for node in template:
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda arg: env.get(arg, arg))
        with graph.inserting_after(cursor):
            copy = graph.create_node(node.op, node.target, args, kwargs, name=_base_name(node.name))
        copy.meta = dict(node.meta)
        if "nn_module_stack" in node.meta:
            copy.meta["nn_module_stack"] = {
                rename(key): (rename(entry[0]), *entry[1:]) for key, entry in node.meta["nn_module_stack"].items()
            }
        env[node] = cursor = copy
        copies.append(copy)
    return copies


def _is_state_of(node: torch.fx.Node, path: str) -> bool:
    return node.op == "get_attr" and str(node.target).startswith(path + ".")


def _renamer(old: str, new: str) -> Callable[[str], str]:
    """Replace the module path ``old`` by ``new`` where it starts a path in a string (``L__self__`` + path in
    module-stack keys), not inside a longer one (``layers.1`` is not in ``layers.10``)."""
    pattern = re.compile(r"(^|(?<=__))" + re.escape(old) + r"(?=$|[.@])")
    return lambda text: pattern.sub(new, text)


def _base_name(name: str) -> str:
    return re.sub(r"_\d+$", "", name)
