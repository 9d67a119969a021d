"""The `transformers.utils.fx` front-end (transformers < 5) on the architectures its own `symbolic_trace` refuses.

HF's tracer fails on a root `forward(..., **kwargs)` behind a decorator and on `masking_utils`' vmapped mask
builders; `capture_hf_fx` traces a stand-in with an explicit signature and keeps each mask builder call as one
`hf_attention_mask` node. Every graph must target what the export front-end targets and reproduce the eager
model at another batch and length than the capture's.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import captured
from models import make_inputs, make_model

import fx_lntune as fl
from fx_lntune import capture
from fx_lntune.capture import hf_fx_available
from fx_lntune.passes._graphs import leaf_calls

pytestmark = pytest.mark.skipif(not hf_fx_available(), reason="transformers.utils.fx exists only in transformers < 5")

# The ten architectures hf_fx could not capture before (bert, roberta, distilbert, bart: tests/test_transform.py).
NEWLY_CAPTURED = ["gpt2", "llama", "mistral", "qwen2", "gemma2", "opt", "bloom", "t5", "vit", "whisper"]
OTHER_SHAPE = {"batch": 3, "seq": 5, "seed": 1}


def _assert_same_outputs(ours, reference, atol: float = 1e-5) -> None:
    ours = {key: value for key, value in ours.items() if isinstance(value, torch.Tensor)}
    assert ours
    for key, value in ours.items():
        torch.testing.assert_close(value, reference[key], atol=atol, rtol=1e-4, msg=key)


def _eager(model, inputs):
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    return model(**inputs, **no_cache)


@pytest.mark.parametrize("arch", NEWLY_CAPTURED)
def test_hf_fx_targets_what_export_targets_and_matches_eager_at_another_shape(arch):
    model, gm = captured(arch, tracer="hf_fx")
    _, exported = captured(arch)
    assert gm.meta["fx_lntune"].tracer == "hf_fx"
    assert fl.targeted_module_names(gm) == fl.targeted_module_names(exported)
    called = set(leaf_calls(gm))  # the root graph and its layer graphs
    assert set(fl.targeted_module_names(gm)) <= called
    inputs = make_inputs(arch, **OTHER_SHAPE)
    with torch.no_grad():
        _assert_same_outputs(gm(**inputs), _eager(model, inputs))
        _assert_same_outputs(gm(**inputs), exported(**inputs))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_mask_builders_are_one_node_each_and_right_without_padding(arch):
    """Without padding sdpa's builder returns None (is_causal); the node's causal mask must mean the same."""
    model, gm = captured(arch, tracer="hf_fx")
    masks = [node for node in gm.graph.nodes if node.target is capture.fx.hf_attention_mask]
    builders = {node.args[0] for node in masks}
    expected = {"create_causal_mask"} | ({"create_sliding_window_causal_mask"} if arch == "gemma2" else set())
    assert builders == expected and len(masks) == len(expected)
    for batch, seq in [(1, 6), (3, 4)]:
        inputs = make_inputs(arch, batch=batch, seq=seq, seed=2)
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
        with torch.no_grad():
            _assert_same_outputs(gm(**inputs), _eager(model, inputs))


def test_capture_leaves_model_and_transformers_as_they_were():
    from transformers import masking_utils
    from transformers.models.llama import modeling_llama

    model = make_model("llama")
    modules = [name for name, _ in model.named_modules()]
    state = {name: value.clone() for name, value in model.state_dict().items()}
    fl.lntune_transform(model, fl.LNTuningConfig(), tracer="hf_fx", example_inputs=make_inputs("llama"))
    assert type(model).__name__ == "LlamaForCausalLM" and type(model).__module__ == modeling_llama.__name__
    assert "forward" not in vars(model)
    assert [name for name, _ in model.named_modules()] == modules
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())
    assert modeling_llama.create_causal_mask is masking_utils.create_causal_mask


def test_auto_still_tries_export_first_and_falls_back_to_hf_fx(monkeypatch):
    assert capture._auto_order(make_model("llama")) == ["export", "hf_fx"]

    def refuse(*args, **kwargs):
        raise fl.LNTuneTraceError("tracer='export' could not capture it (simulated)")

    monkeypatch.setitem(capture._FRONTENDS, "export", refuse)
    model = make_model("llama")
    gm = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=make_inputs("llama"))
    assert gm.meta["fx_lntune"].tracer == "hf_fx"
    inputs = make_inputs("llama", **OTHER_SHAPE)
    with torch.no_grad():
        _assert_same_outputs(gm(**inputs), _eager(model, inputs))
