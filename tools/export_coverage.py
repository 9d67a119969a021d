"""Print the README's export coverage table (architecture x format) from a real run in this environment.

For every tiny test architecture: capture, perturb the adapter (so that merged and base differ), export to
TorchScript, ONNX and a ``torch.export`` program, load each file back and compare its outputs with the tuned
graph's at the capture size (batch 2, length 8) and at batch 3, length 5. "err" is the largest absolute
difference over both sizes and every output; the time is the export's.
Run: ``python tools/export_coverage.py [--tracer export|hf_fx] [arch ...]`` (from the repository root, with the
test and onnx extras installed; the default tracer is lntune_transform's ``auto``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from models import ARCHITECTURES, make_inputs, make_model  # noqa: E402

import fx_lntune as fl  # noqa: E402

TOLERANCE = 1e-4
SIZES = [{"batch": 2, "seq": 8}, {"batch": 3, "seq": 5, "seed": 1}]


def _perturb(gm: torch.fx.GraphModule) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(gm.named_parameters()):
            if ".ln_tuning_layers." in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param.dtype))


def _run_torchscript(path: Path):
    module = torch.jit.load(str(path))
    return lambda inputs: module(*inputs.values())


def _run_onnx(path: Path):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]

    def run(inputs):
        values = session.run(names, {name: value.numpy() for name, value in inputs.items()})
        return {name: torch.from_numpy(value) for name, value in zip(names, values, strict=True)}

    return run


def _run_program(path: Path):
    module = torch.export.load(str(path)).module()
    return lambda inputs: module(**inputs)


FORMATS = {
    "torchscript": (fl.export_torchscript, ".pt", _run_torchscript),
    "onnx": (fl.export_onnx, ".onnx", _run_onnx),
    "program": (fl.export_program, ".pt2", _run_program),
}


def check(arch: str, gm: torch.fx.GraphModule, fmt: str, directory: Path) -> str:
    export, suffix, load = FORMATS[fmt]
    path = directory / f"{arch}{suffix}"
    start = time.perf_counter()
    try:
        export(gm, path, make_inputs(arch))
    except fl.LNTuneExportError as error:
        return "no: " + str(error).split(": ", 1)[-1][:110].replace("|", "/")
    seconds = time.perf_counter() - start
    run = load(path)
    worst = 0.0
    gm.eval()
    for size in SIZES:
        inputs = make_inputs(arch, **size)
        with torch.no_grad():
            reference, ours = gm(**inputs), run(inputs)
        keys = [key for key, value in reference.items() if isinstance(value, torch.Tensor)]
        if sorted(ours) != sorted(keys):
            return f"MISMATCH: outputs {sorted(ours)}, expected {keys}"
        worst = max(worst, *((ours[key] - reference[key]).abs().max().item() for key in keys))
    verdict = "yes" if worst <= TOLERANCE else "MISMATCH"
    return f"{verdict} (err {worst:.0e}, {seconds:.1f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracer", default="auto", help="lntune_transform's tracer (default: auto)")
    parser.add_argument("archs", nargs="*", default=ARCHITECTURES)
    options = parser.parse_args()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, tracer {options.tracer}")
    print(f"| architecture | {' | '.join(FORMATS)} |")
    print(f"|---|{'---|' * len(FORMATS)}")
    with tempfile.TemporaryDirectory() as directory:
        for arch in options.archs:
            model, inputs = make_model(arch), make_inputs(arch)
            try:
                gm = fl.lntune_transform(model, fl.LNTuningConfig(), tracer=options.tracer, example_inputs=inputs)
            except fl.LNTuneTraceError:
                print(f"| {arch} | not captured with tracer {options.tracer} | | |", flush=True)
                continue
            _perturb(gm)
            cells = [check(arch, gm, fmt, Path(directory)) for fmt in FORMATS]
            print(f"| {arch} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
