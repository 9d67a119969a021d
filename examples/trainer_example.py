"""Train the LN-tuned all-MiniLM-L6-v2 graph with Hugging Face's `Trainer` on the demo's templated sentiment data.

Run: ``python examples/trainer_example.py`` (about a minute on 2 CPU cores). The tuned graph is used as the model
itself, with `Trainer`'s defaults: it takes the tokenizer's whole output and ``labels`` by keyword and returns the
model's own loss, so `DataCollatorWithPadding` and the default ``remove_unused_columns=True`` work and no
``compute_loss`` is needed. `Trainer` builds its optimizer from the parameters that require grad (the adapter's norm
copies and the classifier copy) and checkpoints with its default save strategy: each checkpoint holds the adapter
in PEFT's files (as a ``PeftModel``'s), not the whole state dict.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from demo import accuracy, make_dataset, model_directory
from transformers import (
    AutoTokenizer,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

import fx_lntune as fl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="Trainer's output directory (default: a temporary one)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    directory = model_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = BertForSequenceClassification.from_pretrained(directory, num_labels=2).eval()
    gm = fl.lntune_transform(model, fl.LNTuningConfig(modules_to_save=["classifier"]))
    fl.print_trainable_parameters(gm)

    train, test = make_dataset(args.seed)
    print(f"accuracy before: {accuracy(gm, tokenizer, test):.3f} on {len(test)} held-out sentences")

    # Rows as a tokenized dataset holds them: the tokenizer's output (input_ids, token_type_ids, attention_mask),
    # the label and the text, which Trainer drops as a column the graph's forward does not take.
    rows = [{"text": text, "label": label, **tokenizer(text)} for text, label in train]
    output_dir = args.output_dir or tempfile.mkdtemp(prefix="fx-lntune-trainer-")
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_steps=args.steps,  # one checkpoint at the end, with Trainer's default save strategy
        report_to="none",
        use_cpu=True,
        seed=args.seed,
        disable_tqdm=True,  # Trainer then prints each log line: {'loss': ..., 'grad_norm': ..., ...}
    )
    trainer = Trainer(
        model=gm, args=training_args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer)
    )
    trainer.train()
    print(f"accuracy after:  {accuracy(gm, tokenizer, test):.3f} on {len(test)} held-out sentences")


if __name__ == "__main__":
    main()
