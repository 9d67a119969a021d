"""Every benchmark of fx-lntune in one run, printed as one Markdown table with the machine it ran on.

Run: ``python benchmarks/run_all.py [--steps N] [--skip-compile] [--skip-meta] [--skip-generate]``. Not a test:
nothing is asserted; the "target" column says what we aim for.

Method. Timings are A/B interleaved in one process (ours, then the reference, then ours again ...) after a
warm-up, and a row's value is the median of the per-pair ratios, so that load from other processes hits both
sides alike. Training memory is the peak of the tensor storages that training creates and keeps alive at once
(activations saved for backward, gradients, optimizer states, temporaries), counted by a dispatch mode that
sees every op's outputs (`PeakTensorMemory`): exact and allocator-independent, unlike RSS, which on a CPU is
dominated by the interpreter and the allocator's caching. (torch's own ``MemTracker`` would do, but it
registers a gradient hook on every parameter and fails on frozen ones.) The meta-device transforms each run in a fresh
subprocess, reporting wall and CPU time and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers
from bench_core import LLAMA_7B, small_llama
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import BertForSequenceClassification

import fx_lntune as fl
from fx_lntune.generation import decoder_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import smollm2  # noqa: E402 - the packaged SmolLM2-135M-Instruct, converted once as the LLM demo does
from demo import model_directory  # noqa: E402 - the packaged MiniLM, found as the demo finds it
from demo_llm import onnx_generate  # noqa: E402 - the demo's greedy onnxruntime loop over the decoder with past

LLAMA_70B = dict(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
)
BATCH, SEQ = 4, 128
PROMPT, NEW_TOKENS = 32, 64  # generation rows: batch 1

Row = tuple[str, str, str, str]  # measurement, value, detail, target


class Case:
    """One model with its three trainable variants: ours (tuned graph), PEFT's LN tuning, and the plain model
    with only its norm weights trainable."""

    def __init__(self, name: str, model: torch.nn.Module, inputs: dict, loss: Callable, peft_config, norm_word: str):
        self.name, self.model, self.inputs, self.loss = name, model.eval(), inputs, loss
        self.ours = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=inputs)
        self.peft_config = peft_config(fl.targeted_module_names(self.ours))
        self.peft = peft.get_peft_model(copy.deepcopy(model), self.peft_config)
        self.plain = copy.deepcopy(model)
        for param_name, param in self.plain.named_parameters():
            param.requires_grad_(norm_word in param_name)
        self.peft_inputs = dict(inputs, use_cache=False) if "Llama" in type(model).__name__ else inputs

    def inputs_for(self, variant: str) -> dict:
        return self.inputs if variant == "ours" else self.peft_inputs

    def variants(self) -> dict[str, torch.nn.Module]:
        return {"ours": self.ours, "peft": self.peft, "plain": self.plain}


def llama_case() -> Case:
    inputs = {
        "input_ids": torch.randint(0, 1000, (BATCH, SEQ)),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
    }

    def loss(out, inputs):
        return torch.nn.functional.cross_entropy(
            out["logits"][:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten()
        )

    return Case(
        "small llama", small_llama(), inputs, loss, lambda _: peft.LNTuningConfig(task_type="CAUSAL_LM"), "norm"
    )


def minilm_case() -> Case:
    model = BertForSequenceClassification.from_pretrained(model_directory(), num_labels=2)
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(1000, model.config.vocab_size, (BATCH, SEQ), generator=generator),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
    }
    labels = torch.randint(0, 2, (BATCH,), generator=generator)

    def loss(out, _):
        return torch.nn.functional.cross_entropy(out["logits"], labels)

    # PEFT has no default LN-tuning targets for bert: give it the modules ours targets (every LayerNorm).
    return Case("MiniLM", model, inputs, loss, lambda targets: peft.LNTuningConfig(target_modules=targets), "LayerNorm")


def interleaved(
    fns: dict[str, Callable[[], None]], pairs: int, warmup: int = 2, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Run every function once per round, ``warmup`` + ``pairs`` rounds; the times of the last ``pairs``
    (wall time, or ``clock``'s)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_index in range(warmup + pairs):
        for name, fn in fns.items():
            start = clock()
            fn()
            if round_index >= warmup:
                times[name].append(clock() - start)
    return times


def ratio_row(label: str, times: dict[str, list[float]], a: str, b: str, target: str, unit: float = 1e3) -> Row:
    ratios = [x / y for x, y in zip(times[a], times[b], strict=True)]
    if unit == 1 and max(statistics.median(times[a]), statistics.median(times[b])) < 1:
        unit = 1e3  # sub-second steps in ms, not as 0.06 s
    name = "ms" if unit == 1e3 else "s"
    detail = f"{unit * statistics.median(times[a]):.2f} {name} vs {unit * statistics.median(times[b]):.2f} {name}"
    return label, f"{statistics.median(ratios):.3f}", detail, target


def train_rows(case: Case, steps: int) -> list[Row]:
    models = case.variants()
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for name, model in models.items()
    }

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            model = models[name]
            model.train()
            loss = case.loss(model(**case.inputs_for(name)), case.inputs)
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return run

    times = interleaved({name: step(name) for name in models}, steps)
    return [
        ratio_row(f"{case.name}: train step, ours / PEFT", times, "ours", "peft", "<= 1.00"),
        ratio_row(f"{case.name}: train step, ours / plain model (norms trainable)", times, "ours", "plain", "<= 1.05"),
    ]


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create inside the mode and that are alive at the same time.

    Storages that existed before (``existing``: weights, buffers, inputs) are not counted, even when an in-place
    op returns them. A storage counts from the op that made it until its last reference dies.
    """

    def __init__(self, existing: list[torch.Tensor], record: bool = False) -> None:
        super().__init__()
        self.existing = {StorageWeakRef(t.untyped_storage()).cdata for t in existing}
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0
        # record=True: which op made each storage (op, shape), and the live storages when the peak was reached
        self.record = record
        self.made_by: dict[int, tuple[str, tuple[int, ...]]] = {}
        self.at_peak: list[tuple[tuple[str, tuple[int, ...]], int]] = []
        self.peak_op = ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in self.existing:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.current += storage.nbytes()
                    if self.record:
                        self.made_by[ref.cdata] = (str(func), tuple(tensor.shape))
        if self.current > self.peak:
            self.peak = self.current
            if self.record:
                self.at_peak = [(self.made_by[key], nbytes) for key, (_, nbytes) in self.live.items()]
                self.peak_op = str(func)
        return out


