"""The tuned graph answers PeftModel's methods, each as PEFT's LN tuning does (PEFT is the oracle)."""

from __future__ import annotations

import copy
import io
import json

import peft
import pytest
import torch
from safetensors.torch import load_file
from test_peft_api import INPUTS, _logits, _pair, _same

import fx_lntune as fl
from fx_lntune.capture import hf_fx_available
from fx_lntune.methods import TunedGraphModule


def _printed(module, capsys) -> str:
    module.print_trainable_parameters()
    return capsys.readouterr().out


def test_peft_usage_through_methods_matches_peft(tmp_path, capsys):
    """PEFT's LN-tuning walk (docs and tests/test_tuners/ln_tuning): the same method calls on both models."""
    model, gm, reference = _pair("default")
    assert isinstance(gm, torch.fx.GraphModule)
    assert gm.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert _printed(gm, capsys) == _printed(reference, capsys)
    assert gm.peft_config["default"].target_modules == fl.peft_config(gm)["default"].target_modules
    assert (gm.active_adapter, gm.active_adapters) == (reference.active_adapter, reference.active_adapters)
    assert (gm.device, gm.dtype, gm.config) == (reference.device, reference.dtype, model.config)

    for target in (gm, reference):
        target.add_adapter("other", peft.LNTuningConfig())
        target.set_adapter("other")
    assert gm.active_adapters == reference.active_adapters == ["other"]
    _same(gm, reference)
    with gm.disable_adapter(), reference.disable_adapter():
        torch.testing.assert_close(_logits(gm), _logits(reference), atol=1e-5, rtol=1e-4)
    gm.set_adapter("default")
    reference.set_adapter("default")
    _same(gm, reference)

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    gm.save_pretrained(ours)
    reference.save_pretrained(theirs)
    for sub in ("", "other"):
        assert sorted(p.name for p in (ours / sub).iterdir() if p.is_file()) == sorted(
            p.name for p in (theirs / sub).iterdir() if p.is_file()
        )
        mine, peft_weights = (
            load_file(ours / sub / "adapter_model.safetensors"),
            load_file(theirs / sub / "adapter_model.safetensors"),
        )
        assert mine.keys() == peft_weights.keys()
        for key in mine:
            torch.testing.assert_close(mine[key], peft_weights[key])
        assert json.loads((ours / sub / "adapter_config.json").read_text())["peft_type"] == "LN_TUNING"
    only = tmp_path / "only"
    gm.save_pretrained(only, selected_adapters=["other"])
    assert not (only / "adapter_model.safetensors").exists() and (only / "other" / "adapter_model.safetensors").exists()

    merged, peft_merged = gm.merge_and_unload(), reference.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(**INPUTS)["logits"], peft_merged(**INPUTS)["logits"], atol=1e-5, rtol=1e-4)
    assert type(merged).__mro__[1] is torch.fx.GraphModule and not isinstance(merged, TunedGraphModule)
    assert not hasattr(merged, "generate") and not hasattr(gm.unload(), "save_pretrained")

    for target in (gm, reference):
        target.delete_adapter("other")
    assert gm.peft_config.keys() == reference.peft_config.keys()


def test_methods_survive_deepcopy_and_pickling():
    _, gm, _ = _pair("default")
    copies = [copy.deepcopy(gm)]
    if not hf_fx_available():  # transformers 4's vmap mask code cannot be re-traced on unpickling (test_layers)
        buffer = io.BytesIO()
        torch.save(gm, buffer)
        buffer.seek(0)
        copies.append(torch.load(buffer, weights_only=False))
    for copied in copies:
        assert isinstance(copied, TunedGraphModule)
        assert copied.active_adapter == "default"
        torch.testing.assert_close(_logits(copied), _logits(gm))
        assert copied.state_dict().keys() == gm.state_dict().keys()


def test_generate_and_checkpointing_methods():
    _, gm, reference = _pair("default")
    ids = INPUTS["input_ids"][:1]
    assert gm.can_generate()
    assert torch.equal(gm.generate(ids, max_new_tokens=3, do_sample=False), fl.generate(gm, ids, max_new_tokens=3))
    expected = reference.generate(input_ids=ids, max_new_tokens=3)
    assert torch.equal(gm.generate(input_ids=ids, max_new_tokens=3), expected)
    assert not gm.is_gradient_checkpointing
    gm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    gm.enable_input_require_grads()
    assert gm.is_gradient_checkpointing
    gm.gradient_checkpointing_disable()
    assert not gm.is_gradient_checkpointing
    with pytest.raises(fl.LNTuneConfigError, match="use_reentrant=False"):
        gm.gradient_checkpointing_enable({"use_reentrant": True})


def test_unknown_attribute_names_the_tuned_graph():
    _, gm, _ = _pair("default")
    with pytest.raises(AttributeError, match=r"tuned torch\.fx\.GraphModule .*LlamaForCausalLM.*fl\.generate"):
        gm.no_such_method()  # noqa: B018


def _saved_and_grads(gm) -> tuple[int, dict[str, torch.Tensor]]:
    saved = []
    gm.eval()  # no dropout: the two runs must match
    gm.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = gm(**INPUTS, labels=INPUTS["input_ids"])[0]
    loss.backward()
    return len(saved), {name: p.grad.clone() for name, p in gm.named_parameters() if p.requires_grad}


def test_stock_trainer_with_gradient_checkpointing_trains_checkpointed(tmp_path):
    import transformers

    _, gm, _ = _pair("default")
    plain_saved, _ = _saved_and_grads(gm)
    rows = [{"input_ids": ids.tolist(), "labels": ids.tolist()} for ids in INPUTS["input_ids"]]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=3,
        learning_rate=0.0,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        gradient_checkpointing=True,
    )
    transformers.Trainer(model=gm, args=args, train_dataset=rows).train()
    assert gm.is_gradient_checkpointing
    saved, grads = _saved_and_grads(gm)
    assert saved < plain_saved
    gm.gradient_checkpointing_disable()  # the same weights as trained, without checkpointing
    _, plain_grads = _saved_and_grads(gm)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-5)


def test_generate_takes_a_tokenizer_output_positionally():
    _, gm, _ = _pair("default")
    from transformers import BatchEncoding

    ids = INPUTS["input_ids"][1:]
    encoded = BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    expected = fl.generate(gm, **encoded, max_new_tokens=2)
    assert torch.equal(fl.generate(gm, encoded, max_new_tokens=2), expected)
    assert torch.equal(gm.generate(encoded, max_new_tokens=2), expected)
