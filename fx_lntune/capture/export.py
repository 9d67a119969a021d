"""The `torch.export` front-end: works for every architecture on any transformers version."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture import cache as capture_cache
from fx_lntune.capture._build import alias_model, build_graph_module, capture_mode, trace_error
from fx_lntune.inputs import dynamic_shapes_for
from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.device import follow_input_device
from fx_lntune.passes.dropout import fold_dropout
from fx_lntune.passes.dtype import follow_weight_dtype
from fx_lntune.passes.fold import fold_module_calls

__all__ = ["capture_export"]

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
    key = capture_cache.capture_key(model, example_inputs, dynamic_shapes_for(example_inputs))
    cached = capture_cache.load(key, model, example_inputs)
    if cached is not None:
        graph, unlifted = cached
    else:
        graph, unlifted, training = _export(model, example_inputs)
        capture_cache.store(key, graph, unlifted, model, training)
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


def _export(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> tuple[torch.fx.Graph, nn.Module, bool]:
    """The raw capture: export's unlifted graph without its shape checks, the module holding its constants and
    subgraphs, and whether it was captured in training mode. What the capture cache stores."""
    errors = []
    for training in (True, False):
        try:
            with capture_mode(model, training=training), _no_stack_traces():
                program = torch.export.export(
                    model,
                    (),
                    dict(example_inputs),
                    strict=False,
                    dynamic_shapes=dynamic_shapes_for(example_inputs),
                )
            break
        except Exception as error:  # noqa: BLE001 - reported below with the front-end's name
            errors.append(error)
    else:
        raise trace_error(
            "export",
            model,
            errors[-1],
            "tracer='hf_fx' (transformers < 5) or tracer='fx', and check that example_inputs are what the "
            "model's forward takes",
        ) from errors[-1]

    unlifted = program.module()
    graph = unlifted.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    for module in unlifted.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in list(module.graph.nodes):
                if node.target in _CHECK_OPS:
                    module.graph.erase_node(node)
            if module is not unlifted:
                module.recompile()
    return graph, unlifted, training


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
