"""Routing and checks under the adapter verbs: which adapter each dispatch module computes (`apply_selection`), the
checks of adapter names and PEFT flags, and the hooks a tuned graph carries (call-input check, untied state dict).

Below `fx_lntune.api` and `fx_lntune.adapters`, which both build on it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.errors import LNTuneAdapterError, LNTuneConfigError, LNTuneTraceError
from fx_lntune.state import LNTuneState, dispatch_modules, get_state

__all__ = [
    "apply_selection",
    "check_adapter_exists",
    "check_adapter_name",
    "check_call_inputs",
    "check_low_cpu_mem_usage",
    "install_call_check",
    "untie_state_dict",
]


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


def check_adapter_exists(state: LNTuneState, adapter_name: Any) -> None:
    """Refuse a name that is no adapter of the graph whose state is ``state``."""
    if not isinstance(adapter_name, str) or adapter_name not in state.configs:
        raise LNTuneAdapterError(f"no adapter named {adapter_name!r}; the adapters are: {', '.join(state.configs)}.")