def peak_training_memory(case: Case, name: str, steps: int = 2, model: torch.nn.Module | None = None) -> int:
    """Peak bytes of tensor storage that ``steps`` training steps of one variant (a fresh copy of it, or of
    ``model`` with that variant's inputs) keep alive."""
    model = copy.deepcopy(case.variants()[name] if model is None else model).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    inputs = case.inputs_for(name)
    existing = [*model.parameters(), *model.buffers(), *[v for v in inputs.values() if isinstance(v, torch.Tensor)]]
    with PeakTensorMemory(existing) as tracker:
        for _ in range(steps):
            case.loss(model(**inputs), case.inputs).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.peak


def memory_row(case: Case) -> Row:
    ours, theirs = peak_training_memory(case, "ours"), peak_training_memory(case, "peft")
    detail = f"{ours / 2**20:.1f} MiB vs {theirs / 2**20:.1f} MiB peak tensor memory of 2 steps"
    return f"{case.name}: peak training memory, ours / PEFT", f"{ours / theirs:.3f}", detail, "<= 1.00"


def checkpointed(case: Case) -> dict[str, torch.nn.Module]:
    """Copies of ours and PEFT's model with activation checkpointing per layer (both non-reentrant)."""
    ours = copy.deepcopy(case.ours)
    fl.gradient_checkpointing(ours)
    theirs = copy.deepcopy(case.peft)
    theirs.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return {"ours": ours, "peft": theirs}


def checkpointing_rows(case: Case, steps: int) -> list[Row]:
    """Activation checkpointing: training memory against PEFT's, and what it costs per step against what it costs
    PEFT (each side's checkpointed step over its plain step, in one interleaved run)."""
    models = checkpointed(case)
    ours = peak_training_memory(case, "ours", model=models["ours"])
    theirs = peak_training_memory(case, "peft", model=models["peft"])
    plain = peak_training_memory(case, "ours")
    memory = (
        f"{case.name}: peak training memory with checkpointing, ours / PEFT",
        f"{ours / theirs:.3f}",
        f"{ours / 2**20:.1f} MiB vs {theirs / 2**20:.1f} MiB (ours without checkpointing: {plain / 2**20:.1f} MiB)",
        "<= 1.00",
    )
    variants = {"ours": case.ours, "peft": case.peft, "ours_ckpt": models["ours"], "peft_ckpt": models["peft"]}
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for name, model in variants.items()
    }

    def step(name: str) -> Callable[[], None]:
        def run() -> None:
            model = variants[name].train()
            case.loss(model(**case.inputs_for(name.removesuffix("_ckpt"))), case.inputs).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)

        return run

    times = interleaved({name: step(name) for name in variants}, steps)
    costs = {
        side: [c / p for c, p in zip(times[f"{side}_ckpt"], times[side], strict=True)] for side in ("ours", "peft")
    }
    ratios = [a / b for a, b in zip(costs["ours"], costs["peft"], strict=True)]
    cost = (
        f"{case.name}: step-time cost of checkpointing, ours / PEFT's",
        f"{statistics.median(ratios):.3f}",
        f"checkpointed / plain step: ours x{statistics.median(costs['ours']):.2f}, "
        f"PEFT x{statistics.median(costs['peft']):.2f}",
        "<= 1.00",
    )
    return [memory, cost]


SETTINGS = ("plain", "checkpointing", "checkpointing + chunked loss")
SMOLLM2_SHAPES = ((2, 512), (4, 1024))
PLOT_LENGTHS = (128, 256, 512)


