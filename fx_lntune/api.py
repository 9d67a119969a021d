"""The public functions over a tuned GraphModule: transform, and the trainable-parameter helpers."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.adapters import add_adapter
from fx_lntune.capture import capture
from fx_lntune.config import (
    LNTuningConfig,
    as_config,
    is_normalization_module,
    resolve_modules_to_save,
    resolve_targets,
)
from fx_lntune.dispatch import LNTuningDispatch
from fx_lntune.errors import LNTuneConfigError, LNTuneStateError, LNTuneTraceError
from fx_lntune.generation import generation_state
from fx_lntune.inputs import check_example_inputs, default_input_names, make_dummy_inputs, plan_inputs
from fx_lntune.meta_device import guard_meta_weights
from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.inject import inject_adapters
from fx_lntune.routing import (
    apply_selection,
    check_adapter_name,
    check_low_cpu_mem_usage,
    install_call_check,
    untie_state_dict,
)
from fx_lntune.state import META_KEY, LNTuneState, attach_state, dispatch_modules, get_state

__all__ = [
    "lntune_transform",
    "targeted_module_names",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "active_adapter",
    "active_adapters",
    "list_adapters",
    "check_adapter_name",
    "apply_selection",
]


def lntune_transform(
    model: nn.Module,
    config: LNTuningConfig | Any,
    adapter_name: str = "default",
    *,
    tracer: str = "auto",
    input_names: Sequence[str] | None = None,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    low_cpu_mem_usage: bool = False,
    cache: bool = True,
) -> torch.fx.GraphModule:
    """Capture ``model`` as a ``torch.fx.GraphModule`` and give it the LN-tuning adapter ``adapter_name``.

    Every module the config targets becomes an adapter-dispatch module at its own path (``P.base_layer``,
    ``P.ln_tuning_layers.<adapter>``); every other weight is frozen and shares storage with ``model``, which is
    not modified. The adapter starts equal to the base, so outputs equal the model's. ``config`` may also be a
    ``peft.LNTuningConfig``.

    ``example_inputs`` (keyword tensors) drive the capture; without them, small dummy inputs are made for
    ``input_names`` (default: the inputs a user of this model class passes); one example of batch or length 1
    is enough. The graph accepts any batch size and sequence length, by keyword: for a Hugging Face model the
    inputs its forward takes that users pass (the example's, plus those of `fx_lntune.inputs.plan_inputs`:
    masks, ``token_type_ids``, ``position_ids``, ``decoder_*``, optional with the model's defaults) and ``labels``,
    which put the model's own loss first in its output. An input it does not take raises `LNTuneTraceError`.
    A plain module captured with ``tracer="fx"`` needs no ``example_inputs``: symbolic tracing takes the
    forward's parameters as they are.

    ``config`` may be a dict ``{adapter_name: config}``: each adapter is added in order and the first is active
    (``adapter_name`` is then unused). ``low_cpu_mem_usage`` is accepted for PEFT's signature and, as in PEFT's
    LN tuning, changes nothing: the adapter copies are made from the base weights either way.

    ``cache`` is accepted for the contract's signature and changes nothing: captures are not kept on disk (the
    capture cache was removed, issue 19: a warm load saved too little of a capture that traces three layers).
    """
    if not isinstance(model, nn.Module):
        raise LNTuneTraceError(
            f"lntune_transform needs a torch.nn.Module, got {type(model).__name__}; pass the model itself."
        )
    if isinstance(model, torch.fx.GraphModule) and META_KEY in model.meta:
        raise LNTuneStateError(
            "this graph is already tuned (made by lntune_transform): use add_adapter(gm, name, config) to give it "
            "another adapter, or transform the original model."
        )
    check_low_cpu_mem_usage(low_cpu_mem_usage)
    configs = _named_configs(config, adapter_name)
    for name in configs:
        check_adapter_name(name, existing=())
    adapter_name, config = next(iter(configs.items()))
    targets = resolve_targets(model, config)
    saved = resolve_modules_to_save(model, config)
    others: list[str] = []
    for other in list(configs.values())[1:]:
        others += [
            p for p in [*resolve_targets(model, other), *resolve_modules_to_save(model, other)] if p not in others
        ]
    inputs = _example_inputs(model, input_names, example_inputs, tracer)
    plan = plan_inputs(model, inputs)

    leaves = [*targets, *saved, *(path for path in others if path not in targets and path not in saved)]
    gm, used = capture(model, leaves, plan.capture_inputs, tracer, spare=_spare_norms(model, leaves), plan=plan)
    gm = run_pass(inject_adapters, gm, adapter_name=adapter_name, targets=targets, modules_to_save=saved)
    hf_config = getattr(model, "config", None)
    state = LNTuneState(
        configs={adapter_name: config},
        active_adapter=adapter_name,
        tracer=used,
        input_names=list(plan.signature),
        model_type=getattr(hf_config, "model_type", None),
        base_model_name_or_path=getattr(hf_config, "_name_or_path", None) or None,
        model_class=type(model).__name__,
        extra=generation_state(model),
    )
    attach_state(gm, state)
    if hf_config is not None:
        # `gm.config` as on the model (HF Trainer and users read it); kept through deepcopy by torch.fx.
        gm.config = hf_config
        gm.meta.setdefault("_user_preserved_attributes", {})["config"] = hf_config
    names = tuple(inspect.signature(gm.forward).parameters)
    install_call_check(gm, names)
    # torch.fx's deepcopy keeps state-dict hooks but not forward hooks: this puts the check on every copy.
    gm._register_deepcopy_hook(functools.partial(install_call_check, names=names))
    gm.register_state_dict_post_hook(untie_state_dict)
    apply_selection(gm)
    if len(configs) > 1:
        for name, other in list(configs.items())[1:]:
            add_adapter(gm, name, other)
    guard_meta_weights(gm)
    return gm


def _named_configs(config: Any, adapter_name: str) -> dict[str, LNTuningConfig]:
    """``{adapter name: config}`` from one config, or from a dict of configs (PEFT's ``peft_config`` form)."""
    if isinstance(config, Mapping) and config and all(_is_config(value) for value in config.values()):
        if adapter_name != "default":
            raise LNTuneConfigError(
                f"adapter_name={adapter_name!r} together with a dict of configs: the dict's keys name the adapters "
                "(the first is active); drop adapter_name."
            )
        return {name: as_config(value) for name, value in config.items()}
    return {adapter_name: as_config(config)}


def _is_config(value: Any) -> bool:
    return isinstance(value, LNTuningConfig) or type(value).__name__.endswith("Config")


def _spare_norms(model: nn.Module, taken: Sequence[str]) -> list[str]:
    """Normalization modules with weights that no adapter targets yet, outside the taken modules: captured as
    leaves too, so that a later adapter can target them without a new capture."""
    spare: list[str] = []
    inside = tuple(f"{path}." for path in taken)
    for name, module in model.named_modules():
        if not name or name in taken or name.startswith(inside) or not is_normalization_module(module):
            continue
        if next(module.parameters(), None) is not None:
            spare.append(name)
            inside += (f"{name}.",)
    return spare


def _example_inputs(
    model: nn.Module,
    input_names: Sequence[str] | None,
    example_inputs: Mapping[str, torch.Tensor] | None,
    tracer: str = "auto",
) -> dict[str, torch.Tensor]:
    if example_inputs is not None:
        if not isinstance(example_inputs, Mapping) or not all(isinstance(key, str) for key in example_inputs):
            raise LNTuneTraceError(
                "example_inputs must be a dict of keyword inputs, e.g. {'input_ids': ids, 'attention_mask': mask}; "
                f"got {type(example_inputs).__name__}."
            )
        check_example_inputs(model, example_inputs)
        return dict(example_inputs)
    names = list(input_names) if input_names is not None else default_input_names(model)
    check_example_inputs(model, dict.fromkeys(names), source="input_names")
    if tracer == "fx" and getattr(model, "config", None) is None:
        return dict.fromkeys(names)  # symbolic tracing needs the names only
    return make_dummy_inputs(model, names)


def targeted_module_names(gm: torch.fx.GraphModule) -> list[str]:
    """The paths of the modules tuned by any adapter of ``gm`` (not ``modules_to_save``), in graph order."""
    get_state(gm)
    return [name for name, module in dispatch_modules(gm).items() if isinstance(module, LNTuningDispatch)]


def active_adapter(gm: torch.fx.GraphModule) -> str | None:
    """The name of the adapter ``gm``'s forward uses; ``None`` once the last adapter is deleted (the graph then
    computes the base model)."""
    return get_state(gm).active_adapter


def active_adapters(gm: torch.fx.GraphModule) -> list[str]:
    """PEFT's ``active_adapters``: ``[active_adapter(gm)]``, or ``[]`` once the last adapter is deleted. LN tuning
    runs one adapter at a time, so the list never holds more."""
    active = get_state(gm).active_adapter
    return [] if active is None else [active]


def list_adapters(gm: torch.fx.GraphModule) -> list[str]:
    """The names of ``gm``'s adapters, in the order they were added."""
    return list(get_state(gm).configs)


def get_nb_trainable_parameters(gm: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, counted as PEFT counts them (each shared tensor once)."""
    trainable = total = 0
    for param in gm.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def print_trainable_parameters(gm: nn.Module) -> None:
    """Print PEFT's line: ``trainable params: N || all params: M || trainable%: P``."""
    print(trainable_parameters_line(*get_nb_trainable_parameters(gm)))


def trainable_parameters_line(trainable: int, total: int) -> str:
    """PEFT's line for ``(trainable, total)`` parameter counts."""
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"
