"""The adapter lifecycle over a tuned GraphModule: add, switch, disable, delete, merge, unmerge and unload.

Functions that change adapter state (`add_adapter`, `set_adapter`, `delete_adapter`, `merge_adapter`,
`unmerge_adapter`, `disable_adapters`, `disable_adapter_layers`, `enable_adapter_layers`) work in place on the tuned
graph. Functions that produce a plain graph
(`merge_and_unload`, `unload`) work on a copy: the tuned graph is left exactly as it was, and the result
shares parameter storage with it (nothing is copied).
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.config import (
    DEFAULT_TARGET_MODULES,
    LNTuningConfig,
    as_config,
    resolve_modules_to_save,
    resolve_targets,
)
from fx_lntune.dispatch import AdapterDispatch, LNTuningDispatch, ModulesToSaveDispatch
from fx_lntune.errors import LNTuneAdapterError, LNTuneConfigError, LNTuneStateError
from fx_lntune.modules import set_submodule
from fx_lntune.passes._graphs import leaf_calls
from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.inject import NODE_MARK, inject_adapters
from fx_lntune.passes.merge import merge_adapters, unmerge_adapters
from fx_lntune.passes.unload import unload_adapters
from fx_lntune.routing import apply_selection, check_adapter_exists, check_adapter_name, check_low_cpu_mem_usage
from fx_lntune.state import LNTuneState, dispatch_modules, get_state

__all__ = [
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "disable_adapter_layers",
    "enable_adapter_layers",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "peft_config",
    "resolve_adapter_modules",
    "resolved_config",
]


def add_adapter(
    gm: torch.fx.GraphModule,
    adapter_name: str,
    config: LNTuningConfig | Any = None,
    *,
    low_cpu_mem_usage: bool = False,
) -> None:
    """Add adapter ``adapter_name`` (in place); the active adapter does not change.

    ``config`` defaults to the active adapter's. The new adapter may target other modules than the existing
    ones (any module the capture made a graph leaf: every normalization module, and the first adapter's
    targets); its copies start from the base weights, also while another adapter is merged. On a graph whose
    last adapter was deleted, ``config`` is required and the new adapter becomes the active one.
    ``low_cpu_mem_usage`` is PEFT's flag and, as in PEFT's LN tuning, changes nothing.

    This is `passes.inject_adapters` (the graph pass that wraps the modules) plus registering the adapter in the
    graph's state and choosing what trains.
    """
    state = get_state(gm)
    check_low_cpu_mem_usage(low_cpu_mem_usage)
    check_adapter_name(adapter_name, existing=list(state.configs))
    if config is None and state.active_adapter is None:
        raise LNTuneConfigError(
            f"the graph has no adapter left to copy the config from; pass one: add_adapter(gm, {adapter_name!r}, "
            "LNTuningConfig(...))."
        )
    config = as_config(config) if config is not None else copy.deepcopy(state.configs[state.active_adapter])
    targets, saved = resolve_adapter_modules(gm, config)
    run_pass(inject_adapters, gm, adapter_name=adapter_name, targets=targets, modules_to_save=saved)
    state.configs[adapter_name] = config
    if state.active_adapter is None:
        state.active_adapter = adapter_name
    apply_selection(gm)


def resolve_adapter_modules(gm: torch.fx.GraphModule, config: LNTuningConfig) -> tuple[list[str], list[str]]:
    """The paths of the modules a new adapter with ``config`` would tune and save in ``gm``; ``gm`` is unchanged.

    Everything `add_adapter` needs is checked here, before anything is injected, so that a refused config leaves the
    graph as it was.

    Raises:
        LNTuneConfigError: the config matches nothing, names a module the capture did not keep as a graph leaf, or
            makes a module both tuned and saved across adapters.
    """
    view = _model_view(gm)
    targets = resolve_targets(view, config)
    saved = resolve_modules_to_save(view, config)
    leaves = set(leaf_calls(gm))
    missing = [path for path in [*targets, *saved] if path not in leaves]
    if missing:
        raise LNTuneConfigError(
            f"the config targets {missing[:5]}, which the capture did not keep as graph leaves (it keeps every "
            "normalization module and the first adapter's targets); capture again with lntune_transform and a "
            "first config that names them."
        )
    for paths, kind in [(targets, LNTuningDispatch), (saved, ModulesToSaveDispatch)]:
        for path in paths:
            module = gm.get_submodule(path)
            if isinstance(module, AdapterDispatch) and not isinstance(module, kind):
                raise LNTuneConfigError(
                    f"module '{path}' is a {type(module).__name__} for another adapter and cannot also be a "
                    f"{kind.__name__}; keep it in either target_modules or modules_to_save for every adapter."
                )
    return targets, saved


def set_adapter(gm: torch.fx.GraphModule, adapter_name: str, inference_mode: bool | None = None) -> None:
    """Make ``adapter_name`` the active adapter (in place): forward uses its copies, and only they train.

    ``inference_mode`` is PEFT's: ``True`` freezes the adapter, ``False`` makes it trainable. ``None`` (the default)
    lets the adapter's config decide (``inference_mode``, or ``is_trainable`` at `load_adapter`); PEFT's default,
    ``False``, would make a frozen loaded adapter trainable. A one-element list is taken as its one name; LN tuning
    runs one adapter at a time, so a longer list is refused. Costs no re-trace: each dispatch module re-points its
    route. A merged adapter is unmerged first, with a warning, as PEFT does.
    """
    state = get_state(gm)
    adapter_name = _single_name(adapter_name, "set_adapter")
    check_adapter_exists(state, adapter_name)
    if inference_mode is not None and not isinstance(inference_mode, bool):
        raise LNTuneConfigError(
            f"inference_mode must be True, False or None, got {type(inference_mode).__name__} {inference_mode!r}."
        )
    if state.merged_adapter is not None and state.merged_adapter != adapter_name:
        warnings.warn(f"adapter {state.merged_adapter!r} is merged; unmerging it before switching.", stacklevel=2)
        unmerge_adapter(gm)
    state.active_adapter = adapter_name
    state.inference_mode = inference_mode
    apply_selection(gm)


def _single_name(adapter_name: Any, function: str) -> Any:
    """The one name in a list of one; a longer list is refused (LN tuning runs one adapter at a time)."""
    if isinstance(adapter_name, (list, tuple)):
        if len(adapter_name) == 1:
            return adapter_name[0]
        raise LNTuneAdapterError(
            f"{function} got {list(adapter_name)!r}, but LN tuning runs one adapter at a time (PEFT's LN tuning "
            "refuses a forward with several active adapters too); pass one adapter name."
        )
    return adapter_name


def delete_adapter(gm: torch.fx.GraphModule, adapter_name: str) -> None:
    """Delete ``adapter_name`` and its copies (in place).

    Deleting the active adapter activates the first remaining one in sorted order of names. PEFT picks the same
    way, but per layer: from the adapters that layer has, so an adapter that does not tune every layer can leave
    PEFT's layers with different active adapters; here one adapter is active for the whole graph. A merged adapter
    must be unmerged first. Deleting the last adapter is allowed, as in PEFT: the graph then computes the base
    model, `active_adapter` is ``None`` and `active_adapters` is ``[]`` (`add_adapter` with a config starts again).
    """
    state = get_state(gm)
    check_adapter_exists(state, adapter_name)
    if state.merged_adapter == adapter_name:
        raise LNTuneAdapterError(f"adapter {adapter_name!r} is merged; call unmerge_adapter(gm) before deleting it.")
    for path, module in dispatch_modules(gm).items():
        if adapter_name in module.copies:
            module.remove_copy(adapter_name)
        if not module.copies:
            _unwrap(gm, path, module)
    del state.configs[adapter_name]
    if state.active_adapter == adapter_name:
        state.inference_mode = None
        state.active_adapter = sorted(state.configs)[0] if state.configs else None
        if state.active_adapter is not None:
            warnings.warn(
                f"adapter {adapter_name!r} was active and is deleted; the active adapter is now "
                f"{state.active_adapter!r}.",
                stacklevel=2,
            )
    apply_selection(gm)


@contextlib.contextmanager
def disable_adapters(gm: torch.fx.GraphModule) -> Iterator[None]:
    """Inside the block, ``gm`` computes the base model's outputs bit for bit and nothing trains.

    The state found on entry (active adapter, merged or not) returns on exit, also when the block raises.
    """
    state = get_state(gm)
    previous = state.disabled
    state.disabled = True
    apply_selection(gm)
    try:
        yield
    finally:
        state.disabled = previous
        apply_selection(gm)


def disable_adapter_layers(gm: torch.fx.GraphModule) -> None:
    """Disable every adapter (in place), as PEFT's ``disable_adapter_layers``: the graph computes the base model
    and nothing trains until `enable_adapter_layers`. A merged adapter is unmerged first (PEFT does too), with a
    warning. For a block that restores the state on exit, use the `disable_adapters` context manager."""
    state = get_state(gm)
    if state.merged_adapter is not None:
        warnings.warn(f"adapter {state.merged_adapter!r} is merged; unmerging it before disabling.", stacklevel=2)
        unmerge_adapter(gm)
    state.disabled = True
    apply_selection(gm)


def enable_adapter_layers(gm: torch.fx.GraphModule) -> None:
    """Undo `disable_adapter_layers` (in place): the active adapter computes and trains again."""
    state = get_state(gm)
    state.disabled = False
    apply_selection(gm)


def merge_adapter(
    gm: torch.fx.GraphModule,
    adapter_name: str | list[str] | None = None,
    *,
    adapter_names: list[str] | None = None,
    safe_merge: bool = False,
) -> None:
    """Merge ``adapter_name`` (default: the active one) into the base weights (in place, reversible).

    PEFT's form works too: ``adapter_names=["a"]`` (or a list as the first argument). LN tuning merges one adapter
    at a time, so a list of several is refused, as PEFT refuses it; an empty list merges nothing. With
    ``safe_merge=True`` the adapter's weights are checked for NaN and inf first, and the merge is refused (nothing
    changed) if there are any. LN tuning's merge is a swap of modules, so it is exact, and `unmerge_adapter`
    restores the base weights bit for bit. Merging the merged adapter again warns and does nothing; merging another
    unmerges first.
    """
    state = get_state(gm)
    names = _merge_names(state, adapter_name, adapter_names, safe_merge, "merge_adapter")
    if not names:
        return
    (adapter_name,) = names
    if state.merged_adapter == adapter_name:
        warnings.warn(f"adapter {adapter_name!r} is already merged; nothing to do.", stacklevel=2)
        return
    if safe_merge:
        _check_finite(gm, adapter_name)
    if state.merged_adapter is not None:
        warnings.warn(f"adapter {state.merged_adapter!r} is merged; unmerging it first.", stacklevel=2)
    run_pass(merge_adapters, gm, adapter_name=adapter_name)
    state.merged_adapter = adapter_name
    apply_selection(gm)


def _merge_names(
    state: LNTuneState, adapter_name: Any, adapter_names: Any, safe_merge: Any, function: str
) -> list[str]:
    """The adapter a merge takes (a list of at most one name), every argument checked first."""
    if not isinstance(safe_merge, bool):
        raise LNTuneConfigError(f"safe_merge must be True or False, got {type(safe_merge).__name__} {safe_merge!r}.")
    if isinstance(adapter_name, (list, tuple)):
        if adapter_names is not None:
            raise LNTuneAdapterError(f"{function} got adapter names twice; pass either adapter_name or adapter_names.")
        adapter_name, adapter_names = None, adapter_name
    if adapter_names is not None:
        if adapter_name is not None:
            raise LNTuneAdapterError(f"{function} got adapter names twice; pass either adapter_name or adapter_names.")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
            raise LNTuneAdapterError(
                f"adapter_names must be a list of adapter names, got {adapter_names!r} (as in PEFT); write "
                f"adapter_names=[{adapter_names!r}] or adapter_name={adapter_names!r}."
            )
        if len(adapter_names) > 1:
            raise LNTuneAdapterError(
                f"{function} got {len(adapter_names)} adapters {list(adapter_names)!r}, but LN tuning merges one "
                "adapter at a time (PEFT refuses this too); merge one of them."
            )
        names = list(adapter_names)
    else:
        names = [state.active_adapter if adapter_name is None else adapter_name]
        if names == [None]:
            return []  # the last adapter was deleted: nothing to merge, as in PEFT
    for name in names:
        check_adapter_exists(state, name)
    return names


def _check_finite(gm: torch.fx.GraphModule, adapter_name: str) -> None:
    bad = []
    for path, module in dispatch_modules(gm).items():
        holder = (
            module.base
            if module.merged_adapter == adapter_name
            else module.copies[adapter_name]
            if adapter_name in module.copies
            else None
        )
        if holder is None:
            continue
        for key, tensor in holder.state_dict().items():
            if tensor.is_floating_point() and not tensor.is_meta and not bool(torch.isfinite(tensor).all()):
                bad.append(f"{path}.{key}")
    if bad:
        raise LNTuneStateError(
            f"safe_merge: adapter {adapter_name!r} holds NaN or inf in {bad[:5]}"
            + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else "")
            + "; nothing was merged. Check the training run (learning rate, fp16 overflow) or reload the adapter."
        )


def unmerge_adapter(gm: torch.fx.GraphModule) -> None:
    """Undo `merge_adapter` (in place): the base weights return bit for bit. Warns when nothing is merged."""
    state = get_state(gm)
    if state.merged_adapter is None:
        warnings.warn("no adapter is merged; nothing to unmerge.", stacklevel=2)
        return
    run_pass(unmerge_adapters, gm)
    state.merged_adapter = None
    apply_selection(gm)


def merge_and_unload(
    gm: torch.fx.GraphModule,
    adapter_name: str | None = None,
    progressbar: bool = False,
    safe_merge: bool = False,
    adapter_names: list[str] | None = None,
) -> torch.fx.GraphModule:
    """A plain ``torch.fx.GraphModule`` computing ``adapter_name``'s outputs (default: the active adapter).

    PEFT's arguments work too: ``adapter_names=["a"]`` (one name: LN tuning merges one adapter at a time; an empty
    list merges nothing and gives the base model, as in PEFT) and ``safe_merge=True`` (refuse an adapter holding
    NaN or inf, before anything is copied). Works on a copy that shares parameter storage with ``gm``; ``gm`` is
    unchanged. The result's graph is node for node the captured graph, its module tree holds no fx-lntune class,
    and its state dict has the model's own keys.
    """
    state = get_state(gm)
    names = _merge_names(state, adapter_name, adapter_names, safe_merge, "merge_and_unload")
    if not names:
        return unload(gm, progressbar=progressbar)
    (adapter_name,) = names
    if safe_merge:
        _check_finite(gm, adapter_name)
    plain = _copy_sharing_tensors(gm)
    plain = run_pass(merge_adapters, plain, adapter_name=adapter_name, progressbar=progressbar)
    return run_pass(unload_adapters, plain, cleanup=True, progressbar=progressbar)


def unload(gm: torch.fx.GraphModule, progressbar: bool = False) -> torch.fx.GraphModule:
    """A plain ``torch.fx.GraphModule`` computing the base model's outputs, whatever is merged.

    Works on a copy that shares parameter storage with ``gm``; ``gm`` is unchanged.
    """
    get_state(gm)
    plain = run_pass(unmerge_adapters, _copy_sharing_tensors(gm))
    return run_pass(unload_adapters, plain, cleanup=True, progressbar=progressbar)


def peft_config(gm: torch.fx.GraphModule) -> dict[str, LNTuningConfig]:
    """PEFT's ``peft_model.peft_config``: each adapter's config by name, in the order they were added, with
    ``target_modules`` resolved as PEFT resolves it (``None`` becomes PEFT's default list for the model type, or
    the tuned module paths for a model type PEFT has no default for) and ``base_model_name_or_path`` filled in
    from the model when the config has none. Copies: changing them changes nothing in ``gm``."""
    state = get_state(gm)
    return {name: resolved_config(gm, name) for name in state.configs}


def resolved_config(gm: torch.fx.GraphModule, adapter_name: str) -> LNTuningConfig:
    """A copy of adapter ``adapter_name``'s config with ``target_modules`` resolved (see `peft_config`)."""
    state = get_state(gm)
    check_adapter_exists(state, adapter_name)
    config = copy.deepcopy(state.configs[adapter_name])
    if config.target_modules is None:
        default = DEFAULT_TARGET_MODULES.get(state.model_type) if state.model_type else None
        tuned = [
            path
            for path, module in dispatch_modules(gm).items()
            if isinstance(module, LNTuningDispatch) and adapter_name in _adapters_of(module)
        ]
        config.target_modules = list(default) if default is not None else tuned
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = state.base_model_name_or_path
    return config


