"""Make the dtypes `torch.export` wrote into a captured graph follow its weights, so that ``gm.to(dtype)`` works.

A capture in fp32 writes ``dtype=torch.float32`` into every cast and factory call, whether the model's code said
``x.to(self.dtype)`` (follow the weights) or ``x.float()`` (compute in fp32 on purpose: rotary angles, softmax,
T5's position buckets). The graph alone cannot tell the two apart; the model's code can, by what it does next.
Hugging Face computes in the weights' dtype except in fp32 islands, and an island only meets weight-dtype values
after a cast back (``softmax(..., dtype=torch.float32).to(query.dtype)``). So: assume every such dtype is
pinned, find the ops where a pinned value would meet a weight-dtype value (``q * cos``, ``scores + mask``,
``linear(x, weight)``), and make the nearest cast or factory upstream of each follow the weights instead, until
none is left. ``torch.finfo(float32).min`` in a mask that now follows is replaced by the min of the run's dtype.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.passes._graphs import graph_modules

__all__ = ["follow_weight_dtype", "finfo_min", "finfo_max"]

_WEIGHT, _PINNED, _FIXED = "weight", "pinned", "fixed"


def finfo_min(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).min``, as a graph call (the masks' fill value in the dtype the graph runs in)."""
    return torch.finfo(dtype).min


