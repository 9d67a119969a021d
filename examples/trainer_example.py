"""Train the LN-tuned all-MiniLM-L6-v2 graph with Hugging Face's `Trainer` on the demo's templated sentiment data.

Run: ``python examples/trainer_example.py`` (about a minute on 2 CPU cores). The tuned graph is an ordinary
``nn.Module`` to `Trainer`: it builds its optimizer from the parameters that require grad (the adapter's norm
copies and the classifier copy); only the loss needs a `compute_loss`, as the graph returns logits.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from demo import accuracy, make_dataset, model_directory
from transformers import AutoTokenizer, BertForSequenceClassification, Trainer, TrainingArguments

import fx_lntune as fl


class LogitsTrainer(Trainer):
    """`Trainer` for a graph that returns logits: the loss is cross-entropy against the batch's labels."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss = torch.nn.functional.cross_entropy(outputs["logits"], labels)
        return (loss, outputs) if return_outputs else loss


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

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        enc = tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt")
        labels = torch.tensor([row["label"] for row in rows])
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="fx-lntune-trainer-")
    training_args = TrainingArguments(
        output_dir=output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=16,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        remove_unused_columns=False,  # the graph's forward takes no labels; the collator's batch is all it needs
        seed=args.seed,
        disable_tqdm=True,  # Trainer then prints each log line: {'loss': ..., 'grad_norm': ..., ...}
    )
    trainer = LogitsTrainer(
        model=gm,
        args=training_args,
        train_dataset=[{"text": text, "label": label} for text, label in train],
        data_collator=collate,
    )
    trainer.train()
    print(f"accuracy after:  {accuracy(gm, tokenizer, test):.3f} on {len(test)} held-out sentences")


if __name__ == "__main__":
    main()
