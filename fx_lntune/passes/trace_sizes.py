"""Keep a graph's shape arithmetic alive under `torch.jit.trace`, so that a traced module stays dynamic in shape."""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.passes._graphs import graph_modules

__all__ = ["trace_sizes", "frozen_size_users"]

_aten = torch.ops.aten


def _slice(tensor: torch.Tensor, dim: int = 0, start=None, end=None, step: int = 1) -> torch.Tensor:
    """``aten.slice.Tensor`` through indexing, which `torch.jit.trace` records with traced bounds."""
    dim = dim % tensor.dim()
    return tensor[(slice(None),) * dim + (slice(start, end, step),)]


def _full(size, fill_value, **options) -> torch.Tensor:
    """``aten.full.default``; a bool fill becomes an int, which TorchScript's ``aten::full`` takes as a Scalar."""
    return torch.full(size, int(fill_value) if isinstance(fill_value, bool) else fill_value, **options)


# aten overloads that take sizes -> their Python-level twins, which the tracer records with traced sizes.
PYTHON_TWINS = {
    _aten.view.default: torch.Tensor.view,
    _aten.reshape.default: torch.reshape,
    _aten._unsafe_view.default: torch.reshape,
    _aten.expand.default: torch.Tensor.expand,
    _aten.repeat.default: torch.Tensor.repeat,
    _aten.slice.Tensor: _slice,
    _aten.arange.default: torch.arange,
    _aten.arange.start: torch.arange,
    _aten.arange.start_step: torch.arange,
    _aten.zeros.default: torch.zeros,
    _aten.ones.default: torch.ones,
    _aten.full.default: _full,
    _aten.empty.memory_format: torch.empty,
    _aten.new_zeros.default: torch.Tensor.new_zeros,
    _aten.new_ones.default: torch.Tensor.new_ones,
}
# Python arithmetic on sizes works on the traced sizes as it is.
_ARITHMETIC = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.floordiv,
    operator.mod,
    operator.neg,
    operator.truediv,
}


def trace_sizes(gm: torch.fx.GraphModule) -> PassResult:
    """Make sizes traced values (in place, in ``gm`` and every graph submodule of it).

    `torch.jit.trace` freezes any Python int it sees into a constant, and ``torch.ops.aten`` calls read their
    size arguments as ints. ``x.size(d)`` under the tracer is a traced value instead, and the public Python
    functions (``torch.arange``, ``Tensor.view``, indexing, ...) record such values as inputs. Before::

        sym_size_int = torch.ops.aten.sym_size.int(input_ids, 1)
        arange = torch.ops.aten.arange.default(sym_size_int, device=device(type='cpu'))

    after::

        size = input_ids.size(1)
        arange = torch.arange(size, device=device(type='cpu'))

    An aten op without a twin keeps its frozen size: `frozen_size_users` names them.
    """
    modified = False
    for _, module in graph_modules(gm):
        graph = module.graph
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target is _aten.sym_size.int:
                with graph.inserting_before(node):
                    size = graph.call_method("size", node.args, node.kwargs)
                size.meta = dict(node.meta)
                node.replace_all_uses_with(size)
                graph.erase_node(node)
                modified = True
        for node in _size_users(graph):
            if node.target in PYTHON_TWINS:
                node.target = PYTHON_TWINS[node.target]
                modified = True
        if module is not gm:
            graph.lint()
            module.recompile()
    return PassResult(gm, modified)


def frozen_size_users(gm: torch.fx.GraphModule) -> list[str]:
    """The ops of ``gm`` (and its graph submodules) that take a size `trace_sizes` cannot keep traced."""
    twins = set(PYTHON_TWINS.values())
    frozen = set()
    for _, module in graph_modules(gm):
        frozen |= {_name(node.target) for node in _size_users(module.graph) if node.target not in twins}
    return sorted(frozen)


def _name(target) -> str:
    if isinstance(target, str) or isinstance(target, torch._ops.OpOverload):
        return str(target)
    return f"{getattr(target, '__module__', None) or ''}.{getattr(target, '__qualname__', repr(target))}".lstrip(".")


def _size_users(graph: torch.fx.Graph) -> list[torch.fx.Node]:
    """Nodes that take a size, directly or through Python arithmetic on sizes (not the arithmetic itself)."""
    sizes = [node for node in graph.nodes if _is_size(node)]
    seen = set(sizes)
    users = []
    while sizes:
        for user in sizes.pop().users:
            if user in seen:
                continue
            seen.add(user)
            if user.op == "call_function" and user.target in _ARITHMETIC:
                sizes.append(user)
            elif user.op != "output":
                users.append(user)
    return users


def _is_size(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is _aten.sym_size.int) or (
        node.op == "call_method" and node.target == "size" and len(node.args) == 2
    )