def finfo_max(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).max``, as a graph call."""
    return torch.finfo(dtype).max


# Recorded as calls when torch.fx traces the graph's code again (unpickling): they cannot run on a Proxy.
torch.fx.wrap("finfo_min")
torch.fx.wrap("finfo_max")


def follow_weight_dtype(gm: torch.fx.GraphModule) -> PassResult:
    """Make the capture-dtype constants that stand for "the weights' dtype" read it at run time (in place, also
    in the graph's subgraph modules that hold parameters).

    Before (captured in fp32; ``cos.to(x.dtype)`` in the rotary embedding, then ``q * cos``)::

        to_5 = aten.to.dtype(mul_1, torch.float32);  mul = aten.mul.Tensor(q, to_5)

    after::

        dtype = getattr(embed_tokens_weight, 'dtype');  to_5 = aten.to.dtype(mul_1, dtype)

    ``x.float()`` feeding only fp32 math, and ``softmax(..., dtype=torch.float32)`` before its cast back, keep
    ``torch.float32``, as the model's own code does after ``model.to(torch.bfloat16)``. Needs the ``val``
    metadata torch.export records; a graph without it is left as it was.
    """
    modified = False
    for _, module in graph_modules(gm):
        if module is gm or _floating_parameter(module) is not None:
            changed = _rewrite(module)
            if changed and module is not gm:
                module.recompile()
            modified |= changed
    return PassResult(gm, modified)


def _rewrite(gm: torch.fx.GraphModule) -> bool:
    weight = _floating_parameter(gm)
    if weight is None:
        return False
    capture_dtype = gm.get_parameter(weight).dtype
    flow = _Flow(gm)
    candidates = {node for node in flow.order if _is_candidate(node, capture_dtype)}
    following: set[torch.fx.Node] = set()
    while True:
        classes = flow.classes(candidates - following, following)
        flips: set[torch.fx.Node] = set()
        for node in flow.order:
            if flow.is_mixed(node, classes):
                flips |= flow.nearest(node, classes, candidates - following)
        if not flips:
            break
        following |= flips
    if not following:
        return False
    classes = flow.classes(candidates - following, following)
    limits = {torch.finfo(capture_dtype).min: finfo_min, torch.finfo(capture_dtype).max: finfo_max}
    dtypes: dict[torch.fx.GraphModule, torch.fx.Node | None] = {}
    changed: set[torch.fx.GraphModule] = set()
    for node in flow.order:
        owner = flow.owner[node]
        wants_limits = classes.get(node) == _WEIGHT and node.op == "call_function" and _has_limit(node, limits)
        if node not in following and not wants_limits:
            continue
        if owner not in dtypes:
            dtypes[owner] = _dtype_node(owner, weight if owner is gm else None, classes)
        dtype = dtypes[owner]
        if dtype is None:
            continue
        if node in following:
            node.args, node.kwargs = _swap_dtype((node.args, node.kwargs), capture_dtype, dtype)
        if wants_limits:
            node.args, node.kwargs = _swap_limits(owner.graph, node, limits, dtype)
        changed.add(owner)
    for owner in changed - {gm}:
        owner.graph.lint()
        owner.recompile()
    return bool(changed)


class _Flow:
    """The data flow of a graph and of the bodies of its higher-order ops (``torch.no_grad`` and autocast blocks
    are captured as ``wrap_with_set_grad_enabled(False, submod, *operands)``), in execution order."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.root = gm
        self.order: list[torch.fx.Node] = []
        self.sources: dict[torch.fx.Node, list[torch.fx.Node]] = {}
        self.owner: dict[torch.fx.Node, torch.fx.GraphModule] = {}
        self._outputs: dict[torch.fx.Node, list] = {}
        self._walk(gm, None, set())

    def _walk(self, module: torch.fx.GraphModule, operands: list | None, visiting: set[int]) -> None:
        index = 0
        for node in module.graph.nodes:
            self.owner[node] = module
            if node.op == "placeholder":
                operand = operands[index] if operands is not None and index < len(operands) else None
                self.sources[node] = [operand] if isinstance(operand, torch.fx.Node) else []
                index += 1
            elif (body := _body(module, node)) is not None and id(body[0]) not in visiting:
                self._walk(body[0], body[1], visiting | {id(body[0])})
                output = next(n for n in body[0].graph.nodes if n.op == "output")
                results = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
                self._outputs[node] = results
                self.sources[node] = [r for r in results if isinstance(r, torch.fx.Node)]
            elif node.target is operator.getitem and node.args[0] in self._outputs:
                results = self._outputs[node.args[0]]
                item = results[node.args[1]] if isinstance(node.args[1], int) and node.args[1] < len(results) else None
                self.sources[node] = [item] if isinstance(item, torch.fx.Node) else []
            else:
                self.sources[node] = list(node.all_input_nodes)
            self.order.append(node)

    def _has_weights(self, node: torch.fx.Node) -> bool:
        if node.op != "call_module":
            return False
        module = self.owner[node].get_submodule(str(node.target))
        return any(param.is_floating_point() for param in module.parameters())

    def classes(self, pinned: set[torch.fx.Node], following: set[torch.fx.Node]) -> dict[torch.fx.Node, str]:
        """Each floating-point value's class: it follows the weights, is pinned by a candidate, or is fixed
        (made in the default dtype from no floating input, e.g. dropout's ``rand``). Pinned wins, as fp32 does in
        promotion with a lower precision."""
        classes: dict[torch.fx.Node, str] = {}
        for node in self.order:
            if node in following:
                classes[node] = _WEIGHT
            elif node in pinned:
                classes[node] = _PINNED
            elif self._has_weights(node) or (node.op == "get_attr" and _is_float(node)):
                classes[node] = _WEIGHT
            elif node.op == "placeholder" and not self.sources[node]:
                if _is_float(node):
                    classes[node] = _WEIGHT
            elif _carries_float(node) or node in self._outputs:
                seen = {classes.get(arg) for arg in self.sources[node]}
                classes[node] = _PINNED if _PINNED in seen else _WEIGHT if _WEIGHT in seen else _FIXED
        return classes

    def is_mixed(self, node: torch.fx.Node, classes: dict[torch.fx.Node, str]) -> bool:
        """A pinned value meets one in the weights' dtype: the model's own code never does this without a cast."""
        if node.op not in ("call_function", "call_module", "call_method") or node in self._outputs:
            return False
        if node.target is operator.getitem:
            return False
        seen = [classes.get(arg) for arg in self.sources[node]]
        return _PINNED in seen and (_WEIGHT in seen or self._has_weights(node))

    def nearest(
        self, node: torch.fx.Node, classes: dict[torch.fx.Node, str], pinned: set[torch.fx.Node]
    ) -> set[torch.fx.Node]:
        """The pinned candidates a mixed node's pinned inputs come from, walking back through pinned values."""
        found: set[torch.fx.Node] = set()
        pending = [arg for arg in self.sources[node] if classes.get(arg) == _PINNED]
        seen: set[torch.fx.Node] = set()
        while pending:
            current = pending.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in pinned:
                found.add(current)
            else:
                pending.extend(arg for arg in self.sources[current] if classes.get(arg) == _PINNED)
        return found


def _body(module: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[torch.fx.GraphModule, list] | None:
    """``(body, operands)`` of a higher-order op call whose body is a graph module: the operands follow it."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.HigherOrderOperator):
        return None
    for position, arg in enumerate(node.args):
        if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            body = getattr(module, str(arg.target), None)
            if isinstance(body, torch.fx.GraphModule):
                return body, list(node.args[position + 1 :])
    return None


def _dtype_node(
    module: torch.fx.GraphModule, weight: str | None, classes: dict[torch.fx.Node, str]
) -> torch.fx.Node | None:
    """A node giving the weights' dtype in ``module``'s graph: a parameter's, or in a higher-order op's body (which
    has none) that of an input in the weights' dtype."""
    graph = module.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    if weight is not None:
        with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(None):
            source = graph.get_attr(weight)
    else:
        source = next((n for n in placeholders if classes.get(n) == _WEIGHT and _is_float(n)), None)
        if source is None:
            return None
    with graph.inserting_after(source if weight is not None else placeholders[-1]):
        return graph.call_function(getattr, (source, "dtype"))


def _has_limit(node: torch.fx.Node, limits: dict) -> bool:
    return any(isinstance(v, float) and v in limits for v in _flat((node.args, node.kwargs)))


def _floating_parameter(gm: torch.nn.Module) -> str | None:
    """The path of ``gm``'s first floating-point parameter: the dtype the weights are in."""
    return next((name for name, param in gm.named_parameters() if param.is_floating_point()), None)


def _val(node: torch.fx.Node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _is_float(node: torch.fx.Node) -> bool:
    val = _val(node)
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _carries_float(node: torch.fx.Node) -> bool:
    """A floating-point tensor, a tuple holding one (a higher-order op's results), or a module call."""
    val = _val(node)
    if isinstance(val, (tuple, list)):
        return any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in val)
    return _is_float(node) or (val is None and node.op == "call_module")


def _is_candidate(node: torch.fx.Node, capture_dtype: torch.dtype) -> bool:
    """An aten op producing a tensor of the capture dtype that names that dtype (a cast or a factory)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    val = _val(node)
    if not isinstance(val, torch.Tensor) or val.dtype != capture_dtype:
        return False
    return any(value is capture_dtype for value in _flat((node.args, node.kwargs)))


def _flat(value) -> list:
    found: list = []
    torch.fx.node.map_aggregate(value, found.append)
    return found


def _swap_dtype(value, capture_dtype: torch.dtype, dtype: torch.fx.Node):
    return torch.fx.node.map_aggregate(value, lambda a: dtype if a is capture_dtype else a)


def _swap_limits(graph: torch.fx.Graph, node: torch.fx.Node, limits: dict, dtype: torch.fx.Node):
    def swap(value):
        if isinstance(value, float) and not isinstance(value, bool) and value in limits:
            with graph.inserting_before(node):
                call = graph.call_function(limits[value], (dtype,))
            call.meta["is_wrapped"] = True
            return call
        return value

    return torch.fx.node.map_aggregate(node.args, swap), torch.fx.node.map_aggregate(node.kwargs, swap)
