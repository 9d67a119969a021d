"""The matrix products of a compiled decode step through oneDNN on the CPU.

A decode step multiplies one token per row by every weight of the model: matrix-vector products, bound by how fast
the weights stream from memory. On the CPU, aten's ``linear`` hands them to the BLAS of torch's x86 builds (MKL),
whose few-row path streams fp32 weights at about two thirds of the rate oneDNN's ``linear`` does: the 211 products
of one SmolLM2-135M token (538 MB of weights) took 49.5 ms through ``linear`` and 31.0 ms through oneDNN on this
project's 2-core AMD EPYC (onnxruntime's own kernels: 24 ms for the whole step). Inductor would route a linear to
oneDNN itself only with ``freezing`` (weights baked in as constants, so the adapters could not change afterwards);
`cpu_linear` routes them with the weights left as inputs.

oneDNN sums in another order than the BLAS: results differ from ``linear``'s in the last bits (5.7e-6 on logits of
magnitude 15), as any compiled kernel's do. The pass is therefore applied to the compiled static-cache step only
(`fx_lntune.static_decode`); the default ``fl.generate`` keeps aten's kernels, bit for bit the eager model's.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["cpu_linear", "route_linear_to_onednn", "onednn_applies"]

_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def onednn_applies(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether oneDNN's linear takes these CPU tensors: strided, one dtype of fp32 or bf16 (bf16 where the CPU has
    it), a 2-D weight and an input of at least 2 dimensions, nothing requiring grad (the op has no backward)."""
    if weight.dim() != 2 or input.dim() < 2 or input.dtype not in _ONEDNN_DTYPES or not _MKLDNN:
        return False
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if any(t.layout != torch.strided or t.dtype != input.dtype for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return input.dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _linear_cpu(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if onednn_applies(input, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(input.contiguous(), weight.contiguous(), bias, "none", [], "")
    return torch.nn.functional.linear(input, weight, bias)


def _linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.nn.functional.linear(input, weight, bias)


_MKLDNN = torch.backends.mkldnn.is_available()
# A library op with a CPU kernel (oneDNN) and aten's linear for every other backend, not a
# ``torch.library.custom_op``: that one's Python wrapper costs ~25 us a call, 5 ms of a SmolLM2 token.
# ``torch.compile`` calls it as it is (an extern kernel), with the weight as an input.
_LIBRARY = torch.library.Library("fx_lntune", "DEF")
_LIBRARY.define("cpu_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor")
_LIBRARY.impl("cpu_linear", _linear_cpu, "CPU")
_LIBRARY.impl("cpu_linear", _linear, "CompositeExplicitAutograd")
cpu_linear = torch.ops.fx_lntune.cpu_linear.default
"""``torch.nn.functional.linear(input, weight, bias)``: through oneDNN for CPU tensors where `onednn_applies`, else
aten's ``linear``."""


@torch.library.register_fake("fx_lntune::cpu_linear")
def _(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


def route_linear_to_onednn(gm: torch.fx.GraphModule) -> PassResult:
    """Call `cpu_linear` for every ``aten.linear`` of ``gm``'s own graph (in place). Before::

        q_proj = torch.ops.aten.linear.default(hidden, model_layers_0_self_attn_q_proj_weight)

    after::

        q_proj = torch.ops.fx_lntune.cpu_linear.default(hidden, model_layers_0_self_attn_q_proj_weight)

    For a graph that runs without autograd on CPU tensors (a decode step); elsewhere the op is aten's ``linear``
    with one more call around it.
    """
    modified = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.linear.default, torch._C._nn.linear):
            node.target = cpu_linear
            modified = True
    if modified:
        gm.recompile()
    return PassResult(gm, modified)
