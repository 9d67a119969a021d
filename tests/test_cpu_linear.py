"""passes.cpu_linear: the static-cache decode step's linears through oneDNN on the CPU, the default step's untouched.

The op must give ``linear``'s result (to float rounding) for every input a decoder step passes it, and aten's own
``linear`` bit for bit where oneDNN does not apply; the pass must touch the compiled static step only.
"""

from __future__ import annotations

import pytest
import torch
from models import make_model, perturb_adapter

import fx_lntune as fl
from fx_lntune import generation, static_decode
from fx_lntune.passes.cpu_linear import cpu_linear, onednn_applies, route_linear_to_onednn

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


def _tensors(shape, out_features=48, dtype=torch.float32, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator).to(dtype)
    w = torch.randn(out_features, shape[-1], generator=generator).to(dtype)
    b = torch.randn(out_features, generator=generator).to(dtype) if bias else None
    return x, w, b


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 64), (1, 1, 64), (3, 5, 64), (2, 1, 1, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear_in_fp32(shape, bias):
    x, w, b = _tensors(shape, bias=bias)
    assert onednn_applies(x, w, b)
    out = cpu_linear(x, w, b)
    expected = torch.nn.functional.linear(x, w, b)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_non_contiguous_input_and_weight():
    x, w, b = _tensors((4, 64, 3))
    x = x.transpose(1, 2)  # (4, 3, 64), not contiguous
    w = torch.randn(64, 48).t()  # (48, 64), a transposed view
    torch.testing.assert_close(cpu_linear(x, w, b), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 in oneDNN")
def test_matches_linear_in_bf16():
    x, w, b = _tensors((2, 3, 64), dtype=torch.bfloat16)
    out = cpu_linear(x, w, b)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    "case",
    ["float64", "one-dimensional input", "mixed dtypes", "requires grad"],
)
def test_falls_back_to_atens_linear_bit_for_bit(case):
    x, w, b = _tensors((2, 3, 64))
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    elif case == "one-dimensional input":
        x = x[0, 0]
    elif case == "mixed dtypes":
        b = b.double()
        with pytest.raises(RuntimeError):  # aten's own error, as for linear
            torch.nn.functional.linear(x, w, b)
        with pytest.raises(RuntimeError):
            cpu_linear(x, w, b)
        return
    else:
        w.requires_grad_(True)  # with grad enabled: the op has no backward, so oneDNN is not taken
    assert not onednn_applies(x, w, b)
    assert torch.equal(cpu_linear(x, w, b).detach(), torch.nn.functional.linear(x, w, b).detach())


def test_meta_tensors_give_the_shape():
    x, w, b = (t.to("meta") for t in _tensors((2, 3, 64)))
    out = cpu_linear(x, w, b)
    assert out.device.type == "meta" and out.shape == (2, 3, 48)


def _tiny_llama() -> torch.fx.GraphModule:
    gm = fl.lntune_transform(make_model("llama", depth=2), fl.LNTuningConfig())
    perturb_adapter(gm, "default", seed=1)
    return gm.eval()


def _linears(gm: torch.fx.GraphModule) -> dict[str, int]:
    targets = [node.target for module in gm.modules() if isinstance(module, torch.fx.GraphModule)
               for node in module.graph.nodes if node.op == "call_function"]  # fmt: skip
    return {
        "aten": sum(t in (torch.ops.aten.linear.default, torch._C._nn.linear) for t in targets),
        "onednn": sum(t is cpu_linear for t in targets),
    }


def test_pass_rewrites_a_graphs_linears_and_keeps_its_outputs():
    gm = _tiny_llama()
    ids = torch.randint(4, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = gm(input_ids=ids).logits
    plain = _linears(gm)["aten"]
    assert plain > 0
    layer_graphs = [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    for module in layer_graphs:
        route_linear_to_onednn(module)
    assert _linears(gm) == {"aten": 0, "onednn": plain}
    torch.testing.assert_close(gm(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-5)
    assert not route_linear_to_onednn(layer_graphs[0]).modified  # nothing left to rewrite


def test_only_the_static_step_calls_onednn():
    """The static step's linears go through oneDNN on the CPU; the default step graphs (what fl.generate runs
    without a static cache, bit for bit the eager model's kernels) keep aten's linear."""
    gm = _tiny_llama()
    prompt = {"input_ids": torch.randint(4, 99, (2, 6), generator=torch.Generator().manual_seed(3))}
    greedy = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    default = fl.generate(gm, **prompt, **greedy)
    static = fl.generate(gm, **prompt, **greedy, cache_implementation="static", disable_compile=True)
    assert torch.equal(static, default)
    decoder = generation.decoder_for(gm)
    steps = static_decode._STATIC[decoder].graphs
    assert steps and all(_linears(step)["onednn"] > 0 and _linears(step)["aten"] == 0 for step in steps.values())
    for name in steps:
        assert _linears(decoder.graph(name))["onednn"] == 0
        assert _linears(decoder.graph(name))["aten"] > 0


def test_compiles_as_an_extern_kernel():
    """Inductor takes the op with the weight as an input (its own oneDNN linear would need frozen weights)."""
    x, w, b = _tensors((1, 1, 64))

    def mlp(x, w, b):
        return torch.nn.functional.silu(cpu_linear(x, w, b)) * 2

    compiled = torch.compile(mlp, backend="inductor", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), mlp(x, w, b))
    w2 = torch.randn_like(w)  # another weight, same shapes: the compiled code reads it, nothing baked in
    torch.testing.assert_close(compiled(x, w2, b), mlp(x, w2, b))
