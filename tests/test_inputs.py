"""fx_lntune.inputs: default input names, dummy inputs and dynamic-shape specs, on every fixture model."""

from __future__ import annotations

import pytest
import torch
from models import ALL_ARCHITECTURES, make_inputs, make_model
from torch.export import Dim

from fx_lntune.errors import LNTuneTraceError
from fx_lntune.inputs import default_input_names, dynamic_shapes_for, make_dummy_inputs

TEXT = ["input_ids", "attention_mask"]
EXPECTED_NAMES = {
    "bert": TEXT,
    "roberta": TEXT,
    "distilbert": TEXT,
    "albert": TEXT,
    "gpt2": TEXT,
    "llama": TEXT,
    "mistral": TEXT,
    "qwen2": TEXT,
    "gemma2": TEXT,
    "opt": TEXT,
    "bloom": TEXT,
    "t5": [*TEXT, "decoder_input_ids"],
    "bart": [*TEXT, "decoder_input_ids"],
    "vit": ["pixel_values"],
    "whisper": ["input_features", "decoder_input_ids"],
    "llava": [*TEXT, "pixel_values"],
}
AUTO2 = {0: Dim.AUTO, 1: Dim.AUTO}


def test_every_fixture_architecture_has_expected_names():
    assert sorted(EXPECTED_NAMES) == sorted(ALL_ARCHITECTURES)


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_default_input_names(arch):
    names = default_input_names(make_model(arch))
    assert names == EXPECTED_NAMES[arch]
    # The fixture's inputs are what a user passes: the library must ask for exactly those.
    assert set(names) == set(make_inputs(arch))


@pytest.mark.parametrize("arch", ALL_ARCHITECTURES)
def test_dummy_inputs_match_user_inputs_and_run(arch):
    model = make_model(arch)
    names = default_input_names(model)
    dummy = make_dummy_inputs(model, names, batch=3, seq=5)
    user = make_inputs(arch, batch=3, seq=5)

    assert list(dummy) == names
    for name, value in dummy.items():  # same shapes and dtypes as real inputs of the same batch and length
        assert value.shape == user[name].shape, name
        assert value.dtype == user[name].dtype, name
    for name in ("input_ids", "decoder_input_ids"):
        if name in dummy:
            vocab = model.config.get_text_config().vocab_size
            assert 0 <= int(dummy[name].min()) and int(dummy[name].max()) < vocab
    if "attention_mask" in dummy:
        assert dummy["attention_mask"][0, -1] == 0 and bool(dummy["attention_mask"][1:].all())
    assert all(torch.equal(dummy[n], again) for n, again in make_dummy_inputs(model, names, 3, 5).items())

    with torch.no_grad():
        logits = model(**dummy).logits
    assert logits.shape == model(**user).logits.shape
    assert torch.isfinite(logits).all()


def test_llava_dummy_input_ids_hold_one_image_token_per_image_feature():
    model = make_model("llava")
    dummy = make_dummy_inputs(model, default_input_names(model), batch=2, seq=6)
    n_image = model.config.image_seq_length
    assert dummy["input_ids"].shape == (2, n_image + 6)
    assert ((dummy["input_ids"] == model.config.image_token_index).sum(dim=1) == n_image).all()


def test_dummy_float_inputs_follow_model_dtype():
    model = make_model("vit").to(torch.float64)
    assert make_dummy_inputs(model, ["pixel_values"])["pixel_values"].dtype == torch.float64


class _Plain(torch.nn.Module):
    def forward(self, x, y, z=None, *, w, **extra):
        return x


@pytest.mark.parametrize(
    "model, names, match",
    [
        (_Plain(), ["x"], "'x'"),  # no config at all
        ("bert", ["labels"], "'labels'"),  # a name we do not know how to make
        ("bert", ["input_features"], "num_mel_bins"),  # a config field the model does not have
    ],
)
def test_dummy_inputs_it_cannot_make_raise_trace_error(model, names, match):
    model = make_model(model) if isinstance(model, str) else model
    with pytest.raises(LNTuneTraceError, match=match) as info:
        make_dummy_inputs(model, names)
    assert "example_inputs=" in str(info.value)


