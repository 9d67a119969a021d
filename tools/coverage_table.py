"""Print the README's coverage table (architecture x front-end) from a real run in this environment.

For every tiny test architecture and every front-end this transformers version offers: does it capture, does
the tuned graph reproduce the model at another batch/sequence size, and how long the capture took.
Run: ``python tools/coverage_table.py [--tracer NAME] [ARCH ...]`` (from the repository root, with the test extra
installed) once per environment; the README merges the columns. ``--tracer`` prints one front-end's column only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import ALL_ARCHITECTURES, make_inputs, make_model  # noqa: E402

import fx_lntune as fl  # noqa: E402
from fx_lntune.capture import hf_fx_available  # noqa: E402


def check(arch: str, tracer: str) -> str:
    model = make_model(arch)
    start = time.perf_counter()
    try:
        gm = fl.lntune_transform(model, fl.LNTuningConfig(), tracer=tracer, example_inputs=make_inputs(arch))
    except fl.LNTuneError as error:
        reason = str(error).split(": ", 2)[-1][:70].replace("|", "/")
        return f"no: {reason}"
    seconds = time.perf_counter() - start
    inputs = make_inputs(arch, batch=3, seq=5, seed=1)
    try:
        with torch.no_grad():
            ours, reference = gm(**inputs), model(**inputs)
    except RuntimeError as error:
        return f"captures, but not at batch 3 / length 5: {str(error).splitlines()[0][:60]}"
    worst = max(
        (ours[key] - reference[key]).abs().max().item() for key in ours.keys() if isinstance(ours[key], torch.Tensor)
    )
    verdict = "yes" if worst <= 1e-5 else "MISMATCH"
    return f"{verdict} ({len(fl.targeted_module_names(gm))} norms, err {worst:.0e}, {seconds:.1f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tracer", choices=("export", "hf_fx"), help="print this front-end's column only")
    parser.add_argument("archs", nargs="*", help="architectures (default: all)")
    args = parser.parse_args()
    tracers = ["export"] + (["hf_fx"] if hf_fx_available() else [])
    if args.tracer:
        tracers = [t for t in tracers if t == args.tracer]
    version = transformers.__version__
    print(f"| architecture | {' | '.join(f'{t} (transformers {version})' for t in tracers)} |")
    print(f"|---|{'---|' * len(tracers)}")
    for arch in args.archs or ALL_ARCHITECTURES:
        print(f"| {arch} | {' | '.join(check(arch, t) for t in tracers)} |", flush=True)


if __name__ == "__main__":
    main()
