"""The public functions over a tuned GraphModule: transform, and the trainable-parameter helpers."""

from __future__ import annotations

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
from fx_lntune.errors import LNTuneAdapterError, LNTuneTraceError
from fx_lntune.inputs import check_example_inputs, default_input_names, make_dummy_inputs
from fx_lntune.meta_device import guard_meta_weights
from fx_lntune.state import LNTuneState, attach_state, dispatch_modules, get_state
from passes._runner import run_pass
from passes.inject import inject_adapters

__all__ = [
    "lntune_transform",
    "targeted_module_names",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "active_adapter",
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
    cache: bool = True,
) -> torch.fx.GraphModule:
    """Capture ``model`` as a ``torch.fx.GraphModule`` and give it the LN-tuning adapter ``adapter_name``.

    Every module the config targets becomes an adapter-dispatch module at its own path (``P.base_layer``,
    ``P.ln_tuning_layers.<adapter>``); every other weight is frozen and shares storage with ``model``, which is
    not modified. The adapter starts equal to the base, so outputs equal the model's. ``config`` may also be a
    ``peft.LNTuningConfig``.

    ``example_inputs`` (keyword tensors) drive the capture; without them, small dummy inputs are made for
    ``input_names`` (default: the inputs a user of this model class passes). The graph accepts any batch
    size and sequence length, by keyword with the same names.

    ``cache``: reuse (and store) the raw capture in the on-disk capture cache (``$FX_LNTUNE_CACHE_DIR``, default
    ``~/.cache/fx-lntune``; see `fx_lntune.capture.cache`); ``False`` captures afresh and writes nothing.
    """
    if not isinstance(model, nn.Module):
        raise LNTuneTraceError(
            f"lntune_transform needs a torch.nn.Module, got {type(model).__name__}; pass the model itself."
        )
    config = as_config(config)
    check_adapter_name(adapter_name, existing=())
    targets = resolve_targets(model, config)
    saved = resolve_modules_to_save(model, config)
    inputs = _example_inputs(model, input_names, example_inputs)

    with caching(cache):
        gm, used = capture(model, [*targets, *saved], inputs, tracer, spare=_spare_norms(model, [*targets, *saved]))
    gm = run_pass(inject_adapters, gm, adapter_name=adapter_name, targets=targets, modules_to_save=saved)
    hf_config = getattr(model, "config", None)
    state = LNTuneState(
        configs={adapter_name: config},
        active_adapter=adapter_name,
        tracer=used,
        input_names=list(inputs),
        model_type=getattr(hf_config, "model_type", None),
        base_model_name_or_path=getattr(hf_config, "_name_or_path", None) or None,
        model_class=type(model).__name__,
    )
    attach_state(gm, state)
    if hf_config is not None:
        # `gm.config` as on the model (HF Trainer and users read it); kept through deepcopy by torch.fx.
        gm.config = hf_config
        gm.meta.setdefault("_user_preserved_attributes", {})["config"] = hf_config
    apply_selection(gm)
    guard_meta_weights(gm)
    return gm


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
    model: nn.Module, input_names: Sequence[str] | None, example_inputs: Mapping[str, torch.Tensor] | None
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
    trainable = not state.configs[state.active_adapter].inference_mode and not state.disabled and merged is None
    for module in dispatch_modules(gm).values():
        module.select(route, disabled=state.disabled)
        module.set_trainable(state.active_adapter, trainable)


def targeted_module_names(gm: torch.fx.GraphModule) -> list[str]:
    """The paths of the modules tuned by any adapter of ``gm`` (not ``modules_to_save``), in graph order."""
    get_state(gm)
    return [name for name, module in dispatch_modules(gm).items() if isinstance(module, LNTuningDispatch)]


def active_adapter(gm: torch.fx.GraphModule) -> str:
    """The name of the adapter ``gm``'s forward uses."""
    return get_state(gm).active_adapter


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
