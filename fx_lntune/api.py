"""The public functions over a tuned GraphModule: transform, and the trainable-parameter helpers."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture import capture
from fx_lntune.capture.cache import caching
from fx_lntune.config import (
    LNTuningConfig,
    as_config,
    is_normalization_module,
    resolve_modules_to_save,
    resolve_targets,
)
from fx_lntune.dispatch import LNTuningDispatch
from fx_lntune.errors import LNTuneAdapterError, LNTuneConfigError, LNTuneStateError, LNTuneTraceError
from fx_lntune.generation import generation_state
from fx_lntune.inputs import check_example_inputs, default_input_names, make_dummy_inputs, plan_inputs
from fx_lntune.meta_device import guard_meta_weights
from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.inject import inject_adapters
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

    ``cache``: reuse (and store) the raw capture in the on-disk capture cache (``$FX_LNTUNE_CACHE_DIR``, default
    ``~/.cache/fx-lntune``; see `fx_lntune.capture.cache`); ``False`` captures afresh and writes nothing.
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
    with caching(cache):
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
        from fx_lntune.adapters import add_adapter  # adapters.py builds on this module

        for name, other in list(configs.items())[1:]:
            add_adapter(gm, name, other)
    guard_meta_weights(gm)
    return gm


def untie_state_dict(gm: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A state-dict hook: a tensor seen under a second key (tied embeddings, ``lm_head.weight``) is given there as a
    copy (in place in ``state_dict``; the graph's own parameters stay tied).

    Every key stays, as in the model's state dict, but no two share memory: safetensors refuses shared tensors,
    and Hugging Face's ``Trainer`` saves a model that is no ``PreTrainedModel`` with ``safetensors.save_file`` of
    its state dict (the end-of-training checkpoint would fail). Loading the file back fills both keys.
    """
    seen: set[tuple[Any, ...]] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or value.is_meta:
            continue
        try:
            storage = (value.device, value.untyped_storage().data_ptr())
        except RuntimeError:  # a tensor subclass with no storage of its own (FSDP's DTensor shards): nothing shared
            continue
        if storage in seen:
            state_dict[key] = value.detach().clone()
        else:
            seen.add(storage)


def install_call_check(gm: torch.fx.GraphModule, names: tuple[str, ...]) -> None:
    """Make ``gm`` refuse a call with an input not in ``names`` (in place; see `check_call_inputs`)."""
    gm.register_forward_pre_hook(functools.partial(check_call_inputs, names=names), with_kwargs=True)


def check_call_inputs(
    gm: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *, names: tuple[str, ...]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """A forward pre-hook: refuse an input the graph does not take (not in ``names``, the forward's parameters)
    with `LNTuneTraceError` naming it and the inputs it takes, before the call (Python's own ``TypeError`` would
    not say what to do). An input given as ``None`` that the graph does not take is dropped, as leaving it out
    means the same."""
    parameters = names
    unknown = [name for name in kwargs if name not in parameters]
    if not unknown:
        return None
    given = [name for name in unknown if kwargs[name] is not None]
    if given:
        raise LNTuneTraceError(
            f"the graph takes no input {given[0]!r}{' (nor ' + repr(given[1:]) + ')' if given[1:] else ''}; it takes "
            f"{list(parameters)} by keyword. Drop it, or capture with it in example_inputs if the model's forward "
            "takes it."
        )
    return args, {name: value for name, value in kwargs.items() if name in parameters}


def check_low_cpu_mem_usage(low_cpu_mem_usage: Any) -> None:
    """PEFT's ``low_cpu_mem_usage`` flag: a bool, with no effect on LN tuning (as in PEFT)."""
    if not isinstance(low_cpu_mem_usage, bool):
        raise LNTuneConfigError(
            f"low_cpu_mem_usage must be True or False, got {type(low_cpu_mem_usage).__name__} {low_cpu_mem_usage!r}."
        )


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


_PATH_CHARACTERS = frozenset("./\\:")
# An adapter name is a key of the nn.ModuleDict holding the copies: it cannot be one of its attributes.
_RESERVED_NAMES = frozenset(dir(nn.ModuleDict()))


def check_adapter_name(adapter_name: Any, *, existing: Sequence[str]) -> None:
    """Refuse names that cannot be a module key or a safe directory name, and names already in use."""
    if not isinstance(adapter_name, str) or not adapter_name:
        raise LNTuneAdapterError(f"an adapter name must be a non-empty string, got {adapter_name!r}.")
    # ':' makes a drive-relative path on Windows ("C:x"); control characters (NUL) are no file name at all.
    if any(char in _PATH_CHARACTERS or ord(char) < 32 for char in adapter_name):
        raise LNTuneAdapterError(
            f"adapter name {adapter_name!r} contains '.', '/', '\\', ':' or a control character; these would "
            "break module paths or lead out of a save directory. Use letters, digits, '-' or '_'."
        )
    if adapter_name in _RESERVED_NAMES:
        raise LNTuneAdapterError(
            f"adapter name {adapter_name!r} is an attribute of torch.nn.ModuleDict, which holds the adapter copies, "
            "so it cannot be a key there; choose another name, e.g. 'my_adapter'."
        )
    if adapter_name in existing:
        raise LNTuneAdapterError(
            f"adapter {adapter_name!r} already exists (adapters: {', '.join(existing)}); choose another name or "
            "delete_adapter it first."
        )


def apply_selection(gm: torch.fx.GraphModule) -> None:
    """Make every dispatch module route and train as the graph's state says (in place).

    While an adapter is merged, forward computes that adapter alone (as `merge_and_unload` does), also where it
    has no copy and the active adapter has one, and nothing trains.
    """
    state = get_state(gm)
    merged = state.merged_adapter
    route = merged if merged is not None else state.active_adapter
    active = state.active_adapter
    frozen = state.inference_mode
    if frozen is None:
        frozen = active is None or state.configs[active].inference_mode
    trainable = not frozen and not state.disabled and merged is None
    for module in dispatch_modules(gm).values():
        module.select(route, disabled=state.disabled)
        module.set_trainable(state.active_adapter, trainable)


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
    trainable, total = get_nb_trainable_parameters(gm)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