def _adapters_of(module: AdapterDispatch) -> list[str]:
    return [*module.copies, *([module.merged_adapter] if module.merged_adapter is not None else [])]


def _unwrap(gm: torch.fx.GraphModule, path: str, module: AdapterDispatch) -> None:
    set_submodule(gm, path, module.original())
    for node in leaf_calls(gm).get(path, ()):
        node.meta.pop(NODE_MARK, None)


def _model_view(gm: torch.fx.GraphModule) -> nn.Module:
    """A module tree with the model's names in which each dispatch module shows as the module it replaced, for
    matching a new adapter's patterns the way they would match the model."""
    # Named as the model's class, so that a message about the view names the model.
    view = type(get_state(gm).model_class or type(gm).__name__, (nn.Module,), {})()
    pending = [(view, gm)]
    while pending:
        mirror, module = pending.pop()
        for name, child in module._modules.items():
            if child is None:
                continue
            if isinstance(child, AdapterDispatch):
                mirror.add_module(name, child.original())
            else:
                inner = nn.Module() if child._modules else child
                mirror.add_module(name, inner)
                if inner is not child:
                    pending.append((inner, child))
    view.config = getattr(gm, "config", None) or types.SimpleNamespace(model_type=get_state(gm).model_type)
    return view


def _copy_sharing_tensors(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` whose parameters share storage with ``gm``'s but are parameter objects of their own,
    so that freezing them in the copy leaves ``gm``'s trainable parameters as they were."""
    memo: dict[int, Any] = {id(t): t for t in gm.buffers()}
    for param in gm.parameters():
        memo[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
    return copy.deepcopy(gm, memo)
