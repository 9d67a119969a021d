"""Benchmarks of the core: train step against PEFT and the plain model, set_adapter, and the 7B meta capture.

Prints a table. Timings are A/B interleaved in one run and reported as the median of per-pair ratios, so
machine noise hits both sides alike. Run: ``python benchmarks/bench_core.py [--steps N] [--skip-7b]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys
import time

import peft
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import fx_lntune as fl

SMALL_LLAMA = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=1000,
)
LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
)


def small_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(LlamaConfig(**SMALL_LLAMA)).eval()


def train_step(model, optimizer, inputs) -> float:
    start = time.perf_counter()
    out = model(**inputs)
    loss = out["logits"].float().logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def bench_train(steps: int) -> list[tuple[str, float, str]]:
    base = small_llama()
    inputs = {"input_ids": torch.randint(0, 1000, (4, 128)), "attention_mask": torch.ones(4, 128, dtype=torch.long)}
    ours = fl.lntune_transform(base, fl.LNTuningConfig(), example_inputs=inputs)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    plain = copy.deepcopy(base)
    for name, param in plain.named_parameters():
        param.requires_grad_("norm" in name)
    for model in (ours, theirs, plain):
        model.train()
    optimizers = {
        name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for name, model in (("ours", ours), ("peft", theirs), ("plain", plain))
    }
    models = {"ours": ours, "peft": theirs, "plain": plain}
    peft_inputs = dict(inputs, use_cache=False)
    for name in models:  # warm-up
        train_step(models[name], optimizers[name], peft_inputs if name != "ours" else inputs)
    vs_peft, vs_plain, times = [], [], {name: [] for name in models}
    for _ in range(steps):
        t = {
            name: train_step(models[name], optimizers[name], peft_inputs if name != "ours" else inputs)
            for name in ("ours", "peft", "plain")
        }
        for name, value in t.items():
            times[name].append(value)
        vs_peft.append(t["ours"] / t["peft"])
        vs_plain.append(t["ours"] / t["plain"])
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    return [
        (
            "train step, small llama 4x128: ours / PEFT",
            statistics.median(vs_peft),
            f"{ms['ours']:.1f} ms vs {ms['peft']:.1f} ms (target <= 1.00)",
        ),
        (
            "train step: ours / plain model, norms trainable",
            statistics.median(vs_plain),
            f"{ms['ours']:.1f} ms vs {ms['plain']:.1f} ms (target <= 1.05)",
        ),
    ]


def bench_meta_7b() -> dict:
    """Runs in a fresh process so that its peak resident memory is the transform's own."""
    code = f"""
import json, resource, time, statistics, torch
from transformers import AutoModelForCausalLM, LlamaConfig
import fx_lntune as fl
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**{LLAMA_7B!r}))
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
gm = fl.lntune_transform(model, fl.LNTuningConfig())
seconds = time.perf_counter() - start
fl.add_adapter(gm, "other")
switches = []
for index in range(50):
    start = time.perf_counter()
    fl.set_adapter(gm, "other" if index % 2 == 0 else "default")
    switches.append(time.perf_counter() - start)
print(json.dumps(dict(seconds=seconds, rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      rss_before_mb=rss0 / 1024, set_adapter_ms=1000 * statistics.median(switches))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-7b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = bench_train(args.steps)
    if not args.skip_7b:
        meta = bench_meta_7b()
        rss = f"peak RSS {meta['rss_mb']:.0f} MB, {meta['rss_before_mb']:.0f} MB before"
        rows.append(("lntune_transform, 7B llama on meta (s)", meta["seconds"], f"{rss} (target < 10 s, < 1 GB)"))
        rows.append(("set_adapter on the 7B graph (ms)", meta["set_adapter_ms"], "median of 50 (target < 5 ms)"))
    print(
        f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, python {platform.python_version()}"
    )
    print("| measurement | value | detail |")
    print("|---|---|---|")
    for name, value, detail in rows:
        print(f"| {name} | {value:.3f} | {detail} |")


if __name__ == "__main__":
    main()
