"""The ``fx-lntune`` command line: what LN tuning would target, the tuned graph drawn, an adapter merged.

Each subcommand is one ``_add_<name>(commands)`` function that declares its arguments and sets ``run`` to the
function doing the work; `build_parser` lists them. Errors are one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.fx
import torch.nn as nn
import transformers

import fx_lntune as fl
from fx_lntune.api import trainable_parameters_line
from fx_lntune.config import LNTuningConfig, resolve_modules_to_save, resolve_targets
from fx_lntune.errors import LNTuneConfigError, LNTuneError
from fx_lntune.files import file_in_the_way
from fx_lntune.inputs import default_input_names, make_dummy_inputs
from fx_lntune.persistence import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from fx_lntune.visualize import (
    DOT_FORMATS,
    DOT_SIZE_LIMIT,
    LAYER_VIEW_NODES,
    PICTURE_FORMATS,
    find_module_paths,
    visualize_graph,
)

__all__ = ["main", "build_parser"]

PROG = "fx-lntune"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fx-lntune`` with ``argv`` (default: ``sys.argv[1:]``) and return the exit code: 0 on success, 1 for an
    error (one line on stderr, no traceback), 2 for a usage error (argparse's)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or a usage error argparse already printed
        return stop.code if isinstance(stop.code, int) else 1
    try:
        with warnings.catch_warnings():
            # Library deprecation chatter (torch, transformers) is for developers, not for a command's output.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            return args.run(args)
    except (LNTuneError, OSError, ValueError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fx-lntune`` with every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="LayerNorm tuning (LN tuning) of Hugging Face models as a torch.fx graph rewrite.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_inspect, _add_visualize, _add_merge, _add_export):
        add(commands)
    return parser


# ------------------------------------------------------------------------------------------------- subcommands


def _add_inspect(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "inspect",
        help="dry run: the modules LN tuning would target and the trainable-parameter line",
        description="Dry run on a Hugging Face model directory: list the modules a config would target (and "
        "modules_to_save), with parameter counts, and print PEFT's trainable-parameter line. Nothing is captured "
        "or changed, and no weights are read (the model is built on the meta device).",
    )
    _add_model_argument(parser)
    _add_config_arguments(parser)
    parser.set_defaults(run=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    config = _config(args)
    model = _load_model(args.model_dir, weights=False)
    targets = resolve_targets(model, config)
    saved = resolve_modules_to_save(model, config)
    hf_config = getattr(model, "config", None)
    print(f"model: {type(model).__name__} ({getattr(hf_config, 'model_type', '?')}) from {args.model_dir}")
    rows = [(path, "target") for path in targets] + [(path, "modules_to_save") for path in saved]
    width = max(len(path) for path, _ in rows)
    print(f"targets: {len(targets)}, modules_to_save: {len(saved)}")
    for path, kind in rows:
        module = model.get_submodule(path)
        print(f"  {path.ljust(width)}  {type(module).__name__:<20} {kind:<15} {_count(module):>12,d} params")
    print(trainable_parameters_line(*_dry_run_counts(model, [path for path, _ in rows])))
    return 0


def _add_visualize(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "visualize",
        help="draw the tuned graph (SVG/PNG picture, DOT file, summary table)",
        description="Capture a Hugging Face model directory with lntune_transform and draw its graph: OUT ending "
        "in .svg or .png gets the picture (Graphviz dot when installed, else a built-in SVG layout) and a .dot "
        "file beside it; .dot/.gv gets the DOT file only. The table of adapted modules is printed.",
        epilog=r"examples: fx-lntune visualize MODEL_DIR -o model.svg (a large model: one box per layer); "
        r"fx-lntune visualize MODEL_DIR --diff --filter 'layers\.0\b' --depth 5 -o layer0.svg",
    )
    _add_model_argument(parser)
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help=".svg, .png, .dot or .gv")
    parser.add_argument(
        "--diff",
        action="store_true",
        help="mark what the transform changed, against the graph with adapters unloaded: exactly the nodes whose "
        "module became an adapter-dispatch module, drawn red",
    )
    parser.add_argument(
        "--filter",
        metavar="REGEX",
        help=r"keep the nodes whose module path the regex is found in (re.search, e.g. 'layers\.0\b') and their "
        "neighbours up to --hops edges away",
    )
    parser.add_argument("--hops", type=int, default=1, metavar="N", help="neighbours kept around --filter (default 1)")
    parser.add_argument(
        "--depth",
        type=int,
        metavar="K",
        help="collapse nodes to module groups named by the first K components of their module path",
    )
    parser.add_argument(
        "--by-layer",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"one box per layer of the model, naming the adapted modules in it (default: on for a graph of more "
        f"than {LAYER_VIEW_NODES} nodes when neither --filter nor --depth is given); --no-by-layer draws every node",
    )
    parser.add_argument(
        "--max-dot-size",
        type=int,
        default=DOT_SIZE_LIMIT,
        metavar="N",
        help=f"largest picture (nodes plus edges) Graphviz lays out, default {DOT_SIZE_LIMIT}; a larger .svg is drawn "
        "by the built-in layout, a larger .png refused",
    )
    parser.add_argument(
        "--tracer", default="auto", choices=("auto", "export", "hf_fx", "fx"), help="capture front-end (default auto)"
    )
    _add_config_arguments(parser)
    parser.set_defaults(run=_run_visualize)


def _run_visualize(args: argparse.Namespace) -> int:
    _check_output(args.output)
    config = _config(args)
    model = _load_model(args.model_dir, weights=True)
    if args.filter is not None:  # fail before a long capture when no module can match
        find_module_paths(args.filter, (name for name, _ in model.named_modules()))
    inputs = make_dummy_inputs(model, default_input_names(model))
    gm = fl.lntune_transform(model, config, tracer=args.tracer, example_inputs=inputs)
    result = visualize_graph(
        gm,
        args.output,
        before=fl.unload(gm) if args.diff else None,
        filter_regex=args.filter,
        hops=args.hops,
        depth=args.depth,
        example_inputs=inputs,
        by_layer=args.by_layer,
        max_dot_size=args.max_dot_size,
    )
    print(result.summary)
    drawn = f" (drawn by {'Graphviz dot' if result.renderer == 'dot' else 'the built-in layout'})"
    print(f"graph: {result.graph.number_of_nodes()} nodes, {result.graph.number_of_edges()} edges")
    for index, path in enumerate(result.files):
        print(f"wrote {path}{drawn if index == 0 and result.renderer else ''}")
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _add_merge(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "merge",
        help="write a standard Hugging Face checkpoint with an adapter's weights in it",
        description="Load the model in MODEL_DIR, load the LN-tuning adapter in ADAPTER_DIR (ours or PEFT's) and "
        "write the tuned model to OUT_DIR with save_pretrained, with the model directory's other files "
        "(tokenizer, ...) copied beside it: an ordinary checkpoint that from_pretrained loads, no fx-lntune or "
        "PEFT needed. OUT_DIR must not exist yet or be empty.",
        epilog="example: fx-lntune merge MODEL_DIR ADAPTER_DIR merged/",
    )
    _add_model_argument(parser)
    _add_adapter_argument(parser)
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="where the checkpoint is written")
    parser.set_defaults(run=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    if args.out_dir.exists() and (not args.out_dir.is_dir() or any(args.out_dir.iterdir())):
        raise LNTuneConfigError(f"output '{args.out_dir}' exists and is not an empty folder; choose a new one.")
    if (blocking := file_in_the_way(args.out_dir)) is not None:
        raise LNTuneConfigError(f"output '{args.out_dir}' is under '{blocking}', which is a file; choose another path.")
    model, gm, _ = _tuned_graph(args.model_dir, args.adapter_dir)
    fl.apply_to_model(gm, model, ADAPTER)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir)
    copied = [path.name for path in _companion_files(args.model_dir, args.out_dir)]
    for name in copied:
        shutil.copy2(args.model_dir / name, args.out_dir / name)
    print(f"merged adapter {args.adapter_dir} into {type(model).__name__} from {args.model_dir}")
    print(f"wrote {args.out_dir} (save_pretrained{', plus ' + ', '.join(copied) if copied else ''})")
    return 0


EXPORTERS = {"onnx": fl.export_onnx, "torchscript": fl.export_torchscript, "program": fl.export_program}


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export",
        help="export a model with an adapter merged to ONNX, TorchScript or a torch.export program",
        description="Load the model in MODEL_DIR and the LN-tuning adapter in ADAPTER_DIR (ours or PEFT's), merge "
        "it and write OUT: an ONNX model (needs pip install fx-lntune[onnx]), a TorchScript file or a torch.export "
        "program (.pt2). Batch and sequence are dynamic.",
        epilog="example: fx-lntune export MODEL_DIR ADAPTER_DIR --format onnx model.onnx",
    )
    _add_model_argument(parser)
    _add_adapter_argument(parser)
    parser.add_argument("--format", required=True, choices=sorted(EXPORTERS), help="the file format")
    parser.add_argument("output", type=Path, metavar="OUT", help="the file to write")
    parser.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    if not args.output.parent.is_dir():
        raise LNTuneConfigError(f"the folder of output '{args.output}' does not exist; create it first.")
    _, gm, inputs = _tuned_graph(args.model_dir, args.adapter_dir)
    path = EXPORTERS[args.format](gm, args.output, inputs)
    print(f"exported adapter {args.adapter_dir} merged into {args.model_dir} as {args.format}: wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------ shared parts

# The name the CLI gives the adapter it loads from ADAPTER_DIR.
ADAPTER = "loaded"


def _add_adapter_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "adapter_dir",
        type=Path,
        metavar="ADAPTER_DIR",
        help=f"an LN-tuning adapter directory ({CONFIG_NAME} + {WEIGHTS_NAME}), written by fx-lntune or PEFT",
    )


def _tuned_graph(model_dir: Path, adapter_dir: Path) -> tuple[nn.Module, torch.fx.GraphModule, dict]:
    """(model, tuned graph with the adapter of ``adapter_dir`` loaded and active, the dummy inputs it was captured
    with). The graph is captured with the adapter's own config, so that every module it tunes is a graph leaf."""
    config = read_adapter_config(adapter_dir)  # a clear error before the model is loaded
    model = _load_model(model_dir, weights=True)
    inputs = make_dummy_inputs(model, default_input_names(model))
    gm = fl.lntune_transform(model, config, adapter_name="capture", example_inputs=inputs)
    fl.load_adapter(gm, adapter_dir, ADAPTER)
    fl.set_adapter(gm, ADAPTER)
    return model, gm, inputs