def lm_training_pair(model: torch.nn.Module, setting: str) -> dict[str, torch.nn.Module]:
    """Ours and PEFT's LN tuning of a causal LM in one of `SETTINGS`: per-layer checkpointing is
    ``fl.gradient_checkpointing`` on ours and ``gradient_checkpointing_enable`` (non-reentrant) on PEFT's model; the
    chunked loss (``fl.chunked_loss``) is ours alone, set against PEFT with checkpointing."""
    example = {"input_ids": torch.randint(100, 1000, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    ours = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=example)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    if setting != "plain":
        fl.gradient_checkpointing(ours)
        theirs.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if setting.endswith("chunked loss"):
        fl.chunked_loss(ours)
    return {"ours": ours.train(), "peft": theirs.train()}


def lm_batch(model: torch.nn.Module, batch: int, seq: int, padded: bool = False) -> dict[str, torch.Tensor]:
    """Random token ids with their labels (the model's own loss) and an all-ones mask, or a quarter of row 0 padded."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, model.config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones(batch, seq, dtype=torch.long)
    labels = ids.clone()
    if padded:
        mask[0, -(seq // 4) :] = 0
        labels[0, -(seq // 4) :] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: dict) -> None:
    model(**inputs, **({"use_cache": False} if isinstance(model, peft.PeftModel) else {})).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def lm_peak(model: torch.nn.Module, inputs: dict, record: bool = False) -> PeakTensorMemory:
    """The tracker of one training step (forward with labels, backward, AdamW): ``.peak`` is the peak bytes of live
    tensor storage; with ``record``, what was alive at the peak (`PeakTensorMemory`)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    existing = [*model.parameters(), *model.buffers(), *inputs.values()]
    with PeakTensorMemory(existing, record=record) as tracker:
        lm_step(model, optimizer, inputs)
    return tracker


def memory_breakdown(name: str, model: torch.nn.Module, batch: int, seq: int, top: int = 8) -> list[Row]:
    """Where the peak of one training step goes, for each of `SETTINGS` and side: the storages alive at the peak,
    summed by the op (and output shape) that made them, largest first."""
    rows: list[Row] = []
    inputs = lm_batch(model, batch, seq)
    for setting in SETTINGS:
        for side, m in lm_training_pair(model, setting).items():
            tracker = lm_peak(m, inputs, record=True)
            groups: dict[tuple[str, tuple[int, ...]], list[int]] = {}
            for origin, nbytes in tracker.at_peak:
                groups.setdefault(origin, []).append(nbytes)
            largest = sorted(groups.items(), key=lambda item: -sum(item[1]))[:top]
            detail = "; ".join(
                f"{sum(sizes) / 2**20:.1f} MiB {op.removeprefix('aten.')} {'x'.join(map(str, shape))} x{len(sizes)}"
                for (op, shape), sizes in largest
            )
            label = f"{name} {batch} x {seq}, {setting}, {side}: peak {tracker.peak / 2**20:.1f} MiB"
            rows.append((label, tracker.peak_op.removeprefix("aten."), detail, ""))
    return rows


def head_loss_rows(model: torch.nn.Module, tokens: int = 1024, pairs: int = 2) -> list[Row]:
    """The loss and input gradient of a frozen head alone (``tokens`` x hidden against the model's head weight),
    peak tensor memory and time: plain ``linear`` + ``cross_entropy``, our chunk loop (`chunked_model_loss`), torch's
    ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``; fp32 and bf16, each against the plain loss."""
    weight = model.get_output_embeddings().weight.detach()
    labels = torch.randint(0, weight.shape[0], (1, tokens), generator=torch.Generator().manual_seed(0))
    return [
        row for dtype in (torch.float32, torch.bfloat16) for row in _head_loss(model, weight.to(dtype), labels, pairs)
    ]


def _head_loss(model: torch.nn.Module, w: torch.Tensor, labels: torch.Tensor, pairs: int) -> list[Row]:
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    from fx_lntune.passes.chunk_loss import chunked_model_loss

    tokens = labels.shape[1]
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, tokens, w.shape[1], generator=generator).to(w.dtype).requires_grad_(True)
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).reshape(-1)
    F = torch.nn.functional

    def plain() -> torch.Tensor:
        logits = F.linear(hidden, w).float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted, ignore_index=-100)

    def ours() -> torch.Tensor:
        return chunked_model_loss(None, labels, "ForCausalLM", model, hidden, w, None, None)

    def torchs() -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        return F.linear_cross_entropy(flat, w, shifted, ignore_index=-100, options=LinearCrossEntropyOptions())

    sides = {"plain": plain, "our chunk loop": ours, "F.linear_cross_entropy": torchs}
    losses: dict[str, float] = {}
    peaks: dict[str, int] = {}
    for side, loss_fn in sides.items():
        hidden.grad = None
        with PeakTensorMemory([w, hidden, labels, shifted]) as tracker:
            loss = loss_fn()
            loss.backward()
        losses[side], peaks[side] = float(loss), tracker.peak

    def timed(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            hidden.grad = None
            loss_fn().backward()

        return run

    times = {side: statistics.median(t) for side, t in interleaved(
        {side: timed(fn) for side, fn in sides.items()}, pairs, warmup=1
    ).items()}  # fmt: skip
    name = f"head loss {tokens} x {w.shape[1]} vs {w.shape[0]}, {str(w.dtype).removeprefix('torch.')}"
    return [
        (
            f"{name}: {side}",
            f"{peaks[side] / 2**20:.1f} MiB",
            f"{times[side]:.2f} s ({times[side] / times['plain']:.2f} of plain); loss {losses[side]:.6f}",
            "",
        )
        for side in sides
    ]


def lm_training_rows(
    name: str, model: torch.nn.Module, batch: int, seq: int, pairs: int, padded_plain: bool = True
) -> tuple[list[Row], dict[str, dict[str, int]]]:
    """Peak training memory and step time, ours / PEFT, for each of `SETTINGS` at ``batch x seq`` (all-ones mask;
    the plain memory also with a padded batch); the peaks in bytes by setting and side for the plot."""
    rows: list[Row] = []
    peaks: dict[str, dict[str, int]] = {}
    inputs = lm_batch(model, batch, seq)
    for setting in SETTINGS:
        models = lm_training_pair(model, setting)
        peaks[setting] = {side: lm_peak(m, inputs).peak for side, m in models.items()}
        ours, theirs = peaks[setting]["ours"], peaks[setting]["peft"]
        target = "<= 0.35" if setting.endswith("chunked loss") else "<= 1.00"
        against = "PEFT with checkpointing" if setting != "plain" else "PEFT"
        rows.append(
            (
                f"{name} {batch} x {seq}, {setting}: peak training memory, ours / {against}",
                f"{ours / theirs:.3f}",
                f"{ours / 2**20:.0f} MiB vs {theirs / 2**20:.0f} MiB (peak live tensor storage of one step)",
                target,
            )
        )
        if setting == "plain" and padded_plain:
            padded = lm_batch(model, batch, seq, padded=True)
            ours_p, theirs_p = (lm_peak(m, padded).peak for m in models.values())
            rows.append(
                (
                    f"{name} {batch} x {seq}, plain, padded batch: peak training memory, ours / PEFT",
                    f"{ours_p / theirs_p:.3f}",
                    f"{ours_p / 2**20:.0f} MiB vs {theirs_p / 2**20:.0f} MiB",
                    "<= 1.00",
                )
            )
        if pairs:
            optimizers = {
                side: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                for side, m in models.items()
            }
            fns = {side: functools.partial(lm_step, m, optimizers[side], inputs) for side, m in models.items()}
            times = interleaved(fns, pairs, warmup=1)
            rows.append(
                ratio_row(
                    f"{name} {batch} x {seq}, {setting}: train step, ours / {against}",
                    times,
                    "ours",
                    "peft",
                    "<= 1.00",
                    unit=1,
                )
            )
        print(f"done: {name} {batch} x {seq} {setting}", file=sys.stderr, flush=True)
    return rows, peaks


def lm_compile_row(name: str, model: torch.nn.Module, batch: int, seq: int, pairs: int, backend: str) -> Row:
    """``torch.compile`` of the whole train step (forward with labels, backward, AdamW), ours and PEFT's compiled the
    same way; plain setting."""
    models = lm_training_pair(model, "plain")
    inputs = lm_batch(model, batch, seq)
    fns = {}
    for side, m in models.items():
        optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        fns[side] = torch.compile(functools.partial(lm_step, m, optimizer, inputs), backend=backend)
    times = interleaved(fns, pairs, warmup=2)
    return ratio_row(
        f"{name} {batch} x {seq}: torch.compile({backend}) train step, ours / PEFT",
        times,
        "ours",
        "peft",
        "<= 1.00",
        unit=1,
    )


def memory_plot(name: str, model: torch.nn.Module, batch: int, lengths: tuple[int, ...], path: Path) -> str:
    """Peak training memory against sequence length for `SETTINGS`, ours and PEFT, as a PNG at ``path``
    (matplotlib: ``pip install 'fx-lntune[plots]'``); the path, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'fx-lntune[plots]'): no plot"
    curves: dict[tuple[str, str], list[float]] = {}
    for length in lengths:
        _, peaks = lm_training_rows(name, model, batch, length, pairs=0, padded_plain=False)
        for setting, by_side in peaks.items():
            for side, peak in by_side.items():
                curves.setdefault((setting, side), []).append(peak / 2**20)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colors = dict(zip(SETTINGS, ("tab:red", "tab:blue", "tab:green"), strict=True))
    for (setting, side), values in curves.items():
        if side == "peft" and setting.endswith("chunked loss"):
            continue  # PEFT has no chunked loss: its checkpointed curve is the reference
        label = f"{'fx-lntune' if side == 'ours' else 'PEFT'}, {setting}"
        ax.plot(
            lengths, values, marker="o", color=colors[setting], linestyle="-" if side == "ours" else "--", label=label
        )
    ax.set_xlabel(f"sequence length (batch {batch})")
    ax.set_ylabel("peak training memory (MiB of live tensors)")
    ax.set_title(f"{name}: one LN-tuning step, fp32")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def memory_benchmark_rows(args: argparse.Namespace) -> list[Row]:
    """The training-memory rows of issue 20 (`lm_training_rows`) for the small llama and SmolLM2, the compiled
    train step, and the plot of memory against sequence length."""
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.smollm2_shapes.split(",") if shape]
    rows, _ = lm_training_rows("small llama", small_llama(), BATCH, SEQ, args.memory_pairs)
    smol = smollm2.load(verbose=False)[0] if smollm2.available() is None else None
    if smol is None:
        rows.append(("SmolLM2-135M: training memory rows", "-", f"skipped: {smollm2.available()}", ""))
    for batch, seq in shapes if smol is not None else ():
        rows += lm_training_rows("SmolLM2-135M", smol, batch, seq, args.memory_pairs)[0]
    if args.compile_backend and not args.skip_compile_step:
        rows.append(
            lm_compile_row("small llama", small_llama(), BATCH, SEQ, args.memory_pairs or 3, args.compile_backend)
        )
    if args.plot and smol is not None:
        written = memory_plot("SmolLM2-135M", smol, 1, PLOT_LENGTHS, Path(args.plot))
        rows.append(("plot: peak memory against sequence length", "-", written, ""))
    return rows


def inference_rows(case: Case, pairs: int, compile_backend: str | None) -> list[Row]:
    """Forward of the merge_and_unload graph against the eager model, with an all-ones mask and with one padded
    position: with an all-ones mask, transformers' eager SDPA path drops the mask (a shortcut taken outside
    tracing); the graph always applies it, as it must for padded batches."""
    merged = fl.merge_and_unload(case.ours).eval()
    eager = case.model.eval()

    def forward(model, kwargs) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                model(**kwargs)

        return run

    padded_mask = case.inputs["attention_mask"].clone()
    padded_mask[0, -1] = 0
    rows = []
    for mask_name, mask in (("all-ones mask", case.inputs["attention_mask"]), ("one padded position", padded_mask)):
        ours_inputs = dict(case.inputs, attention_mask=mask)
        eager_inputs = dict(case.peft_inputs, attention_mask=mask)
        times = interleaved({"ours": forward(merged, ours_inputs), "eager": forward(eager, eager_inputs)}, pairs)
        label = f"{case.name}: inference ({mask_name}), merge_and_unload graph / eager model"
        rows.append(ratio_row(label, times, "ours", "eager", "<= 1.02"))
    if compile_backend:
        compiled_ours = torch.compile(merged, backend=compile_backend)
        compiled_eager = torch.compile(eager, backend=compile_backend)
        start = time.perf_counter()
        forward(compiled_ours, case.inputs)()
        compile_ours = time.perf_counter() - start
        start = time.perf_counter()
        forward(compiled_eager, case.peft_inputs)()
        compile_eager = time.perf_counter() - start
        times = interleaved(
            {"ours": forward(compiled_ours, case.inputs), "eager": forward(compiled_eager, case.peft_inputs)}, pairs
        )
        label, value, detail, target = ratio_row(
            f"{case.name}: inference (all-ones mask), torch.compile({compile_backend}) of both",
            times,
            "ours",
            "eager",
            "<= 1.02",
        )
        rows.append((label, value, f"{detail}; first call {compile_ours:.0f} s vs {compile_eager:.0f} s", target))
    return rows


def transform_row(case: Case, runs: int = 3) -> Row:
    def ours() -> None:
        fl.lntune_transform(case.model, fl.LNTuningConfig(), example_inputs=case.inputs)

    def theirs() -> None:
        peft.get_peft_model(copy.deepcopy(case.model), copy.deepcopy(case.peft_config))

    times = interleaved({"ours": ours, "peft": theirs}, runs, warmup=0)
    label, value, detail, _ = ratio_row(f"{case.name}: lntune_transform / get_peft_model", times, "ours", "peft", "")
    return label, value, detail + " (PEFT's includes a deepcopy of the model)", "none (capture is a one-off)"


def capture_rows(case: Case, runs: int = 3) -> list[Row]:
    """A capture against a bare ``torch.export.export`` of the same model with the same inputs and dynamic dims,
    interleaved."""
    from fx_lntune.capture._build import capture_mode
    from fx_lntune.inputs import dynamic_shapes_for

    def ours() -> None:
        fl.lntune_transform(case.model, fl.LNTuningConfig(), example_inputs=case.inputs)

    def bare() -> None:  # with the KV cache off and in training mode, as ours captures
        with capture_mode(case.model, training=True):
            torch.export.export(
                case.model, (), dict(case.inputs), strict=False, dynamic_shapes=dynamic_shapes_for(case.inputs)
            )

    # CPU time: a capture is single-threaded Python, and wall time on a loaded machine is mostly waiting.
    times = interleaved({"ours": ours, "export": bare}, runs, warmup=1, clock=time.process_time)
    return [ratio_row(f"{case.name}: lntune_transform / bare torch.export, CPU", times, "ours", "export", "<= 1.00")]


def smollm2_capture_rows() -> list[Row]:
    """`capture_rows` for the real 30-layer SmolLM2-135M, two interleaved rounds, with the example inputs
    ``lntune_transform(model, config)`` makes when given none (a user's first line). With large explicit examples
    (4 x 128) the eager checks of the optional inputs' defaults (`fx_lntune.inputs.plan_inputs`: five forwards of
    the real model) cost more than the capture itself."""
    from fx_lntune.inputs import default_input_names, make_dummy_inputs

    if smollm2.available() is not None:
        return [("SmolLM2-135M: capture rows", "-", f"skipped: {smollm2.available()}", "")]
    model = smollm2.load(verbose=False)[0]
    inputs = make_dummy_inputs(model, default_input_names(model))
    return capture_rows(types.SimpleNamespace(name="SmolLM2-135M (default examples)", model=model, inputs=inputs), 2)


def set_adapter_row(case: Case, pairs: int = 50) -> Row:
    ours, theirs = copy.deepcopy(case.ours), copy.deepcopy(case.peft)
    fl.add_adapter(ours, "other")
    theirs.add_adapter("other", copy.deepcopy(case.peft_config))
    names = ["other", "default"]
    state = {"ours": 0, "peft": 0}

    def switch(name: str) -> Callable[[], None]:
        def run() -> None:
            state[name] += 1
            adapter = names[state[name] % 2]
            fl.set_adapter(ours, adapter) if name == "ours" else theirs.set_adapter(adapter)

        return run

    times = interleaved({"ours": switch("ours"), "peft": switch("peft")}, pairs)
    return ratio_row(f"{case.name}: set_adapter, ours / PEFT", times, "ours", "peft", "<= 1.00")


_META_CODE = """
import json, statistics, sys, time, torch
from transformers import AutoModelForCausalLM, LlamaConfig
import fx_lntune as fl
from fx_lntune.capture._build import capture_mode
from fx_lntune.inputs import default_input_names, dynamic_shapes_for, make_dummy_inputs
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**json.loads(sys.argv[1])))
def peak_rss_mb():  # VmHWM: this process's own peak (ru_maxrss keeps the parent's across exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024
rss_before = peak_rss_mb()
wall, cpu = time.perf_counter(), time.process_time()
gm = fl.lntune_transform(model, fl.LNTuningConfig())
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
fl.add_adapter(gm, "other")
switches = []
for index in range(50):
    start = time.perf_counter()
    fl.set_adapter(gm, "other" if index % 2 == 0 else "default")
    switches.append(time.perf_counter() - start)
