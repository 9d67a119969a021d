"""The `torch.fx.symbolic_trace` front-end, for plain PyTorch modules, and its Hugging Face variant."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture._build import alias_model, build_graph_module, capture_mode, trace_error
from fx_lntune.errors import LNTuneTraceError

__all__ = ["capture_fx", "capture_hf_fx", "hf_fx_available"]


class _LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping the targeted modules as leaves on top of its own rule."""

    def __init__(self, leaves: Sequence[str]) -> None:
        super().__init__()
        self.leaves = frozenset(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def capture_fx(
    model: nn.Module,
    leaves: Sequence[str],
    example_inputs: Mapping[str, torch.Tensor],
    spare: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """Capture ``model`` with plain ``torch.fx`` symbolic tracing (shape-agnostic: any batch or length).

    Inputs not in ``example_inputs`` are bound to their defaults. Works on a copy: ``model`` is unchanged.
    """
    concrete = _defaults_outside(model, example_inputs)
    with capture_mode(model, training=False):
        try:
            graph = _LeafTracer([*leaves, *spare]).trace(model, concrete_args=concrete)
        except Exception as error:  # noqa: BLE001 - reported with the front-end's name
            raise trace_error("fx", model, error, "tracer='export'") from error
    return _finish(model, graph, leaves, spare)


def hf_fx_available() -> bool:
    """True where transformers still ships `transformers.utils.fx` (it was removed in 5.0)."""
    try:
        import transformers.utils.fx  # noqa: F401
    except ImportError:
        return False
    return True


def capture_hf_fx(
    model: nn.Module,
    leaves: Sequence[str],
    example_inputs: Mapping[str, torch.Tensor],
    spare: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """Capture a Hugging Face model with ``transformers.utils.fx``'s tracer, targeted modules kept as leaves.

    Works on a copy: ``model`` (including its ``config.use_cache``) is unchanged.
    """
    if not hf_fx_available():
        raise LNTuneTraceError(
            "tracer='hf_fx' needs transformers.utils.fx, which transformers 5 removed; use tracer='export' "
            "(or 'auto'), or install transformers<5."
        )
    from transformers.utils.fx import HFTracer

    class LeafHFTracer(HFTracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return module_qualified_name in leaf_set or super().is_leaf_module(m, module_qualified_name)

    leaf_set = frozenset([*leaves, *spare])
    with capture_mode(model, training=False):
        try:
            concrete = _defaults_outside(model, example_inputs)
            graph = LeafHFTracer().trace(model, concrete_args=concrete, dummy_inputs=dict(example_inputs))
        except Exception as error:  # noqa: BLE001 - reported with the front-end's name
            raise trace_error("hf_fx", model, error, "tracer='export'") from error
    return _finish(model, graph, leaves, spare)


def _finish(
    model: nn.Module, graph: torch.fx.Graph, leaves: Sequence[str], spare: Sequence[str]
) -> torch.fx.GraphModule:
    called = {str(node.target) for node in graph.nodes if node.op == "call_module"}
    missing = [path for path in leaves if path not in called]
    if missing:
        raise LNTuneTraceError(
            f"the captured graph of {type(model).__name__} never calls {missing[:5]} as a module, so they cannot "
            "be tuned; exclude them or use tracer='export'."
        )
    gm = build_graph_module(alias_model(model), graph, leaves=[*leaves, *spare], class_name=type(model).__name__)
    gm.train(model.training)
    return gm


def _defaults_outside(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> dict:
    import inspect

    concrete = {}
    for name, parameter in inspect.signature(model.forward).parameters.items():
        if name in example_inputs or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty:
            concrete[name] = parameter.default
    return concrete
