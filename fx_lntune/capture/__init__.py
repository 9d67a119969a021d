"""Capture front-ends: a model and keyword inputs in, a GraphModule whose targeted modules are leaves out.

Every front-end returns a plain ``torch.fx.GraphModule`` with the model's parameter paths, in which each
module in ``leaves`` is a ``call_module`` node. Nothing downstream knows which one ran.

``tracer="auto"`` tries, in order, for a Hugging Face model: ``export`` (every architecture, any transformers
version, dynamic shapes), then ``hf_fx`` where transformers < 5 provides it; for any other module: ``fx``
(shape-agnostic symbolic tracing), then ``export``. The first that captures wins.

Whatever the front-end, each layer of the model then becomes a GraphModule of its own that the root graph calls
(`passes.split_layers`), and attention stops keeping copies the eager model does not keep (`passes.attention`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture.export import capture_export
from fx_lntune.capture.fx import capture_fx, capture_hf_fx, hf_fx_available
from fx_lntune.capture.layers import find_layers
from fx_lntune.errors import LNTuneTraceError
from fx_lntune.inputs import InputPlan
from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.attention import group_query_heads, share_attention_mask
from fx_lntune.passes.image_count import free_image_count
from fx_lntune.passes.keyword_inputs import keyword_inputs, model_output_in_graph
from fx_lntune.passes.model_loss import add_model_loss
from fx_lntune.passes.split_layers import split_layers

__all__ = ["TRACERS", "capture", "hf_fx_available"]

TRACERS = ("auto", "export", "hf_fx", "fx")

_FRONTENDS = {"export": capture_export, "hf_fx": capture_hf_fx, "fx": capture_fx}


def capture(
    model: nn.Module,
    leaves: Sequence[str],
    example_inputs: Mapping[str, torch.Tensor],
    tracer: str = "auto",
    spare: Sequence[str] = (),
    plan: InputPlan | None = None,
) -> tuple[torch.fx.GraphModule, str]:
    """Capture ``model`` with the front-end ``tracer`` names; return the graph module and the front-end used.

    Every module in ``leaves`` must become a ``call_module`` node (in the root graph or a layer's); those in
    ``spare`` (normalization modules no adapter targets yet) do where the front-end can, so that a later adapter
    can target them. With a ``plan`` (`fx_lntune.inputs.plan_inputs`) the capture uses its inputs and the graph
    gets its keyword interface: optional inputs with the model's defaults and ``labels`` giving the model's loss.
    Each of the model's repeated layers then becomes a GraphModule of its own. ``model`` is not modified.
    """
    if tracer not in TRACERS:
        raise LNTuneTraceError(f"unknown tracer {tracer!r}; choose one of {', '.join(TRACERS)}.")
    if plan is not None:
        example_inputs = plan.capture_inputs
    gm, used = _capture_flat(model, leaves, example_inputs, tracer, spare)
    if plan is not None:
        _apply_plan(gm, plan)
    run_pass(free_image_count, gm, cleanup=True)
    gm = run_pass(split_layers, gm, layers=find_layers(model))
    # What a training step keeps beyond the eager model: repeated key/value heads, a float mask per layer.
    gm = run_pass(group_query_heads, gm, cleanup=True)
    return run_pass(share_attention_mask, gm), used


def _capture_flat(
    model: nn.Module,
    leaves: Sequence[str],
    example_inputs: Mapping[str, torch.Tensor],
    tracer: str,
    spare: Sequence[str],
) -> tuple[torch.fx.GraphModule, str]:
    if tracer != "auto":
        gm, used = _FRONTENDS[tracer](model, leaves, example_inputs, spare), tracer
    else:
        errors = []
        for name in _auto_order(model):
            try:
                gm, used = _FRONTENDS[name](model, leaves, example_inputs, spare), name
                break
            except LNTuneTraceError as error:
                errors.append(error)
        else:
            raise LNTuneTraceError(" | ".join(str(error) for error in errors)) from errors[0]
    return gm, used


def _apply_plan(gm: torch.fx.GraphModule, plan: InputPlan) -> None:
    if not plan.defaults and plan.loss is None and plan.signature == list(plan.capture_inputs):
        return
    run_pass(model_output_in_graph, gm, output_class=plan.output_class)
    run_pass(keyword_inputs, gm, signature=plan.signature, defaults=plan.defaults)
    if plan.loss is not None:
        run_pass(add_model_loss, gm, **plan.loss)


def _auto_order(model: nn.Module) -> list[str]:
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return ["export", "hf_fx"] if hf_fx_available() else ["export"]
    return ["fx", "export"]
