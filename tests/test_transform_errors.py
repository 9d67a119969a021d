"""Bad input to lntune_transform: our own error class, a message that says what to do, and nothing changed."""

from __future__ import annotations

import pytest
import torch
from models import make_inputs, make_model

import fx_lntune as fl


class DataDependent(torch.nn.Module):
    """A module no front-end can capture: Python control flow on a tensor's value."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.norm(x)
        return x


def _snapshot(model):
    return {
        name: (t.detach().clone(), getattr(t, "requires_grad", False))
        for name, t in model.state_dict(keep_vars=True).items()
    }


def _assert_unchanged(model, snapshot):
    now = model.state_dict(keep_vars=True)
    assert now.keys() == snapshot.keys()
    for name, (value, requires_grad) in snapshot.items():
        assert torch.equal(now[name], value) and getattr(now[name], "requires_grad", False) == requires_grad, name


@pytest.mark.parametrize(
    ("config", "error", "words"),
    [
        (dict(target_modules=["no_such_norm"]), fl.LNTuneConfigError, ["input_layernorm", "no_such_norm"]),
        (dict(target_modules="(unclosed"), fl.LNTuneConfigError, ["regex"]),
        (dict(target_modules=[3]), fl.LNTuneConfigError, ["target_modules"]),
        (
            dict(target_modules=["input_layernorm"], exclude_modules=["input_layernorm"]),
            fl.LNTuneConfigError,
            ["excluded"],
        ),
    ],
)
def test_bad_config_is_refused_and_model_unchanged(config, error, words):
    model = make_model("llama")
    snapshot = _snapshot(model)
    with pytest.raises(error) as caught:
        fl.lntune_transform(model, fl.LNTuningConfig(**config), example_inputs=make_inputs("llama"))
    assert isinstance(caught.value, fl.LNTuneError)
    for word in words:
        assert word.lower() in str(caught.value).lower()
    _assert_unchanged(model, snapshot)


def test_unknown_tracer():
    model = make_model("bert")
    with pytest.raises(fl.LNTuneTraceError, match="unknown tracer 'jit'.*auto, export, hf_fx, fx"):
        fl.lntune_transform(model, fl.LNTuningConfig(), tracer="jit", example_inputs=make_inputs("bert"))


@pytest.mark.parametrize("not_a_model", [None, "bert", {"weight": torch.ones(2)}])
def test_not_a_module(not_a_model):
    with pytest.raises(fl.LNTuneTraceError, match="needs a torch.nn.Module"):
        fl.lntune_transform(not_a_model, fl.LNTuningConfig())


@pytest.mark.parametrize("tracer", ["fx", "export", "auto"])
def test_uncapturable_model_names_front_end_class_and_failing_call(tracer):
    model = DataDependent()
    snapshot = _snapshot(model)
    with pytest.raises(fl.LNTuneTraceError) as caught:
        fl.lntune_transform(model, fl.LNTuningConfig(), tracer=tracer, example_inputs={"x": torch.randn(2, 3, 4)})
    message = str(caught.value)
    assert "DataDependent" in message and "in forward()" in message and "x.sum() > 0" in message
    assert "Try tracer=" in message
    for name in ["fx", "export"] if tracer == "auto" else [tracer]:
        assert f"tracer='{name}'" in message
    _assert_unchanged(model, snapshot)
    assert model.training


def test_hf_fx_without_transformers_utils_fx_says_so():
    from fx_lntune.capture import hf_fx_available

    if hf_fx_available():
        pytest.skip("transformers < 5 has transformers.utils.fx")
    with pytest.raises(fl.LNTuneTraceError, match="transformers 5 removed.*tracer='export'"):
        fl.lntune_transform(make_model("bert"), fl.LNTuningConfig(), tracer="hf_fx", example_inputs=make_inputs("bert"))


def test_example_inputs_must_be_keyword_dict():
    with pytest.raises(fl.LNTuneTraceError, match="dict of keyword inputs"):
        fl.lntune_transform(make_model("bert"), fl.LNTuningConfig(), example_inputs=[torch.ones(2, 3)])


@pytest.mark.parametrize("name", ["", "a.b", "a/b", "..", 3])
def test_bad_adapter_name_at_transform(name):
    with pytest.raises(fl.LNTuneAdapterError):
        fl.lntune_transform(
            make_model("bert"), fl.LNTuningConfig(), adapter_name=name, example_inputs=make_inputs("bert")
        )