export_cpu = None
if sys.argv[2] == "export":  # a bare torch.export of the same model and inputs, after ours (which paid the warm-up)
    inputs = make_dummy_inputs(model, default_input_names(model))
    export_cpu = time.process_time()
    with capture_mode(model, training=True):  # the KV cache off, as ours captures
        torch.export.export(model, (), inputs, strict=False, dynamic_shapes=dynamic_shapes_for(inputs))
    export_cpu = time.process_time() - export_cpu
print(json.dumps(dict(wall=wall, cpu=cpu, rss_mb=peak_rss_mb(), rss_before_mb=rss_before, nodes=len(gm.graph.nodes),
                      set_adapter_ms=1000 * statistics.median(switches), export_cpu=export_cpu)))
"""


def _meta_run(config: dict, mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _META_CODE, json.dumps(config), mode], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def meta_rows(name: str, config: dict, target_s: float, bare_export: bool = False) -> list[Row]:
    """``lntune_transform`` of a Llama built on ``meta`` from ``config`` in a fresh process (with ``bare_export``,
    then a bare ``torch.export`` of the same model in the same process)."""
    meta = _meta_run(config, "export" if bare_export else "")
    detail = (
        f"CPU {meta['cpu']:.1f} s; peak RSS {meta['rss_mb']:.0f} MB ({meta['rss_before_mb']:.0f} MB before); "
        f"{meta['nodes']} nodes"
    )
    rows = [
        (
            f"lntune_transform, {name} llama on meta (wall s)",
            f"{meta['wall']:.1f}",
            detail,
            f"< {target_s:.0f} s, < 1 GB",
        ),
        (f"set_adapter on the {name} graph (ms)", f"{meta['set_adapter_ms']:.2f}", "median of 50", "< 5 ms"),
    ]
    if bare_export:
        rows.append(
            (
                f"lntune_transform / bare torch.export, {name} llama on meta (CPU)",
                f"{meta['cpu'] / meta['export_cpu']:.3f}",
                f"{meta['cpu']:.1f} s vs {meta['export_cpu']:.1f} s, one process (ours first, paying the warm-up)",
                "<= 1.00",
            )
        )
    return rows


def generation_rows(name: str, model: torch.nn.Module, pairs: int) -> list[Row]:
    """Greedy generation of ``NEW_TOKENS`` tokens (``min_new_tokens`` too, so that no eos ends it early) from a
    ``PROMPT``-token prompt: ``fl.generate`` of the tuned graph against Hugging Face ``generate`` of the eager model
    with its default cache; the time to the first token (``max_new_tokens=1``: the prefill); and the onnxruntime
    greedy loop over the ``export_onnx(..., kv_cache=True)`` decoder, per new token (the time of 64 tokens minus
    that of 1, over 63), against the eager model's."""
    model = model.eval()
    gm = fl.lntune_transform(model, fl.LNTuningConfig())
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(100, model.config.vocab_size, (1, PROMPT), generator=generator),
        "attention_mask": torch.ones(1, PROMPT, dtype=torch.long),
    }
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad

    def run(generate: Callable, new_tokens: int) -> Callable[[], None]:
        def timed() -> None:
            with torch.no_grad():
                out = generate(
                    **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
                )
            assert out.shape[1] == PROMPT + new_tokens

        return timed

    def ours(**kwargs) -> torch.Tensor:
        return fl.generate(gm, **kwargs)

    fns = {
        "ours": run(ours, NEW_TOKENS),
        "eager": run(model.generate, NEW_TOKENS),
        "ours_first": run(ours, 1),
        "eager_first": run(model.generate, 1),
    }
    onnx_note = ""
    try:
        import onnxruntime

        with tempfile.TemporaryDirectory() as scratch:
            path = fl.export_onnx(gm, Path(scratch) / "decoder.onnx", inputs, kv_cache=True)
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        # The loop runs to max_new_tokens (no eos given), as min_new_tokens makes the others do.
        def onnx(new_tokens: int) -> Callable[[], None]:
            return lambda: onnx_generate(None, **inputs, max_new_tokens=new_tokens, session=session)

        fns.update(onnx=onnx(NEW_TOKENS), onnx_first=onnx(1))
        eos = model.generation_config.eos_token_id
        with torch.no_grad():
            expected = fl.generate(gm, **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        got = onnx_generate(
            None, **inputs, max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad, session=session
        )
        onnx_note = "; same greedy tokens as fl.generate" if torch.equal(got, expected) else "; TOKENS DIFFER"
    except ImportError as error:
        onnx_note = f"skipped: {error}"
    times = interleaved(fns, pairs, warmup=1)
    rows = [
        ratio_row(
            f"{name}: generate {NEW_TOKENS} tokens from {PROMPT}, fl.generate / HF generate",
            times,
            "ours",
            "eager",
            "<= 1.05",
        ),
        ratio_row(
            f"{name}: time to first token, fl.generate / HF generate", times, "ours_first", "eager_first", "<= 1.05"
        ),
    ]
    if "onnx" in fns:
        per_token = {
            side: (statistics.median(times[side]) - statistics.median(times[f"{side}_first"])) / (NEW_TOKENS - 1)
            for side in ("onnx", "eager")
        }
        detail = f"{1e3 * per_token['onnx']:.2f} ms vs {1e3 * per_token['eager']:.2f} ms per token{onnx_note}"
        rows.append(
            (
                f"{name}: onnxruntime decoder with past, per new token / eager",
                f"{per_token['onnx'] / per_token['eager']:.3f}",
                detail,
                "<= 1.00",
            )
        )
    else:
        rows.append((f"{name}: onnxruntime decoder with past, per new token / eager", "-", onnx_note, "<= 1.00"))
    return rows


def generate_speed_rows(name: str, model: torch.nn.Module, pairs: int) -> list[Row]:
    """``fl.generate`` against Hugging Face ``generate`` (eager model, default dynamic cache), greedy, batch 1,
    ``PROMPT`` tokens in: the time per new token (the median time of ``NEW_TOKENS`` tokens minus that of one, over
    ``NEW_TOKENS - 1``; per round, so that the ratio is of one round's pair) and to the first token, measured in
    process CPU time (this process runs alone on its threads; wall time on a shared machine counts the others'
    load too) and interleaved; the prefill's logits shape; and the first call: ``fl.generate`` on a graph that
    has not generated yet (its step graphs are captured then) against ``generate`` on a fresh copy of the model,
    8 tokens each, in one process."""
    model = model.eval()
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": torch.randint(100, model.config.vocab_size, (1, PROMPT), generator=generator),
        "attention_mask": torch.ones(1, PROMPT, dtype=torch.long),
    }
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad

    def greedy(new_tokens: int) -> dict:
        return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)

    gm = fl.lntune_transform(model, fl.LNTuningConfig())
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        fresh(**inputs)  # both sides' weights paged in before either first call
        start = time.process_time()
        ours_first = fl.generate(gm, **inputs, **greedy(8))
        ours_first_s = time.process_time() - start
        start = time.process_time()
        eager_first = fresh.generate(**inputs, **greedy(8))
        eager_first_s = time.process_time() - start
    del fresh

    def run(generate: Callable, new_tokens: int) -> Callable[[], None]:
        def timed() -> None:
            with torch.no_grad():
                generate(**inputs, **greedy(new_tokens))

        return timed

    def ours(**kwargs) -> torch.Tensor:
        return fl.generate(gm, **kwargs)

    fns = {
        "ours": run(ours, NEW_TOKENS),
        "eager": run(model.generate, NEW_TOKENS),
        "ours_first": run(ours, 1),
        "eager_first": run(model.generate, 1),
    }
    times = interleaved(fns, pairs, warmup=1, clock=time.process_time)
    with torch.no_grad():
        same = torch.equal(ours(**inputs, **greedy(NEW_TOKENS)), model.generate(**inputs, **greedy(NEW_TOKENS)))
    same &= torch.equal(ours_first, eager_first)
    per_token = {
        side: [
            (long - short) / (NEW_TOKENS - 1) for long, short in zip(times[side], times[f"{side}_first"], strict=True)
        ]
        for side in ("ours", "eager")
    }
    per_token_ratio = statistics.median([a / b for a, b in zip(per_token["ours"], per_token["eager"], strict=True)])
    ours_ms, eager_ms = (1e3 * statistics.median(per_token[side]) for side in ("ours", "eager"))
    ttft = ratio_row(
        f"{name}: time to first token, fl.generate / HF generate (CPU time)",
        times,
        "ours_first",
        "eager_first",
        "<= 1.00",
    )
    decoder = decoder_for(gm)
    step = next(iter(decoder.graphs.values()))
    empty = decoder.layout.empty_past(1, inputs["input_ids"].device)
    with torch.no_grad():
        step_inputs = (inputs["input_ids"], inputs["attention_mask"], *empty)
        if "positions" in next(iter(decoder.graphs)):
            step_inputs += (torch.arange(PROMPT).unsqueeze(0),)
        logits_shape = tuple(step(*step_inputs)[0].shape)
    return [
        (
            f"{name}: per new token, fl.generate / HF generate (CPU time)",
            f"{per_token_ratio:.3f}",
            f"{ours_ms:.2f} ms vs {eager_ms:.2f} ms; " + ("same greedy tokens" if same else "TOKENS DIFFER"),
            "<= 1.00",
        ),
        ttft,
        (
            f"{name}: prefill logits shape (batch 1, {PROMPT} tokens)",
            str(logits_shape),
            "the head runs on the last position only (logits_to_keep=1)",
            f"(1, 1, {model.config.vocab_size})",
        ),
        (
            f"{name}: first call, fl.generate / HF generate (8 tokens, CPU time)",
            f"{ours_first_s / eager_first_s:.1f}",
            f"{ours_first_s:.2f} s (step graphs captured: 3 layers traced, the rest copied) vs {eager_first_s:.2f} s",
            "small",
        ),
    ]


