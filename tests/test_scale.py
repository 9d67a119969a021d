"""Capture on the meta device and materialize from a checkpoint: the path for models too large to build twice."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import transformers
from accelerate import init_empty_weights
from conftest import captured
from models import make_config, make_inputs
from safetensors.torch import load_file

import fx_lntune as fl
from fx_lntune.materialize import materialize

OTHER_SHAPE = {"batch": 3, "seq": 5, "seed": 1}

pytestmark = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x's llama rotary embedding enters torch.autocast(device_type=x.device.type), and torch "
    "rejects device_type='meta' (RuntimeError: unsupported scalarType), so a meta llama cannot be captured there",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The tiny llama's state dict as save_pretrained wrote it (safetensors, the model's own keys)."""
    directory = tmp_path_factory.mktemp("llama")
    captured("llama")[0].save_pretrained(directory)
    return load_file(directory / "model.safetensors")


def _meta_capture(parameters_only: bool) -> torch.fx.GraphModule:
    """The tiny llama captured without weights: parameters on meta, and buffers too unless ``parameters_only``."""
    return copy.deepcopy(_cached_meta_capture(parameters_only))


@functools.cache
def _cached_meta_capture(parameters_only: bool) -> torch.fx.GraphModule:
    config = make_config("llama")
    if parameters_only:
        with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) computed on the CPU
            model = transformers.LlamaForCausalLM(config)
    else:
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
    return fl.lntune_transform(model.eval(), fl.LNTuningConfig())


def _state(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}


def test_meta_capture_then_materialize_equals_a_normal_capture(checkpoint):
    model, reference = captured("llama")
    gm = _meta_capture(parameters_only=True)
    assert any(param.is_meta for param in gm.parameters())

    assert materialize(gm, checkpoint) == []
    assert not any(tensor.is_meta for tensor in _state(gm).values())
    assert gm.state_dict().keys() == reference.state_dict().keys()
    for name, param in reference.named_parameters():
        assert gm.get_parameter(name).requires_grad == param.requires_grad, name
    for path in fl.targeted_module_names(gm):  # copies start from the loaded base, in storage of their own
        base, copy = gm.get_submodule(f"{path}.base_layer"), gm.get_submodule(f"{path}.ln_tuning_layers.default")
        assert torch.equal(copy.weight, model.get_submodule(path).weight)
        assert copy.weight.data_ptr() != base.weight.data_ptr()
    inputs = make_inputs("llama", **OTHER_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs)["logits"], reference(**inputs)["logits"], atol=0, rtol=0)

    gm(**inputs)["logits"].sum().backward()  # trains like a normal capture: only the adapter gets gradients
    assert {name for name, p in gm.named_parameters() if p.grad is not None} == {
        name for name, p in reference.named_parameters() if p.requires_grad
    }


def test_graph_keys_and_trained_adapters_load_too(checkpoint):
    _, reference = captured("llama")
    path = fl.targeted_module_names(reference)[0]
    with torch.no_grad():
        reference.get_submodule(f"{path}.ln_tuning_layers.default").weight.mul_(2)
    gm = _meta_capture(parameters_only=True)
    assert materialize(gm, reference.state_dict()) == []
    for name, value in reference.state_dict().items():
        assert torch.equal(gm.state_dict()[name], value), name


@pytest.mark.parametrize("problem", ["missing buffer", "missing weight", "wrong shape"])
def test_a_state_dict_that_does_not_fit_raises_and_changes_nothing(checkpoint, problem):
    gm = _meta_capture(parameters_only=problem != "missing buffer")
    state = dict(checkpoint)
    if problem == "missing weight":
        del state["model.layers.1.mlp.up_proj.weight"]
    elif problem == "wrong shape":
        state["model.norm.weight"] = torch.ones(7)
    before = {name: id(tensor) for name, tensor in _state(gm).items()}
    expected = {"missing buffer": "inv_freq", "missing weight": "up_proj", "wrong shape": "model.norm.weight"}[problem]
    with pytest.raises(fl.LNTuneStateError, match=expected):
        materialize(gm, state)
    assert {name: id(tensor) for name, tensor in _state(gm).items()} == before


def test_buffers_given_in_the_state_dict_complete_a_full_meta_capture(checkpoint):
    model, reference = captured("llama")
    gm = _meta_capture(parameters_only=False)
    buffers = {name: buffer for name, buffer in model.named_buffers()}
    assert materialize(gm, {**checkpoint, **buffers}) == []
    inputs = make_inputs("llama", **OTHER_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs)["logits"], reference(**inputs)["logits"], atol=0, rtol=0)
