"""The `torch.export` front-end: works for every architecture on any transformers version."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture import layers
from fx_lntune.capture._build import alias_model, build_graph_module, capture_mode, trace_error
from fx_lntune.inputs import dynamic_shapes_for
from fx_lntune.modules import set_submodule
from fx_lntune.passes._graphs import graph_modules
from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.device import follow_input_device
from fx_lntune.passes.dropout import fold_dropout
from fx_lntune.passes.dtype import follow_weight_dtype
from fx_lntune.passes.fold import fold_module_calls
from fx_lntune.passes.repeat_layers import CannotRepeat, LayerRun, repeat_layers

__all__ = ["capture_export"]

log = logging.getLogger(__name__)

# Nodes export adds that pin the graph to the capture's device, dtype and shapes; the eager model has none.
_CHECK_OPS = {torch.ops.aten._assert_tensor_metadata.default}


def capture_export(
    model: nn.Module,
    leaves: Sequence[str],
    example_inputs: Mapping[str, torch.Tensor],
    spare: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """Capture ``model`` with ``torch.export.export(strict=False)`` and dynamic batch/sequence dimensions, then
    fold each module in ``leaves`` (and every dropout) back into one ``call_module`` node. Modules in ``spare``
    are folded where their call fits (one tensor in, one out) and left flat otherwise.

    The model is captured in training mode, so that dropout appears in the graph, and falls back to evaluation
    mode where training-only code cannot be captured. Works on a copy: ``model`` is left as it was.
    """
    graph, unlifted = _export(model, example_inputs)
    shell = alias_model(model)
    dropouts = [name for name, module in shell.named_modules() if isinstance(module, nn.modules.dropout._DropoutNd)]
    gm = build_graph_module(
        shell, graph, leaves=[*leaves, *spare, *dropouts], fallback=unlifted, class_name=type(model).__name__
    )
    gm = run_pass(fold_module_calls, gm, paths=[*leaves, *spare, *dropouts], required=leaves)
    gm = run_pass(fold_dropout, gm, cleanup=True)
    gm = run_pass(follow_input_device, gm)
    gm = run_pass(follow_weight_dtype, gm)
    gm.train(model.training)
    return gm


def _export(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> tuple[torch.fx.Graph, nn.Module]:
    """The raw capture: export's unlifted graph without its shape checks, and the module holding its constants
    and subgraphs.

    Tracing is nearly all of a capture's time and grows with depth, so a model whose layers are alike
    (`capture.layers.layer_runs`) is exported with its layer lists shortened to three alike layers, and
    `passes.repeat_layers` copies the last one for each layer left out: the same graph as exporting every layer.
    Where that cannot be done (the layers' graphs differ, or the model needs all its layers to run), the whole
    model is exported.
    """
    runs = layers.layer_runs(model)
    attempts = [(runs, True), (runs, False)] if runs else []
    attempts += [([], True), ([], False)]
    errors = []
    while attempts:
        shortened, training = attempts.pop(0)
        try:
            with capture_mode(model, training=training), _no_stack_traces(), _shortened(model, shortened) as read:
                program = torch.export.export(
                    model,
                    (),
                    dict(example_inputs),
                    strict=False,
                    dynamic_shapes=dynamic_shapes_for(example_inputs),
                )
        except Exception as error:  # noqa: BLE001 - reported below with the front-end's name
            errors.append(error)
            continue
        unlifted = _unlift(program)
        try:
            if read:
                raise CannotRepeat("its forward computes with a layer number")
            if shortened:
                run_pass(repeat_layers, unlifted, runs=shortened, layer_module=model.get_submodule)
        except CannotRepeat as why:
            log.info("capturing every layer of %s: %s", type(model).__name__, why)
            attempts = [attempt for attempt in attempts if not attempt[0]]
            continue
        return unlifted.graph, unlifted
    raise trace_error(
        "export",
        model,
        errors[-1],
        "tracer='hf_fx' (transformers < 5) or tracer='fx', and check that example_inputs are what the "
        "model's forward takes",
    ) from errors[-1]


def _unlift(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """``program`` as a GraphModule, without export's guard call and tensor-metadata checks."""
    unlifted = program.module()
    graph = unlifted.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for _, module in graph_modules(unlifted):
        for node in list(module.graph.nodes):
            if node.target in _CHECK_OPS:
                module.graph.erase_node(node)
        if module is not unlifted:
            module.recompile()
    return unlifted


@contextlib.contextmanager
def _shortened(model: nn.Module, runs: Sequence[LayerRun]) -> Iterator[list[str]]:
    """Give each layer list of ``runs`` only its first ``captured`` layers for the capture, then restore it.

    The list object is swapped for a shallow copy holding fewer layers; the layers themselves are untouched but
    for their layer numbers (``layer_idx``), which are watched: the list yielded names every one the forward
    compared, indexed with or computed on. Copying layers is right only when the number decides nothing in the
    graph (in Hugging Face models it picks a KV-cache slot, and the cache is off during capture).
    """
    swapped, watched, read = [], [], []
    try:
        for run in runs:
            whole = model.get_submodule(run.path)
            short = copy.copy(whole)
            short._modules = dict(list(whole._modules.items())[: run.captured])
            set_submodule(model, run.path, short)
            swapped.append((run.path, whole))
            for module in short.modules():
                for attribute in layers.LAYER_NUMBERS & vars(module).keys():
                    number = getattr(module, attribute)
                    if type(number) is int:
                        watched.append((module, attribute, number))
                        setattr(module, attribute, _WatchedNumber(number, read))
        yield read
    finally:
        for module, attribute, number in watched:
            setattr(module, attribute, number)
        for path, whole in reversed(swapped):
            set_submodule(model, path, whole)


class _WatchedNumber(int):
    """An ``int`` that notes in ``read`` when anything is computed from it (compared, hashed, indexed with)."""

    def __new__(cls, value: int, read: list[str]) -> _WatchedNumber:
        number = super().__new__(cls, value)
        number._read = read
        return number


def _watch(name: str) -> Callable[..., Any]:
    method = getattr(int, name)

    def watched(self: _WatchedNumber, *args: Any) -> Any:
        self._read.append(name)
        return method(int(self), *args)

    return watched


for _name in (
    *("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__bool__", "__index__"),
    *("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__mod__", "__rmod__"),
    *("__floordiv__", "__rfloordiv__", "__truediv__", "__rtruediv__", "__pow__", "__neg__", "__and__", "__or__"),
    *("__float__", "__format__", "__str__", "__repr__"),
):
    setattr(_WatchedNumber, _name, _watch(_name))


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Skip recording a Python stack trace for every node during export, then restore the setting.

    Nothing downstream reads ``node.meta["stack_trace"]`` (capture errors come from the exception's own
    traceback), and extracting and symbolizing one traceback per node is ~10% of a 7B capture.
    """
    config = torch.fx.config
    previous = getattr(config, "do_not_emit_stack_traces", False)
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = previous
