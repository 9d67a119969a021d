"""Call the hot aten ops of a captured graph through torch's own Python bindings instead of ``torch.ops``.

An exported graph calls ``torch.ops.aten.linear.default(x, w)``: each call runs ``OpOverload.__call__`` (a Python
frame) and the generic schema-driven argument parsing of ``torch.ops``, a microsecond or two more per op than
the ``torch.nn.functional.linear`` an eager model calls, which goes to the same kernel. A decoder step of a
30-layer model runs over a thousand such ops per token, so that is a few percent of its time.
"""

from __future__ import annotations

import operator

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.passes._graphs import graph_modules

__all__ = ["call_torch_functions"]

_ATEN = torch.ops.aten
# The overload -> the binding that takes the same arguments (names and order: both are generated from the schema)
# and resolves to that overload for them.
_FUNCTIONS = {
    _ATEN.linear.default: torch._C._nn.linear,
    _ATEN.silu.default: torch._C._nn.silu,
    _ATEN.scaled_dot_product_attention.default: torch._C._nn.scaled_dot_product_attention,
    _ATEN.embedding.default: torch.embedding,
    _ATEN.mul.Tensor: torch.mul,
    _ATEN.add.Tensor: torch.add,
    _ATEN.neg.default: torch.neg,
    _ATEN.cat.default: torch.cat,
    _ATEN.cos.default: torch.cos,
    _ATEN.sin.default: torch.sin,
    _ATEN.transpose.int: torch.transpose,
    _ATEN.reshape.default: torch.reshape,
    _ATEN.unsqueeze.default: torch.unsqueeze,
}
# Overloads taken positionally by a tensor method of the same meaning.
_METHODS = {_ATEN.view.default: "view", _ATEN.expand.default: "expand", _ATEN.sym_size.int: "size"}
_END = 2**62  # a slice end at or past this is export's "to the end" (sys.maxsize)


def call_torch_functions(gm: torch.fx.GraphModule) -> PassResult:
    """Replace the calls of common aten overloads by the torch function, tensor method or indexing that runs the
    same overload (in place; other ops stay as they are). Before::

        linear = torch.ops.aten.linear.default(x, w)
        view = torch.ops.aten.view.default(linear, [b, s, -1, 64])
        slice_1 = torch.ops.aten.slice.Tensor(view, 3, 0, 32)

    after::

        linear = torch._C._nn.linear(x, w)
        view = linear.view([b, s, -1, 64])
        slice_1 = view[(slice(None, None, None), slice(None, None, None), slice(None, None, None), slice(0, 32, None))]

    The same kernels on the same arguments: outputs are bit for bit the same. For a graph run as Python code;
    `torch.compile` and the exporters take either form.
    """
    modified = False
    for _, module in graph_modules(gm):
        for node in module.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in _FUNCTIONS:
                node.target = _FUNCTIONS[node.target]
            elif node.target in _METHODS and not node.kwargs:
                node.op, node.target = "call_method", _METHODS[node.target]
            elif node.target is _ATEN.slice.Tensor and _as_index(node) is not None:
                node.target, node.args, node.kwargs = operator.getitem, (node.args[0], _as_index(node)), {}
            else:
                continue
            modified = True
    return PassResult(gm, modified)


def _as_index(node: torch.fx.Node) -> tuple[slice, ...] | None:
    """``aten.slice(x, dim, start, end, step)`` as the index ``x[:, ..., start:end:step]``, for a constant
    ``dim >= 0`` and step; None where it cannot be written so."""
    names = ("dim", "start", "end", "step")
    defaults = dict(zip(names, (0, None, None, 1), strict=True))
    values = {**defaults, **dict(zip(names, node.args[1:], strict=False)), **node.kwargs}
    dim, start, end, step = (values[name] for name in names)
    if set(node.kwargs) - set(names) or not isinstance(dim, int) or dim < 0 or not isinstance(step, int):
        return None
    if isinstance(end, int) and end >= _END:
        end = None
    return (*(slice(None),) * dim, slice(start, end, None if step == 1 else step))
