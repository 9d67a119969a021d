"""PEFT's remaining API on the tuned graph, each checked against PEFT as the oracle: the same trainable parameters,
the same outputs and the same configs (`disable_adapter_layers`, `merge_adapter(adapter_names=...)`,
`merge_and_unload(safe_merge=...)`, `active_adapters`, `peft_config`, dict configs, `set_adapter(inference_mode=)`,
`low_cpu_mem_usage`, deleting the last adapter, unknown config keys, the model card, `in_features`)."""

from __future__ import annotations

import copy
import json
import os
import warnings

import peft
import pytest
import torch
import torch.nn as nn
import yaml
from conftest import captured
from models import make_inputs

import fx_lntune as fl
from fx_lntune.config import as_config
from fx_lntune.persistence import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

PREFIX = "base_model.model."
INPUTS = make_inputs("llama", batch=3, seq=5, seed=1)


def _pair(*names: str, task_type: str | None = None):
    """The llama graph and a PEFT model with adapters ``names`` (the first active), their copies perturbed alike."""
    model, gm = captured("llama")
    model.eval()
    gm.eval()
    config = fl.LNTuningConfig(task_type=task_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(task_type=task_type), names[0])
    for name in names[1:]:
        fl.add_adapter(gm, name, config)
        reference.add_adapter(name, peft.LNTuningConfig(task_type=task_type))
    for seed, name in enumerate(names, start=1):
        _perturb(gm, reference, name, seed)
    return model, gm, reference.eval()