def _companion_files(model_dir: Path, out_dir: Path) -> list[Path]:
    """The files of a model directory that save_pretrained does not write (tokenizer, README, ...): not weights,
    not configs it writes itself, not already in ``out_dir``."""
    weights = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")
    written = {"config.json", "generation_config.json"}
    return sorted(
        path
        for path in model_dir.iterdir()
        if path.is_file()
        and not path.name.endswith(weights)
        and not path.name.endswith(".index.json")
        and path.name not in written
        and not (out_dir / path.name).exists()
    )


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_dir", type=Path, metavar="MODEL_DIR", help="a Hugging Face model directory (config.json + weights)"
    )


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("LN tuning config (default: PEFT's targets for the architecture)")
    targets = group.add_mutually_exclusive_group()
    targets.add_argument("--target", nargs="+", metavar="NAME", help="module names, or name suffixes after a '.'")
    targets.add_argument("--target-regex", metavar="REGEX", help="a regex the full module name must match")
    excludes = group.add_mutually_exclusive_group()
    excludes.add_argument("--exclude", nargs="+", metavar="NAME", help="module names never targeted")
    excludes.add_argument("--exclude-regex", metavar="REGEX", help="a regex of module names never targeted")
    group.add_argument("--modules-to-save", nargs="+", metavar="NAME", help="extra modules trained in full")


