"""What changed between transformers releases and is handled in `fx_lntune.compat`: seq2seq configs without a
decoder start id (transformers 5.2x configs raise for fields they do not hold), per-layer kernel wrappers that
must not stop the shortened capture, and the log line that says when it is lost."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn
import transformers
from models import _SPECS, make_inputs, make_labels, make_model

import fx_lntune as fl
from fx_lntune.capture.layers import layer_runs
from fx_lntune.compat import is_stateless_function_module, model_token_id


def _without_start_id(arch: str) -> nn.Module:
    """A tiny seq2seq model whose config was built without ``decoder_start_token_id`` (the usual way)."""
    config_class, model_class, kwargs = _SPECS[arch]
    kwargs = {key: value for key, value in kwargs.items() if key != "decoder_start_token_id"}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return getattr(transformers, model_class)(getattr(transformers, config_class)(**kwargs)).eval()


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_config_without_decoder_start_id_captures_and_runs_as_the_model(arch):
    model = _without_start_id(arch)
    gm = fl.lntune_transform(copy.deepcopy(model), fl.LNTuningConfig()).eval()
    inputs = make_inputs(arch)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits)


def test_labels_without_a_decoder_start_id_are_refused_by_name():
    model = _without_start_id("t5")
    assert model_token_id(model, "decoder_start_token_id") is None
    inputs = make_inputs("t5")
    labels = make_labels("t5", inputs)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(fl.LNTuneError, match="decoder_start_token_id"):
        fl.lntune_transform(
            model, fl.LNTuningConfig(), example_inputs={"input_ids": inputs["input_ids"], "labels": labels}
        )
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    gm = fl.lntune_transform(model, fl.LNTuningConfig())
    with pytest.raises(fl.LNTuneError, match="decoder_start_token_id"):
        gm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels)


def test_a_start_id_in_the_generation_config_is_used_for_labels_only_input():
    model = _without_start_id("t5")
    model.generation_config.decoder_start_token_id = 0
    assert model_token_id(model, "decoder_start_token_id") == 0
    inputs = make_inputs("t5")
    labels = make_labels("t5", inputs)
    example = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}
    gm = fl.lntune_transform(copy.deepcopy(model), fl.LNTuningConfig(), example_inputs=example).eval()
    reference = make_model("t5")  # the same weights with the id in its config: the model derives the inputs
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(gm(**example).loss, reference(**example).loss)


def test_a_function_wrapper_module_is_alike_by_class_not_by_identity():
    class Func(nn.Module):
        def forward(self, x):
            return x

    class Other(nn.Module):
        def forward(self, x):
            return -x

    assert is_stateless_function_module(Func()) and not is_stateless_function_module(nn.Linear(2, 2))
    hooked = Func()
    hooked.register_forward_hook(lambda module, args, output: output)
    assert not is_stateless_function_module(hooked)

    model = make_model("llama", depth=6)
    for layer in model.model.layers:  # as transformers 5.2x's kernels integration does, one object per layer
        layer.self_attn._wrapped_funcs = {"rotary": Func()}
    assert layer_runs(model)
    model.model.layers[4].self_attn._wrapped_funcs = {"rotary": Other()}
    assert layer_runs(model) == []


def test_losing_the_shortened_capture_is_logged_with_the_reason(caplog):
    model = make_model("llama", depth=6)
    model.model.layers[3].mlp.act_fn = torch.nn.GELU()
    with caplog.at_level(logging.INFO, logger="fx_lntune.capture.layers"):
        assert layer_runs(model) == []
    assert "layers 3 and 5 differ" in caplog.text and "act_fn" in caplog.text


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_the_llama_family_takes_the_shortened_capture(arch):
    runs = layer_runs(make_model(arch, depth=6))
    assert [(run.first, run.captured, run.total) for run in runs] == [(0, 3, 6)]