def _first_call_seconds(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


_STATIC_WORKER = """
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import smollm2
import fx_lntune as fl
torch.set_num_threads(int(sys.argv[2]))
model = smollm2.load(verbose=False)[0]
gm = fl.lntune_transform(model, fl.LNTuningConfig())
ids = torch.randint(100, model.config.vocab_size, (1, int(sys.argv[3])), generator=torch.Generator().manual_seed(0))
kwargs = dict(input_ids=ids, max_new_tokens=int(sys.argv[4]), do_sample=False, pad_token_id=0)
fl.generate(gm, **kwargs)  # the default path's first call (its step graphs), not part of the compile
start = time.perf_counter()
fl.generate(gm, **kwargs, cache_implementation="static")
first = time.perf_counter() - start
start = time.perf_counter()
fl.generate(gm, **kwargs, cache_implementation="static")
print(first - (time.perf_counter() - start))
"""


def static_generation_rows(name: str, model: torch.nn.Module, pairs: int) -> list[Row]:
    """Per new token (the time of ``NEW_TOKENS`` tokens minus that of 1, over ``NEW_TOKENS - 1``; greedy, batch 1,
    ``PROMPT``-token prompt), side by side: Hugging Face ``generate`` of the eager model (default cache),
    ``fl.generate`` (default cache), ``fl.generate(cache_implementation="static")`` (Inductor-compiled step) and
    Hugging Face's own static cache + ``torch.compile`` of the eager model; and the compile time of both compiled
    sides: their first call less a later one, in this process (Inductor's on-disk caches as this machine has them)
    and, for ours, in a new process once they are warm."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = model.eval()
    gm = fl.lntune_transform(model, fl.LNTuningConfig())
    generator = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(100, model.config.vocab_size, (1, PROMPT), generator=generator)}
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    hf_compile = CompileConfig(fullgraph=True, mode="default")
    hf_compile._compile_all_devices = True  # transformers compiles on a GPU only, unless told so
    sides = {
        "eager": (model.generate, {}),
        "ours": (functools.partial(fl.generate, gm), {}),
        "static": (functools.partial(fl.generate, gm), {"cache_implementation": "static"}),
        "hf_static": (model.generate, {"cache_implementation": "static", "compile_config": hf_compile}),
    }

    def run(side: str, new_tokens: int) -> Callable[[], torch.Tensor]:
        generate, extra = sides[side]

        def timed() -> torch.Tensor:
            with torch.no_grad():
                out = generate(
                    **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad,
                    **extra,
                )  # fmt: skip
            assert out.shape[1] == PROMPT + new_tokens
            return out

        return timed

    run("ours", 1)()  # the default path's step graphs, which the static path's prompt step uses too
    hits = counters["inductor"]["fxgraph_cache_hit"]
    compile_s = {side: _first_call_seconds(run(side, NEW_TOKENS)) for side in ("static", "hf_static")}
    cache_note = "Inductor cache hit" if counters["inductor"]["fxgraph_cache_hit"] > hits else "Inductor cache cold"
    tokens = {side: run(side, NEW_TOKENS)() for side in sides}
    same = [side for side in ("ours", "static", "hf_static") if torch.equal(tokens[side], tokens["eager"])]
    fns = {f"{side}{suffix}": run(side, n) for side in sides for suffix, n in (("", NEW_TOKENS), ("_first", 1))}
    times = interleaved(fns, pairs, warmup=1)
    for side in ("static", "hf_static"):
        compile_s[side] -= statistics.median(times[side])
    per_token = {
        side: [(a - b) / (NEW_TOKENS - 1) for a, b in zip(times[side], times[f"{side}_first"], strict=True)]
        for side in sides
    }

    def row(label: str, a: str, b: str, target: str) -> Row:
        ratio = statistics.median(x / y for x, y in zip(per_token[a], per_token[b], strict=True))
        ms = {side: 1e3 * statistics.median(per_token[side]) for side in (a, b)}
        same_note = "same greedy tokens" if a in same else "TOKENS DIFFER from HF eager"
        return label, f"{ratio:.3f}", f"{ms[a]:.1f} ms vs {ms[b]:.1f} ms per token; {same_note}", target

    worker = subprocess.run(
        [sys.executable, "-c", _STATIC_WORKER, str(Path(__file__).resolve().parents[1] / "examples"),
         str(torch.get_num_threads()), str(PROMPT), str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    warm = f"{float(worker.stdout.split()[-1]):.1f} s" if worker.returncode == 0 else "failed"
    return [
        row(f"{name}: per new token, fl.generate / HF generate (default caches)", "ours", "eager", "<= 1.00"),
        row(f"{name}: per new token, fl.generate static + Inductor / HF generate", "static", "eager", "<= 0.70"),
        row(f"{name}: per new token, HF static + torch.compile / HF generate", "hf_static", "eager", "-"),
        row(f"{name}: per new token, fl.generate static / HF static + torch.compile", "static", "hf_static", "<= 1.00"),
        (
            f"{name}: compile time, fl.generate static (first call less a later one)",
            f"{compile_s['static']:.1f} s",
            f"{cache_note} in this process; {warm} in a new process (Inductor's caches warm); HF static + "
            f"torch.compile: {compile_s['hf_static']:.1f} s",
            "-",
        ),
    ]


def program_generate(
    decoder: Callable, input_ids: torch.Tensor, max_new_tokens: int, empty_past: tuple
) -> torch.Tensor:
    """Greedy decoding of unpadded prompts over an ``export_program(..., kv_cache=True)`` decoder (the loaded
    ``.pt2`` module or its AOTInductor package): the prompt with ``empty_past`` (per layer, a (key, value) pair of
    length 0), then one token per call with the present fed back as the past."""
    past = empty_past
    sequence, current = input_ids, input_ids
    for _ in range(max_new_tokens):
        start = sequence.shape[1] - current.shape[1]
        logits, past = decoder(
            input_ids=current,
            attention_mask=torch.ones_like(sequence),
            position_ids=torch.arange(start, sequence.shape[1]).expand(current.shape),
            past_key_values=past,
        )
        current = logits[:, -1].argmax(-1)[:, None]
        sequence = torch.cat([sequence, current], dim=1)
    return sequence


def deploy_rows(name: str, model: torch.nn.Module, pairs: int) -> list[Row]:
    """Per new token (the time of ``NEW_TOKENS`` greedy tokens minus that of 1, over ``NEW_TOKENS`` - 1) from a
    ``PROMPT``-token prompt, batch 1, measured side by side: Hugging Face ``generate`` of the eager model,
    ``fl.generate`` of the tuned graph with its default and its static (Inductor-compiled) cache, onnxruntime over
    ``export_onnx(kv_cache=True)``, the ``.pt2`` of ``export_program(kv_cache=True)`` and its AOTInductor package;
    each against eager. Export and compile times are in the details; every loop's tokens are checked against
    ``fl.generate``'s."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    model = model.eval()
    config = model.config
    gm = fl.lntune_transform(model, fl.LNTuningConfig())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, config.vocab_size, (1, PROMPT), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad
    empty = torch.zeros(1, config.num_key_value_heads, 0, config.hidden_size // config.num_attention_heads)
    empty_past = tuple((empty, empty) for _ in range(config.num_hidden_layers))
    scratch = tempfile.TemporaryDirectory(prefix="fx-lntune-bench-deploy-")
    example = {key: value.expand(2, -1) for key, value in inputs.items()}  # export wants batch >= 2
    started = time.perf_counter()
    program_path = fl.export_program(gm, Path(scratch.name) / "decoder.pt2", example, kv_cache=True)
    export_s = time.perf_counter() - started
    program = torch.export.load(program_path)
    started = time.perf_counter()
    package = aoti_compile_and_package(program, package_path=str(Path(scratch.name) / "decoder_aoti.pt2"))
    compile_s = time.perf_counter() - started
    decoders = {"program": program.module(), "aoti": aoti_load_package(package)}
    onnx_path = fl.export_onnx(gm, Path(scratch.name) / "decoder.onnx", example, kv_cache=True)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def hf(generate: Callable) -> Callable[[int], torch.Tensor]:
        return lambda new: generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)

    sides: dict[str, Callable[[int], torch.Tensor]] = {
        "eager": hf(model.generate),
        "fl.generate": hf(lambda **kwargs: fl.generate(gm, **kwargs)),
        "fl.generate static (Inductor)": hf(lambda **kwargs: fl.generate(gm, **kwargs, cache_implementation="static")),
        "onnxruntime": lambda new: onnx_generate(None, **inputs, max_new_tokens=new, session=session),
        "torch.export .pt2": lambda new: program_generate(decoders["program"], ids, new, empty_past),
        "AOTInductor": lambda new: program_generate(decoders["aoti"], ids, new, empty_past),
    }
    with torch.no_grad():
        expected = sides["fl.generate"](NEW_TOKENS)
        started = time.perf_counter()
        sides["fl.generate static (Inductor)"](NEW_TOKENS)  # compiles the static step
        static_first_s = time.perf_counter() - started
        same = {side: torch.equal(run(NEW_TOKENS), expected) for side, run in sides.items()}

    def timed(run: Callable[[int], torch.Tensor], new: int) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad():
                run(new)

        return call

    fns = {f"{side}/{new}": timed(run, new) for side, run in sides.items() for new in (NEW_TOKENS, 1)}
    times = interleaved(fns, pairs, warmup=1)
    per_token = {
        side: (statistics.median(times[f"{side}/{NEW_TOKENS}"]) - statistics.median(times[f"{side}/1"]))
        / (NEW_TOKENS - 1)
        for side in sides
    }
    notes = {
        "fl.generate static (Inductor)": f"; first call {static_first_s:.0f} s",
        "torch.export .pt2": f"; export {export_s:.0f} s",
        "AOTInductor": f"; AOTInductor build {compile_s:.0f} s",
    }
    rows = []
    for side in sides:
        tokens = "same greedy tokens as fl.generate" if same[side] else "TOKENS DIFFER from fl.generate"
        detail = f"{1e3 * per_token[side]:.2f} ms vs {1e3 * per_token['eager']:.2f} ms per token; {tokens}"
        rows.append(
            (
                f"{name}: per new token, {side} / HF eager generate",
                f"{per_token[side] / per_token['eager']:.3f}",
                detail + notes.get(side, ""),
                "",
            )
        )
    scratch.cleanup()
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        total_kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {total_kb / 2**20:.0f} GB RAM"
    return (
        f"{cpu}, {os.cpu_count()} cores{memory}, {torch.get_num_threads()} torch threads; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed A/B rounds per row")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend ('' to skip)")
    parser.add_argument("--skip-meta", action="store_true", help="skip the 7B / 70B meta-device transforms")
    parser.add_argument("--checkpointing-only", action="store_true", help="only the activation checkpointing rows")
    parser.add_argument("--skip-generate", action="store_true", help="skip the generation rows (small llama, SmolLM2)")
    parser.add_argument("--only", choices=["memory"], help="only the training-memory rows (and the plot)")
    parser.add_argument("--memory-pairs", type=int, default=3, help="timed A/B rounds of the training-memory rows")
    parser.add_argument(
        "--smollm2-shapes", default="2x512,4x1024", help="SmolLM2 batch x length of the training-memory rows"
    )
    parser.add_argument("--skip-compile-step", action="store_true", help="skip the torch.compile train-step row")
    parser.add_argument(
        "--head-loss-only", action="store_true", help="only the frozen-head loss rows (plain / our loop / torch's op)"
    )
    parser.add_argument(
        "--memory-breakdown",
        action="store_true",
        help="only where SmolLM2's training peak goes (2 x 512): live storages at the peak by the op that made them",
    )
    parser.add_argument(
        "--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "memory.png"), help="'' for no plot"
    )
    parser.add_argument(
        "--deploy-only", action="store_true", help="only SmolLM2's per-token table of the deployed decoders"
    )
    parser.add_argument("--skip-static", action="store_true", help="skip the static-cache generation rows (compiles)")
    parser.add_argument("--static-only", action="store_true", help="only the static-cache generation rows (SmolLM2)")
    parser.add_argument(
        "--generate-speed-only", action="store_true", help="only fl.generate / HF generate speed (small llama, SmolLM2)"
    )
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    load_before = os.getloadavg()[0]

    rows: list[Row] = []
    if args.head_loss_only:
        print_table(head_loss_rows(smollm2.load(verbose=False)[0]), min(args.steps, 2), load_before)
        return
    if args.memory_breakdown:
        print_table(memory_breakdown("SmolLM2-135M", smollm2.load(verbose=False)[0], 2, 512), 0, load_before)
        return
    if args.deploy_only:
        print_table(
            deploy_rows("SmolLM2-135M", smollm2.load(verbose=False)[0], min(args.steps, 5)), args.steps, load_before
        )
        return
    if args.generate_speed_only:
        pairs = min(args.steps, 10)
        rows += generate_speed_rows("small llama", small_llama(), pairs)
        if smollm2.available() is None:
            rows += generate_speed_rows("SmolLM2-135M", smollm2.load(verbose=False)[0], pairs)
    elif args.static_only:
        rows += static_generation_rows("SmolLM2-135M", smollm2.load(verbose=False)[0], min(args.steps, 10))
    else:
        rows += all_rows(args)
    print_table(rows, args.steps, load_before)


def all_rows(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    if args.only == "memory":
        rows += memory_benchmark_rows(args)
        args.checkpointing_only, args.skip_meta, args.skip_generate = True, True, True
    elif args.checkpointing_only:
        rows += checkpointing_rows(llama_case(), args.steps)
    for make_case in (llama_case, minilm_case) if not args.checkpointing_only else ():
        case = make_case()
        rows += train_rows(case, args.steps)
        rows += checkpointing_rows(case, args.steps)
        rows.append(memory_row(case))
        rows += inference_rows(case, args.steps, args.compile_backend or None)
        rows.append(transform_row(case))
        rows += capture_rows(case)
        rows.append(set_adapter_row(case))
        print(f"done: {case.name}", file=sys.stderr, flush=True)
    if not args.skip_generate and not args.checkpointing_only:
        pairs = min(args.steps, 10)  # each round generates 2 x 130 tokens per side
        rows += generation_rows("small llama", small_llama(), pairs)
        rows += generate_speed_rows("small llama", small_llama(), pairs)
        print("done: small llama generation", file=sys.stderr, flush=True)
        if smollm2.available() is None:
            rows += generation_rows("SmolLM2-135M", smollm2.load(verbose=False)[0], pairs)
            rows += generate_speed_rows("SmolLM2-135M", smollm2.load(verbose=False)[0], pairs)
            rows += deploy_rows("SmolLM2-135M", smollm2.load(verbose=False)[0], min(args.steps, 5))
            if not args.skip_static:
                rows += static_generation_rows("SmolLM2-135M", smollm2.load(verbose=False)[0], pairs)
            print("done: SmolLM2 generation", file=sys.stderr, flush=True)
        else:
            rows.append(("SmolLM2-135M: generation rows", "-", f"skipped: {smollm2.available()}", ""))
    if not args.checkpointing_only:
        rows += smollm2_capture_rows()
        rows += memory_benchmark_rows(args)
    if not args.skip_meta and not args.checkpointing_only:
        rows += meta_rows("7B", LLAMA_7B, 10, bare_export=True)
        rows += meta_rows("70B", LLAMA_70B, 25)
    return rows


def print_table(rows: list[Row], steps: int, load_before: float) -> None:
    print(f"machine: {machine()}; load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"inputs: batch {BATCH} x {SEQ} tokens; {steps} timed A/B rounds per row after 2 warm-up rounds\n")
    print("| measurement | value | detail | target |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