def _perturb(gm, reference, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    ours = dict(gm.named_parameters())
    theirs = dict(reference.named_parameters())
    with torch.no_grad():
        for key in sorted(k for k in ours if f".ln_tuning_layers.{name}." in k):
            delta = 0.1 * torch.randn(ours[key].shape, generator=generator)
            ours[key].add_(delta)
            theirs[PREFIX + key].add_(delta)


def _trainable(module, prefix: str = "") -> list[str]:
    return sorted(name.removeprefix(prefix) for name, p in module.named_parameters() if p.requires_grad)


def _logits(module) -> torch.Tensor:
    with torch.no_grad():
        return module(**INPUTS)["logits"]


def _same(gm, reference) -> None:
    torch.testing.assert_close(_logits(gm), _logits(reference), atol=1e-5, rtol=1e-4)
    assert _trainable(gm) == _trainable(reference, PREFIX)


def test_disable_and_enable_adapter_layers_as_peft():
    model, gm, reference = _pair("default", "other")
    fl.set_adapter(gm, "other")
    reference.set_adapter("other")
    fl.merge_adapter(gm)
    reference.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging"):
        fl.disable_adapter_layers(gm)
    reference.base_model.disable_adapter_layers()
    _same(gm, reference)
    assert not _trainable(gm) and torch.equal(_logits(gm), _logits(model))
    assert get_merged(gm) is None  # PEFT unmerges too, and does not merge again on enable
    fl.enable_adapter_layers(gm)
    reference.base_model.enable_adapter_layers()
    _same(gm, reference)
    assert _trainable(gm) and not torch.equal(_logits(gm), _logits(model))


def get_merged(gm):
    from fx_lntune.state import get_state

    return get_state(gm).merged_adapter


def test_merge_with_adapter_names_and_safe_merge_as_peft():
    _, gm, reference = _pair("default", "other")
    fl.merge_adapter(gm, adapter_names=["other"], safe_merge=True)
    reference.merge_adapter(adapter_names=["other"], safe_merge=True)
    torch.testing.assert_close(_logits(gm), _logits(reference), atol=1e-5, rtol=1e-4)
    fl.unmerge_adapter(gm)
    reference.unmerge_adapter()
    fl.merge_adapter(gm, ["other"])  # PEFT's positional list form
    assert get_merged(gm) == "other"
    fl.unmerge_adapter(gm)
    for ours, theirs in [
        (lambda: fl.merge_adapter(gm, adapter_names=["default", "other"]), reference.merge_adapter),
        (lambda: fl.merge_and_unload(gm, adapter_names=["default", "other"]), reference.merge_and_unload),
    ]:
        with pytest.raises(ValueError, match="one adapter at a time"):  # PEFT's refusal
            theirs(adapter_names=["default", "other"])
        with pytest.raises(fl.LNTuneAdapterError, match="one adapter at a time"):
            ours()
    fl.merge_adapter(gm, adapter_names=[])  # PEFT: an empty list merges nothing
    assert get_merged(gm) is None
    plain = fl.merge_and_unload(gm, adapter_names=["other"], safe_merge=True)
    merged = reference.merge_and_unload(adapter_names=["other"], safe_merge=True)
    torch.testing.assert_close(_logits(plain), _logits(merged), atol=1e-5, rtol=1e-4)
    base = fl.merge_and_unload(gm, adapter_names=[])
    assert torch.equal(_logits(base), _logits(fl.unload(gm)))


def test_safe_merge_refuses_inf_and_changes_nothing():
    _, gm, _ = _pair("default")
    with torch.no_grad():
        gm.get_submodule("model.norm").ln_tuning_layers["default"].weight[1] = float("inf")
    before = _logits(gm)
    for call in (lambda: fl.merge_adapter(gm, safe_merge=True), lambda: fl.merge_and_unload(gm, safe_merge=True)):
        with pytest.raises(fl.LNTuneStateError, match=r"NaN or inf in \['model.norm.weight'\]"):
            call()
    assert get_merged(gm) is None and torch.equal(_logits(gm), before)
    fl.merge_adapter(gm)  # without safe_merge the swap runs, as in PEFT
    assert get_merged(gm) == "default"


def test_active_adapters_and_deleting_the_last_adapter_as_peft():
    model, gm, reference = _pair("default", "other")
    assert fl.active_adapters(gm) == reference.active_adapters == ["default"]
    fl.set_adapter(gm, "other")
    reference.set_adapter("other")
    assert fl.active_adapters(gm) == reference.active_adapters == ["other"]
    with pytest.warns(UserWarning, match="now 'default'"):
        fl.delete_adapter(gm, "other")
    reference.delete_adapter("other")
    assert fl.active_adapters(gm) == reference.active_adapters == ["default"]
    _same(gm, reference)
    fl.delete_adapter(gm, "default")
    reference.delete_adapter("default")
    assert fl.active_adapters(gm) == reference.base_model.active_adapters == []
    assert fl.active_adapter(gm) is None and fl.list_adapters(gm) == [] == list(reference.peft_config)
    # PEFT's layers compute the base model then (its PeftModel.forward fails on the stale name, so ask its layers)
    assert torch.equal(_logits(gm), _logits(model))
    assert torch.equal(_logits(gm), _logits(reference.base_model.model))
    assert not _trainable(gm) and not fl.targeted_module_names(gm)
    with pytest.raises(fl.LNTuneConfigError, match="pass one"):
        fl.add_adapter(gm, "again")
    fl.add_adapter(gm, "again", fl.LNTuningConfig())
    assert fl.active_adapters(gm) == ["again"] and _trainable(gm)
    assert torch.equal(_logits(gm), _logits(model))  # a new adapter starts at the base weights


def test_peft_config_as_peft():
    _, gm, reference = _pair("default", "other")
    fl.add_adapter(gm, "norm_only", fl.LNTuningConfig(target_modules=["norm"], inference_mode=True))
    reference.add_adapter("norm_only", peft.LNTuningConfig(target_modules=["norm"], inference_mode=True))
    ours, theirs = fl.peft_config(gm), reference.peft_config
    assert list(ours) == list(theirs)
    for name, config in ours.items():
        expected = theirs[name]
        assert set(config.target_modules) == set(expected.target_modules)
        assert fl.LNTuningConfig.from_dict({**expected.to_dict(), "target_modules": config.target_modules}) == config
        assert (config.peft_type, config.task_type, config.inference_mode) == (
            expected.peft_type.value,
            expected.task_type,
            expected.inference_mode,
        )
    ours["default"].target_modules.append("x")  # a copy: the graph's config is as it was
    assert fl.peft_config(gm)["default"].target_modules == ["input_layernorm", "post_attention_layernorm", "norm"]


def test_config_base_fields_round_trip_and_come_from_peft():
    fields = dict(
        base_model_name_or_path="org/tiny-llama",
        revision="v1",
        auto_mapping={"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"},
        task_type="CAUSAL_LM",
        inference_mode=True,
    )
    ours = fl.LNTuningConfig(target_modules=["norm"], peft_type="LN_TUNING", **fields)
    data = ours.to_dict()
    assert {key: data[key] for key in fields} == fields and data["peft_type"] == "LN_TUNING"
    again = fl.LNTuningConfig.from_dict(json.loads(json.dumps(data)))
    assert again == ours and {key: getattr(again, key) for key in fields} == fields
    theirs = peft.LNTuningConfig(target_modules=["norm"], **fields)
    converted = fl.LNTuningConfig.from_dict(theirs.to_dict())  # PEFT's dict: peft_version is ignored silently
    assert {key: getattr(converted, key) for key in fields} == fields
    assert {key: getattr(as_config(theirs), key) for key in fields} == fields
    assert fl.LNTuningConfig(peft_type=peft.PeftType.LN_TUNING).peft_type == "LN_TUNING"
    peft_dict = ours.to_peft_dict("ignored")
    assert peft_dict["base_model_name_or_path"] == "org/tiny-llama" and peft_dict["revision"] == "v1"


def test_unknown_config_keys_warn_and_load_as_peft(tmp_path):
    model, gm, _ = _pair("default")
    fl.save_adapter(gm, tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    data.update(layer_norm_scaling=2, peft_version="9.9.9", runtime_config={"x": 1})
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    theirs = peft.LNTuningConfig.from_json_file(str(tmp_path / CONFIG_NAME))
    with pytest.warns(UserWarning, match="runtime_config"):
        ours = fl.LNTuningConfig.from_json_file(tmp_path / CONFIG_NAME)
    assert ours == theirs  # PEFT's from_json_file: the JSON object, runtime_config dropped
    with pytest.warns(UserWarning, match=r"\['layer_norm_scaling', 'runtime_config'\].*newer PEFT"):
        fl.load_adapter(gm, tmp_path, "newer", low_cpu_mem_usage=True)
    fl.set_adapter(gm, "newer")
    assert torch.equal(_logits(gm), _logits(fl.merge_and_unload(gm, "default")))
    with pytest.warns(UserWarning, match="layer_norm_scaling"):
        config = fl.LNTuningConfig.from_dict(data)
    assert config.target_modules == data["target_modules"]


def test_dict_of_configs_as_peft_with_two_adapters():
    model, _ = captured("llama")
    # "b" targets what "a" does: PEFT fails on an adapter that skips a tuned layer (PEFT #3574; README).
    configs = {"a": fl.LNTuningConfig(), "b": fl.LNTuningConfig(modules_to_save=["lm_head"])}
    gm = fl.lntune_transform(model, configs, example_inputs=make_inputs("llama"), low_cpu_mem_usage=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(), "a", low_cpu_mem_usage=True)
        reference.add_adapter("b", peft.LNTuningConfig(modules_to_save=["lm_head"]))
    reference.eval()
    assert fl.list_adapters(gm) == list(reference.peft_config) and fl.active_adapters(gm) == ["a"]
    assert set(gm.state_dict()) == {key.removeprefix(PREFIX) for key in reference.state_dict()}
    _same(gm, reference)
    fl.set_adapter(gm, "b")
    reference.set_adapter("b")
    _same(gm, reference)


def test_set_adapter_inference_mode_as_peft():
    _, gm, reference = _pair("default", "other")
    for name, mode in [("other", True), ("other", False), ("default", True), ("default", False)]:
        fl.set_adapter(gm, name, inference_mode=mode)
        reference.set_adapter(name, inference_mode=mode)
        assert _trainable(gm) == _trainable(reference, PREFIX), (name, mode)
    fl.set_adapter(gm, ["other"])  # a list of one is its one name
    assert fl.active_adapter(gm) == "other"


def test_in_out_features_and_base_layer_as_peft():
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.lin = nn.Linear(6, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, ids):
            return self.norm(self.lin(self.emb(ids)))

    module = Tiny()
    gm = fl.lntune_transform(module, fl.LNTuningConfig(target_modules=["emb", "lin", "norm"]), tracer="fx")
    reference = peft.get_peft_model(copy.deepcopy(module), peft.LNTuningConfig(target_modules=["emb", "lin", "norm"]))
    for path in ["emb", "lin", "norm"]:
        ours, theirs = gm.get_submodule(path), reference.base_model.model.get_submodule(path)
        assert (ours.in_features, ours.out_features) == (theirs.in_features, theirs.out_features), path
        assert type(ours.get_base_layer()) is type(theirs.get_base_layer())
    ids = torch.randint(0, 10, (2, 3))
    assert torch.equal(gm(ids=ids), module(ids))  # captured without example_inputs: symbolic tracing needs none


def _front_matter(path) -> dict:
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_as_peft(tmp_path):
    _, gm, reference = _pair("default", task_type="CAUSAL_LM")  # PEFT's PeftModelForCausalLM: a pipeline tag
    fl.add_adapter(gm, "causal", fl.LNTuningConfig(task_type="CAUSAL_LM"))
    fl.save_adapter(gm, tmp_path / "ours", "causal")
    reference.save_pretrained(tmp_path / "peft")
    assert sorted(os.listdir(tmp_path / "ours")) == sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])
    ours, theirs = _front_matter(tmp_path / "ours" / CARD_NAME), _front_matter(tmp_path / "peft" / CARD_NAME)
    assert ours == theirs and ours["library_name"] == "peft" and ours["pipeline_tag"] == "text-generation"
    fl.save_adapter(gm, tmp_path / "bare", model_card=False)
    assert sorted(os.listdir(tmp_path / "bare")) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    (tmp_path / "bare" / CARD_NAME).write_text("---\nlicense: mit\n---\n\nMy notes.\n")
    fl.save_adapter(gm, tmp_path / "bare")  # an existing card keeps its text and gets PEFT's fields
    card = (tmp_path / "bare" / CARD_NAME).read_text()
    assert "My notes." in card and _front_matter(tmp_path / "bare" / CARD_NAME)["license"] == "mit"
    assert _front_matter(tmp_path / "bare" / CARD_NAME)["library_name"] == "peft"