@pytest.mark.parametrize("batch, seq", [(1, 8), (2, 1)])
def test_dummy_inputs_refuse_size_one_dims(batch, seq):
    with pytest.raises(ValueError, match="at least 2"):
        make_dummy_inputs(make_model("bert"), TEXT, batch=batch, seq=seq)


def test_plain_module_names_are_required_keyword_parameters():
    assert default_input_names(_Plain()) == ["x", "y", "w"]


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("input_ids", torch.zeros(2, 8, dtype=torch.long), AUTO2),
        ("attention_mask", torch.ones(2, 8, dtype=torch.long), AUTO2),
        ("token_type_ids", torch.zeros(2, 8, dtype=torch.long), AUTO2),
        ("position_ids", torch.zeros(2, 8, dtype=torch.long), AUTO2),
        ("decoder_input_ids", torch.zeros(2, 8, dtype=torch.long), AUTO2),
        ("decoder_attention_mask", torch.ones(2, 8, dtype=torch.long), AUTO2),
        ("inputs_embeds", torch.zeros(2, 8, 32), AUTO2),
        ("labels", torch.zeros(2, 8, dtype=torch.long), AUTO2),
        ("labels", torch.zeros(2, dtype=torch.long), {0: Dim.AUTO}),
        ("pixel_values", torch.zeros(2, 3, 16, 16), {0: Dim.AUTO}),
        ("input_features", torch.zeros(2, 8, 32), {0: Dim.AUTO}),
        ("something_else", torch.zeros(2, 8), {0: Dim.AUTO}),
        ("scale", torch.tensor(1.0), {}),
        ("use_cache", False, None),
        ("past_key_values", None, None),
    ],
)
def test_dynamic_shapes_for(name, value, expected):
    assert dynamic_shapes_for({name: value}) == {name: expected}


@pytest.mark.parametrize("arch", ["bert", "whisper"])
def test_spec_captures_a_graph_that_takes_other_batch_and_length(arch):
    model = make_model(arch)
    model.config.use_cache = False  # a cache object in the output cannot be exported
    inputs = make_inputs(arch)
    program = torch.export.export(model, (), inputs, strict=False, dynamic_shapes=dynamic_shapes_for(inputs))
    other = make_inputs(arch, batch=3, seq=5, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**other).logits, model(**other).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "arch, expected",
    [
        ("bert", {"attention_mask": "default_mask", "token_type_ids": "default_token_type_ids"}),
        ("llama", {"position_ids": "arange"}),
        ("roberta", {"position_ids": "padding_offset"}),  # RoBERTa counts positions after its padding id
        ("opt", {"position_ids": "mask_cumsum"}),  # OPT's positions follow the attention mask
        ("gpt2", {"token_type_ids": None}),  # GPT-2 adds no segment embedding without them: not reproducible
        ("t5", {"decoder_input_ids": "default_decoder_input_ids", "decoder_attention_mask": "default_mask"}),
        ("vit", {"attention_mask": None, "position_ids": None}),
    ],
)
def test_plan_takes_each_optional_input_whose_default_reproduces_the_model(arch, expected):
    from fx_lntune.inputs import plan_inputs

    plan = plan_inputs(make_model(arch), make_inputs(arch))
    for name, rule in expected.items():
        if rule is None:
            assert name not in plan.defaults and name not in plan.signature
        else:
            function, extra = plan.defaults[name]
            assert rule == function or rule in extra, (name, plan.defaults[name])
    assert "labels" in plan.signature and "labels" not in plan.capture_inputs
    required = [name for name in plan.signature if name not in plan.defaults and name != "labels"]
    assert plan.signature[: len(required)] == required


def test_grow_size_one_doubles_size_one_dims_and_pads_a_grown_mask():
    from fx_lntune.inputs import grow_size_one

    inputs = {"input_ids": torch.tensor([[5]]), "attention_mask": torch.tensor([[1]]), "pixel_values": torch.ones(1, 3)}
    grown = grow_size_one(inputs)
    assert grown["input_ids"].tolist() == [[5, 5], [5, 5]]
    assert grown["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert grown["pixel_values"].shape == (2, 3)
    assert inputs["attention_mask"].tolist() == [[1]]  # the caller's tensors are left as they were
    big = {"input_ids": torch.ones(2, 4, dtype=torch.long)}
    assert grow_size_one(big)["input_ids"] is big["input_ids"]