def _config(args: argparse.Namespace) -> LNTuningConfig:
    return LNTuningConfig(
        target_modules=args.target_regex if args.target_regex is not None else args.target,
        exclude_modules=args.exclude_regex if args.exclude_regex is not None else args.exclude,
        modules_to_save=args.modules_to_save,
    )


def _load_model(directory: Path, *, weights: bool) -> nn.Module:
    """The model in a Hugging Face model directory, as the class its config names (``architectures[0]``, else
    ``AutoModel``), in eval mode; without ``weights`` built on the meta device (shapes only, nothing read)."""
    if not directory.is_dir():
        raise LNTuneConfigError(f"model directory '{directory}' does not exist or is not a directory.")
    if not (directory / "config.json").is_file():
        if (directory / "adapter_config.json").is_file():
            raise LNTuneConfigError(
                f"'{directory}' is an adapter directory (adapter_config.json); give the base model's directory "
                "as MODEL_DIR (merge and export take the adapter directory as their second argument)."
            )
        raise LNTuneConfigError(f"'{directory}' has no config.json; give a Hugging Face model directory.")
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, names[0], None) if names else None
    if weights:
        loader = model_class if model_class is not None else transformers.AutoModel
        progress = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # a bar per load would clutter the command's output
        try:
            model = loader.from_pretrained(directory, local_files_only=True)
        finally:
            if progress:
                transformers.utils.logging.enable_progress_bar()
    else:
        with torch.device("meta"):
            model = model_class(config) if model_class is not None else transformers.AutoModel.from_config(config)
    return model.eval()


def _dry_run_counts(model: nn.Module, adapted: Sequence[str]) -> tuple[int, int]:
    """``(trainable, total)`` as `get_nb_trainable_parameters` would count them after `lntune_transform`: one
    trainable copy of each adapted module, on top of the model's own parameters (each shared tensor once)."""
    copies = {id(p): p.numel() for path in adapted for p in model.get_submodule(path).parameters()}
    base = {id(p): p.numel() for p in model.parameters()}
    trainable = sum(copies.values())
    return trainable, sum(base.values()) + trainable


def _check_output(path: Path) -> None:
    if path.suffix.lower().lstrip(".") not in PICTURE_FORMATS + DOT_FORMATS:
        raise LNTuneConfigError(f"output '{path}' must end in .svg, .png, .dot or .gv.")
    if not path.parent.is_dir():
        blocking = file_in_the_way(path)
        if blocking is not None:
            raise LNTuneConfigError(f"output '{path}' is under '{blocking}', which is a file; choose another path.")
        raise LNTuneConfigError(f"the folder of output '{path}' does not exist; create it first.")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


if __name__ == "__main__":
    sys.exit(main())
