"""Adapter files in PEFT's LN-tuning format (safetensors + ``adapter_config.json``), and tuned weights written back
into the Hugging Face model.

The format is PEFT's, so files go both ways between fx-lntune and ``peft.PeftModel``:

- ``adapter_model.safetensors`` (metadata ``{"format": "pt"}``): for a tuned module at path ``P``, its state-dict
  entries as ``base_model.model.P.ln_tuning_layers.<key>``; for a ``modules_to_save`` module at ``P``, as
  ``base_model.model.P.<key>``. The adapter name is in no key, so a file loads under any name.
- ``adapter_config.json``: PEFT's ``LNTuningConfig`` fields (``json.dumps(indent=2, sort_keys=True)``, as PEFT).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.fx
import torch.nn as nn

from fx_lntune.adapters import add_adapter, delete_adapter, resolve_adapter_modules, resolved_config
from fx_lntune.config import LNTuningConfig
from fx_lntune.dispatch import AdapterDispatch, LNTuningDispatch
from fx_lntune.errors import LNTuneConfigError, LNTuneStateError
from fx_lntune.files import file_in_the_way, staged_files
from fx_lntune.routing import check_adapter_exists, check_adapter_name, check_low_cpu_mem_usage
from fx_lntune.state import LNTuneState, dispatch_modules, get_state

__all__ = [
    "read_adapter_config",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "CARD_NAME",
    "save_adapter",
    "load_adapter",
    "load_adapter_weights",
    "apply_to_model",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
# PEFT's keys start with the PeftModel's path to the model; ln_tuning_layers is PEFT's slot for tuned copies.
_KEY_PREFIX = "base_model.model."
_TUNED_SLOT = "ln_tuning_layers"
_METADATA = {"format": "pt"}
_PICKLE_NAME = "adapter_model.bin"
_SHOWN_KEYS = 3
_SAFETENSORS_ERRORS = (safetensors.SafetensorError, OSError, ValueError, RuntimeError, TypeError)


def save_adapter(
    gm: torch.fx.GraphModule,
    directory: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    model_card: bool = True,
) -> None:
    """Write adapter ``adapter_name`` (default: the active one) to ``directory`` as PEFT does for LN tuning.

    Writes ``adapter_config.json`` and ``adapter_model.safetensors`` (creating ``directory`` if needed) with PEFT's
    keys, the adapter's own dtypes and values, so ``peft.PeftModel.from_pretrained(base_model, directory)`` and
    `load_adapter` both load it. Unlike PEFT, the files go into ``directory`` itself whatever the adapter's name.
    With ``model_card`` (the default) a ``README.md`` model card is written beside them as PEFT writes it (front
    matter ``library_name: peft``, ``base_model``, ``tags`` with ``base_model:adapter:<model>`` and
    ``transformers``, ``pipeline_tag: text-generation`` for ``task_type="CAUSAL_LM"``); an existing ``README.md``
    keeps its text and gets those fields, as PEFT updates it.

    - A merged adapter is saved with its own (tuned) weights, not the base weights its copy slot holds while merged.
    - ``target_modules=None`` is written resolved: PEFT's default list for the model type, or the adapter's module
      paths for a model type PEFT has no default for (PEFT would refuse ``null`` there).
    - ``inference_mode`` is the config's own value (PEFT writes ``true`` and ignores it on load), so the config
      round-trips through the file; ``auto_mapping`` is PEFT's when the model is a ``transformers`` class.

    Atomic: all files are written to temporary files in ``directory`` and then renamed over the old ones; on any
    failure the previous files are put back and no temporary file is left. ``gm`` is not changed.

    Raises:
        LNTuneAdapterError: no adapter ``adapter_name``.
        LNTuneStateError: ``directory`` or one of its parents is an existing file.
    """
    state = get_state(gm)
    adapter_name = state.active_adapter if adapter_name is None else adapter_name
    check_adapter_exists(state, adapter_name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LNTuneStateError(
            f"{directory} is a file; save_adapter writes its files (config, weights, model card) into a directory: "
            "pass one."
        )
    blocking = file_in_the_way(directory)
    if blocking is not None:
        raise LNTuneStateError(
            f"cannot save the adapter to {directory}: {blocking} is a file, not a directory, so nothing can be "
            "written under it. Pass a directory path whose parents are directories (or do not exist yet)."
        )
    if not isinstance(model_card, bool):
        raise LNTuneStateError(f"model_card must be True or False, got {type(model_card).__name__} {model_card!r}.")
    tensors = {key: _detached_copy(value) for key, value in _adapter_tensors(gm, adapter_name)}
    data = _peft_config_dict(gm, state, adapter_name)
    text = json.dumps(data, indent=2, sort_keys=True)
    writers: dict[str, Callable[[Path], None]] = {
        WEIGHTS_NAME: lambda path: safetensors.torch.save_file(tensors, str(path), metadata=_METADATA),
        CONFIG_NAME: lambda path: path.write_text(text, encoding="utf-8"),
    }
    if model_card:
        card = _model_card(gm, state, data, directory / CARD_NAME)
        writers[CARD_NAME] = lambda path: path.write_text(card, encoding="utf-8")
    directory.mkdir(parents=True, exist_ok=True)
    with staged_files(directory) as staging:
        for name, write in writers.items():
            write(staging / name)


def load_adapter(
    gm: torch.fx.GraphModule,
    directory: str | os.PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool | None = None,
    low_cpu_mem_usage: bool = False,
) -> None:
    """Add the adapter saved in ``directory`` (by `save_adapter` or ``PeftModel.save_pretrained``) as ``adapter_name``.

    In place. The adapter's config is rebuilt from ``adapter_config.json`` (`LNTuningConfig.from_dict`), the adapter
    is added with it (`add_adapter`: the active adapter does not change; call `set_adapter` to use it), and its
    copies get the file's weights, ``modules_to_save`` included. Floating-point tensors are cast to the dtype (and
    device) of the graph tensor they load into, as PEFT does; any other dtype must match exactly. Only safetensors
    is read, never a pickle (``adapter_model.bin``).

    ``is_trainable`` overrides the file's ``inference_mode`` (PEFT always writes ``true``): ``True`` loads an
    adapter to train further, ``False`` a frozen one; ``None`` keeps what the file says. Config keys this version
    does not know (a newer PEFT's) are ignored with a warning naming them. ``low_cpu_mem_usage`` is PEFT's flag and
    changes nothing for LN tuning.

    Everything is checked before the graph is touched; on any error the graph (adapters, code, state dict,
    outputs) is unchanged.

    Raises:
        LNTuneAdapterError: ``adapter_name`` is invalid or exists already.
        LNTuneStateError: a file is missing, corrupt or truncated; the safetensors header is inconsistent; the
            config is not LN tuning, has a wrong value or targets nothing here (another architecture); the weights
            have keys this graph has no place for, lack keys, or have wrong shapes or dtypes. The message names the
            file and the key.
    """
    state = get_state(gm)
    check_low_cpu_mem_usage(low_cpu_mem_usage)
    check_adapter_name(adapter_name, existing=list(state.configs))
    directory = Path(directory)
    if not directory.is_dir():
        raise LNTuneStateError(
            f"adapter directory {directory} does not exist; pass the directory save_adapter or "
            "PeftModel.save_pretrained wrote (a non-default PEFT adapter is in a subdirectory named after it)."
        )
    config = _read_config(directory / CONFIG_NAME)
    if is_trainable is not None:
        config = dataclasses.replace(config, inference_mode=not is_trainable)
    tensors = _read_weights(directory / WEIGHTS_NAME)
    try:
        targets, saved = resolve_adapter_modules(gm, config)
    except LNTuneConfigError as exc:
        raise LNTuneStateError(
            f"{directory / CONFIG_NAME} does not fit this graph of {state.model_class or 'its model'}: {exc} "
            f"{_saved_from(config)}"
        ) from exc
    _check_weights(directory / WEIGHTS_NAME, tensors, _expected_tensors(gm, targets, saved))
    add_adapter(gm, adapter_name, config)
    try:
        for path, module, holder in _adapter_holders(gm, adapter_name):
            prefix = _file_prefix(path, module)
            holder.load_state_dict({key: tensors[prefix + key] for key in holder.state_dict()}, strict=True)
    except BaseException:
        delete_adapter(gm, adapter_name)  # not the active adapter: no warning, the graph is as before
        raise


def load_adapter_weights(
    gm: torch.fx.GraphModule, directory: str | os.PathLike, adapter_name: str | None = None
) -> None:
    """Copy the weights saved in ``directory`` into the existing adapter ``adapter_name`` (default: the active one).

    In place: the adapter's tensors keep their identity (an optimizer holding them stays valid) and get the file's
    values, cast to their own dtype and device, as ``PeftModel.load_adapter`` does for an adapter name it has
    already. The adapter's config, trainability and the active adapter do not change. This is how a ``Trainer``
    checkpoint (`fx_lntune.trainer.adapter_checkpoints`) is loaded back.

    Everything is checked before a tensor is written; on any error the graph is unchanged.

    Raises:
        LNTuneAdapterError: no adapter ``adapter_name``.
        LNTuneStateError: a file is missing or corrupt, the config is not LN tuning, or the weights are not exactly
            this adapter's (keys, shapes, kind of dtype): the file was saved from another adapter or model.
    """
    state = get_state(gm)
    adapter_name = state.active_adapter if adapter_name is None else adapter_name
    check_adapter_exists(state, adapter_name)
    directory = Path(directory)
    _read_config(directory / CONFIG_NAME)
    tensors = _read_weights(directory / WEIGHTS_NAME)
    slots = dict(_adapter_tensors(gm, adapter_name, keep_vars=True))
    _check_weights(directory / WEIGHTS_NAME, tensors, slots)
    with torch.no_grad():
        for key, slot in slots.items():
            slot.copy_(tensors[key])


def apply_to_model(gm: torch.fx.GraphModule, model: nn.Module, adapter_name: str | None = None) -> None:
    """Write adapter ``adapter_name``'s weights (default: the active adapter) into ``model``, in place.

    Every tuned module and every ``modules_to_save`` module of ``model`` gets the adapter's values, in the model's
    own dtype and on its own device, so ``model.save_pretrained(...)`` then writes an ordinary checkpoint that
    ``from_pretrained`` loads with the tuned behaviour. The model's module gets new tensors (same dtype, device and
    ``requires_grad``; every tied alias in ``model`` is re-pointed too) rather than being overwritten, because the
    graph shares its base weights' storage with the model it was captured from: ``gm`` keeps its base weights and
    is not changed. A merged adapter gives its own weights.

    Raises:
        LNTuneAdapterError: no adapter ``adapter_name``.
        LNTuneStateError: ``model`` lacks a module the adapter tunes, or the module's weights differ in names,
            shapes or kind of dtype, are on the meta device, or are tied in ``model`` but tuned apart. Checked
            before anything is written: on error ``model`` is unchanged.
    """
    state = get_state(gm)
    adapter_name = state.active_adapter if adapter_name is None else adapter_name
    check_adapter_exists(state, adapter_name)
    if not isinstance(model, nn.Module):
        raise LNTuneStateError(f"apply_to_model writes into a torch.nn.Module, got {type(model).__name__}.")
    writes = _planned_writes(gm, model, adapter_name)
    slots = _tensor_slots(model)
    with torch.no_grad():
        for old, source in writes.values():
            new = source.to(device=old.device, dtype=old.dtype, copy=True)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for table, name in slots[id(old)]:
                table[name] = new


def read_adapter_config(directory: str | os.PathLike) -> LNTuningConfig:
    """The `LNTuningConfig` in ``directory``'s ``adapter_config.json`` (ours or PEFT's), without loading weights.

    Raises:
        LNTuneStateError: the file is missing, not JSON, not a PEFT config, or not LN tuning.
    """
    return _read_config(Path(directory) / CONFIG_NAME)


def _file_prefix(path: str, module: AdapterDispatch) -> str:
    slot = f".{_TUNED_SLOT}." if isinstance(module, LNTuningDispatch) else "."
    return f"{_KEY_PREFIX}{path}{slot}"


def _adapter_holders(gm: torch.fx.GraphModule, adapter_name: str) -> Iterator[tuple[str, AdapterDispatch, nn.Module]]:
    """``(path, dispatch module, module holding the adapter's weights)`` for each module the adapter has a copy of.

    LN tuning merges by swapping modules, so a merged adapter's weights are in the base slot.
    """
    for path, module in dispatch_modules(gm).items():
        if module.merged_adapter == adapter_name:
            yield path, module, module.base
        elif adapter_name in module.copies:
            yield path, module, module.copies[adapter_name]


def _adapter_tensors(
    gm: torch.fx.GraphModule, adapter_name: str, *, keep_vars: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    for path, module, holder in _adapter_holders(gm, adapter_name):
        for key, value in holder.state_dict(keep_vars=keep_vars).items():
            yield _file_prefix(path, module) + key, value


def _detached_copy(tensor: torch.Tensor) -> torch.Tensor:
    # A copy on the CPU: safetensors refuses tensors that share storage, and needs them contiguous.
    return tensor.detach().to("cpu", copy=True).contiguous()


def _peft_config_dict(gm: torch.fx.GraphModule, state: LNTuneState, adapter_name: str) -> dict[str, Any]:
    config = resolved_config(gm, adapter_name)
    data = config.to_peft_dict(state.base_model_name_or_path)
    if config.auto_mapping is None:
        data["auto_mapping"] = _auto_mapping(state.model_class) if config.task_type is None else None
    return data


def _model_card(gm: torch.fx.GraphModule, state: LNTuneState, data: dict[str, Any], existing: Path) -> str:
    """The ``README.md`` PEFT's ``save_pretrained`` writes for this adapter (its metadata rules), as text."""
    from huggingface_hub import ModelCard, ModelCardData

    card = ModelCard.load(existing) if existing.is_file() else ModelCard.from_template(ModelCardData())
    card.data["library_name"] = "peft"
    hf_config = getattr(gm, "config", None)
    tags = set(card.data.get("tags") or [])
    if hf_config is not None:  # a transformers model: PEFT tags it and names its base model
        name = getattr(hf_config, "_name_or_path", "") or ""
        tags |= {"transformers", f"base_model:adapter:{name}"}
        card.data["base_model"] = name
    if tags:
        card.data["tags"] = sorted(tags)
    if not card.data.get("pipeline_tag") and data.get("task_type") == "CAUSAL_LM":
        card.data["pipeline_tag"] = "text-generation"
    lines = card.text.splitlines()
    version = f"- fx-lntune {_version()} (PEFT's LN-tuning format)"
    if version not in lines:
        heading = "### Framework versions"
        if heading in lines:
            lines.insert(lines.index(heading) + 2, version)
        else:
            lines.append(f"{heading}\n\n{version}")
    card.text = "\n".join(lines)
    return str(card)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fx-lntune")
    except PackageNotFoundError:
        return "unknown"


def _auto_mapping(model_class: str | None) -> dict[str, str] | None:
    """PEFT's ``auto_mapping`` (how ``AutoPeftModel`` finds the model class) when it is a ``transformers`` class."""
    transformers = sys.modules.get("transformers")
    found = getattr(transformers, model_class, None) if transformers is not None and model_class else None
    if not isinstance(found, type):
        return None
    return {"base_model_class": found.__name__, "parent_library": found.__module__}


def _read_config(path: Path) -> LNTuningConfig:
    if not path.is_file():
        raise LNTuneStateError(
            f"{path} is missing: an adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME}, as save_adapter "
            "and PeftModel.save_pretrained write them."
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LNTuneStateError(
            f"{path} is not readable JSON ({exc}); it is corrupt or truncated: save the adapter again."
        ) from exc
    if not isinstance(data, dict) or "peft_type" not in data:
        raise LNTuneStateError(
            f"{path} is not a PEFT adapter config: expected a JSON object with a 'peft_type' key (LN_TUNING)."
        )
    try:
        return LNTuningConfig.from_dict(data)
    except LNTuneConfigError as exc:
        raise LNTuneStateError(f"{path}: {exc}") from exc


def _saved_from(config: LNTuningConfig) -> str:
    """Where an adapter that fits no module here came from, as its config says (PEFT's ``auto_mapping`` and
    ``base_model_name_or_path``), with what to do."""
    mapping = config.auto_mapping if isinstance(config.auto_mapping, Mapping) else {}
    origin = [str(value) for value in (mapping.get("base_model_class"), config.base_model_name_or_path) if value]
    if origin:
        return f"The adapter was saved from {' / '.join(origin)}: load it into a graph of that model."
    return "Was the adapter saved from another architecture? Load it into a graph of the model it was trained on."


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pickle = path.with_name(_PICKLE_NAME)
        hint = (
            f" {pickle.name} is there, but fx-lntune never unpickles (it can run code): save the adapter again with "
            "PeftModel.save_pretrained(..., safe_serialization=True)."
            if pickle.exists()
            else ""
        )
        raise LNTuneStateError(f"{path} is missing.{hint}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except _SAFETENSORS_ERRORS as exc:
        raise LNTuneStateError(
            f"{path} is not a valid safetensors file ({exc}): it is corrupt or truncated, or its header does not "
            "match its data. Save the adapter again."
        ) from exc
    layout = metadata.get("format", "pt")
    if layout != "pt":
        raise LNTuneStateError(
            f"{path} says format {layout!r}: its tensors are laid out for another framework, not PyTorch ('pt'). "
            "Convert it with that framework's PEFT/transformers tools first."
        )
    return tensors


def _expected_tensors(gm: torch.fx.GraphModule, targets: list[str], saved: list[str]) -> dict[str, torch.Tensor]:
    """The file key and a reference tensor (shape, dtype) for each tensor an adapter on these modules holds."""
    expected: dict[str, torch.Tensor] = {}
    for paths, slot in [(targets, f".{_TUNED_SLOT}."), (saved, ".")]:
        for path in paths:
            module = gm.get_submodule(path)
            original = module.original() if isinstance(module, AdapterDispatch) else module
            for key, value in original.state_dict().items():
                expected[f"{_KEY_PREFIX}{path}{slot}{key}"] = value
    return expected


def _check_weights(path: Path, tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise LNTuneStateError(
            f"{path} holds {len(unknown)} tensor(s) this graph has no place for, e.g. {_shown(unknown)}: the "
            f"adapter was saved from another model or architecture, or {CONFIG_NAME} does not match the weights."
        )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise LNTuneStateError(
            f"{path} lacks {len(missing)} tensor(s) that {CONFIG_NAME} targets in this graph, e.g. "
            f"{_shown(missing)}: the file is incomplete or from another model."
        )
    for key, tensor in tensors.items():
        reference = expected[key]
        if tensor.shape != reference.shape:
            raise LNTuneStateError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)} but this graph needs "
                f"{tuple(reference.shape)}: the adapter was saved from a model of other sizes."
            )
        if tensor.dtype != reference.dtype and not (tensor.is_floating_point() and reference.is_floating_point()):
            raise LNTuneStateError(
                f"{path}: tensor {key!r} is {tensor.dtype} but this graph needs {reference.dtype}; only floating-"
                "point tensors are cast to the graph's dtype (as PEFT does). The file is from another model."
            )


def _shown(keys: list[str]) -> str:
    more = f" (and {len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
    return f"{keys[:_SHOWN_KEYS]}{more}"


def _planned_writes(
    gm: torch.fx.GraphModule, model: nn.Module, adapter_name: str
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{id(model tensor): (model tensor, adapter value)}``, every check done before anything is written."""
    writes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    where: dict[int, str] = {}
    for path, _, holder in _adapter_holders(gm, adapter_name):
        try:
            target = model.get_submodule(path)
        except AttributeError:
            raise LNTuneStateError(
                f"{type(model).__name__} has no module {path!r}, which adapter {adapter_name!r} tunes: pass the "
                "model the graph was captured from (or one of the same architecture and sizes)."
            ) from None
        ours, theirs = holder.state_dict(keep_vars=True), target.state_dict(keep_vars=True)
        if ours.keys() != theirs.keys():
            raise LNTuneStateError(
                f"module {path!r} of {type(model).__name__} holds {sorted(theirs)} but the adapter's copy holds "
                f"{sorted(ours)}: the model is of another architecture."
            )
        for key, value in ours.items():
            old = theirs[key]
            name = f"{path}.{key}"
            if old.shape != value.shape:
                raise LNTuneStateError(
                    f"{name} has shape {tuple(old.shape)} in the model but {tuple(value.shape)} in adapter "
                    f"{adapter_name!r}: the model has other sizes than the one the graph was captured from."
                )
            if old.dtype != value.dtype and not (old.is_floating_point() and value.is_floating_point()):
                raise LNTuneStateError(f"{name} is {old.dtype} in the model but {value.dtype} in the adapter.")
            if old.is_meta:
                raise LNTuneStateError(
                    f"{name} is on the meta device (offloaded or not loaded); load the model's weights first."
                )
            if id(old) in writes and not torch.equal(writes[id(old)][1], value.detach()):
                raise LNTuneStateError(
                    f"{name} and {where[id(old)]} are one tied tensor in the model, but adapter {adapter_name!r} "
                    "tuned them to different values; untie them in the model first."
                )
            writes[id(old)] = (old, value.detach())
            where.setdefault(id(old), name)
    return writes


def _tensor_slots(model: nn.Module) -> dict[int, list[tuple[dict, str]]]:
    """``{id(tensor): [(the _parameters or _buffers dict holding it, its name there), ...]}`` over ``model``: a
    tied tensor has several slots."""
    slots: dict[int, list[tuple[dict, str]]] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    slots.setdefault(id(tensor), []).append((table, name))
    return slots
