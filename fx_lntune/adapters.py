"""The adapter lifecycle over a tuned GraphModule: add, switch, disable, delete, merge, unmerge and unload.

Functions that change adapter state (`add_adapter`, `set_adapter`, `delete_adapter`, `merge_adapter`,
`unmerge_adapter`, `disable_adapters`) work in place on the tuned graph. Functions that produce a plain graph
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

from fx_lntune.api import apply_selection, check_adapter_name
from fx_lntune.config import LNTuningConfig, as_config, resolve_modules_to_save, resolve_targets
from fx_lntune.dispatch import AdapterDispatch, LNTuningDispatch, ModulesToSaveDispatch
from fx_lntune.errors import LNTuneAdapterError, LNTuneConfigError
from fx_lntune.layers import leaf_calls
from fx_lntune.modules import set_submodule
from fx_lntune.state import LNTuneState, dispatch_modules, get_state
from passes._runner import run_pass
from passes.inject import NODE_MARK, inject_adapters
from passes.merge import merge_adapters, unmerge_adapters
from passes.unload import unload_adapters

__all__ = [
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "resolve_adapter_modules",
]


def add_adapter(gm: torch.fx.GraphModule, adapter_name: str, config: LNTuningConfig | Any = None) -> None:
    """Add adapter ``adapter_name`` (in place); the active adapter does not change.

    ``config`` defaults to the active adapter's. The new adapter may target other modules than the existing
    ones (any module the capture made a graph leaf: every normalization module, and the first adapter's
    targets); its copies start from the base weights, also while another adapter is merged.
    """
    state = get_state(gm)
    check_adapter_name(adapter_name, existing=list(state.configs))
    config = as_config(config) if config is not None else copy.deepcopy(state.configs[state.active_adapter])
    targets, saved = resolve_adapter_modules(gm, config)
    run_pass(inject_adapters, gm, adapter_name=adapter_name, targets=targets, modules_to_save=saved)
    state.configs[adapter_name] = config
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


def set_adapter(gm: torch.fx.GraphModule, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter (in place): forward uses its copies, and only they train.

    Costs no re-trace: each dispatch module re-points its route. A merged adapter is unmerged first, with a
    warning, as PEFT does.
    """
    state = get_state(gm)
    _check_exists(state, adapter_name)
    if state.merged_adapter is not None and state.merged_adapter != adapter_name:
        warnings.warn(f"adapter {state.merged_adapter!r} is merged; unmerging it before switching.", stacklevel=2)
        unmerge_adapter(gm)
    state.active_adapter = adapter_name
    apply_selection(gm)


def delete_adapter(gm: torch.fx.GraphModule, adapter_name: str) -> None:
    """Delete ``adapter_name`` and its copies (in place).

    Deleting the active adapter activates the first remaining one in sorted order, as PEFT does. A merged
    adapter must be unmerged first, and the last adapter cannot be deleted (use `unload`).
    """
    state = get_state(gm)
    _check_exists(state, adapter_name)
    if state.merged_adapter == adapter_name:
        raise LNTuneAdapterError(f"adapter {adapter_name!r} is merged; call unmerge_adapter(gm) before deleting it.")
    if len(state.configs) == 1:
        raise LNTuneAdapterError(
            f"adapter {adapter_name!r} is the only adapter; use unload(gm) to get the base graph back instead."
        )
    for path, module in dispatch_modules(gm).items():
        if adapter_name in module.copies:
            module.remove_copy(adapter_name)
        if not module.copies:
            _unwrap(gm, path, module)
    del state.configs[adapter_name]
    if state.active_adapter == adapter_name:
        state.active_adapter = sorted(state.configs)[0]
        warnings.warn(
            f"adapter {adapter_name!r} was active and is deleted; the active adapter is now {state.active_adapter!r}.",
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


def merge_adapter(gm: torch.fx.GraphModule, adapter_name: str | None = None) -> None:
    """Merge ``adapter_name`` (default: the active one) into the base weights (in place, reversible).

    LN tuning's merge is a swap of modules, so it is exact, and `unmerge_adapter` restores the base weights
    bit for bit. Merging the merged adapter again warns and does nothing; merging another unmerges first.
    """
    state = get_state(gm)
    adapter_name = state.active_adapter if adapter_name is None else adapter_name
    _check_exists(state, adapter_name)
    if state.merged_adapter == adapter_name:
        warnings.warn(f"adapter {adapter_name!r} is already merged; nothing to do.", stacklevel=2)
        return
    if state.merged_adapter is not None:
        warnings.warn(f"adapter {state.merged_adapter!r} is merged; unmerging it first.", stacklevel=2)
    run_pass(merge_adapters, gm, adapter_name=adapter_name)
    state.merged_adapter = adapter_name
    apply_selection(gm)


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
    gm: torch.fx.GraphModule, adapter_name: str | None = None, progressbar: bool = False
) -> torch.fx.GraphModule:
    """A plain ``torch.fx.GraphModule`` computing ``adapter_name``'s outputs (default: the active adapter).

    Works on a copy that shares parameter storage with ``gm``; ``gm`` is unchanged. The result's graph is node
    for node the captured graph, its module tree holds no fx-lntune class, and its state dict has the model's
    own keys.
    """
    state = get_state(gm)
    adapter_name = state.active_adapter if adapter_name is None else adapter_name
    _check_exists(state, adapter_name)
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


def _check_exists(state: LNTuneState, adapter_name: Any) -> None:
    if not isinstance(adapter_name, str) or adapter_name not in state.configs:
        raise LNTuneAdapterError(f"no adapter named {adapter_name!r}; the adapters are: {', '.join(state.configs)}.")


def _unwrap(gm: torch.fx.GraphModule, path: str, module: AdapterDispatch) -> None:
    set_submodule(gm, path, module.original())
    for node in leaf_calls(gm).get(path, ()):
        node.meta.pop(NODE_MARK, None)


def _model_view(gm: torch.fx.GraphModule) -> nn.Module:
    """A module tree with the model's names in which each dispatch module shows as the module it replaced, for
    matching a new adapter's patterns the way they would match the model."""
    view = nn.Module()
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
