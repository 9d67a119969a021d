"""Give a graph captured on the ``meta`` device real weights from a checkpoint, without ever building the model.

The path for models too large to instantiate twice: build the model with its parameters on ``meta``, capture
it with `lntune_transform` (no weights are read), then `materialize` the graph from the checkpoint's state
dict. Adapter copies start from the loaded base weights, as they do in a capture of a real model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.errors import LNTuneStateError
from fx_lntune.state import dispatch_modules

__all__ = ["materialize"]


def materialize(
    gm: torch.fx.GraphModule,
    state_dict: Mapping[str, torch.Tensor],
    device: torch.device | str = "cpu",
) -> list[str]:
    """Replace every ``meta`` parameter and buffer of ``gm`` by a tensor on ``device`` holding the value of
    ``state_dict`` (in place); return the keys of ``state_dict`` that were not used.

    ``state_dict`` may use the model's own keys (a Hugging Face checkpoint: ``model.norm.weight``) or the
    graph's (``model.norm.base_layer.weight``, ``model.norm.ln_tuning_layers.<adapter>.weight``). An
    adapter copy that the state dict does not name starts as a copy of its loaded base weights: capturing on
    ``meta`` gave it no values, so it must not keep whatever memory it would get from ``gm.to_empty``.
    Each value is cast to the dtype the graph has; tied weights stay tied; ``requires_grad`` is kept.
    Tensors that were not on ``meta`` (buffers computed at construction, such as rotary ``inv_freq``, when
    the model was built with only its parameters on ``meta``) keep their values and move to ``device``.

    Raises `LNTuneStateError`, leaving ``gm`` unchanged, when a ``meta`` tensor has no value in
    ``state_dict`` or a value of another shape.
    """
    sources = _source_keys(gm)
    slots: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    values: dict[int, torch.Tensor] = {}
    unresolved: dict[int, str] = {}
    mismatched: list[str] = []
    used: set[str] = set()
    for path, module in gm.named_modules(remove_duplicate=False):
        for is_param, tensors in ((True, module._parameters), (False, module._buffers)):
            for name, tensor in tensors.items():
                if tensor is None or not tensor.is_meta:
                    continue
                slots.setdefault(id(tensor), []).append((module, name, is_param))
                key = f"{path}.{name}" if path else name
                found = next((k for k in (key, sources.get(key)) if k is not None and k in state_dict), None)
                if found is None:
                    unresolved.setdefault(id(tensor), key)
                elif tuple(state_dict[found].shape) != tuple(tensor.shape):
                    mismatched.append(f"{found}: {tuple(state_dict[found].shape)} for {tuple(tensor.shape)}")
                else:
                    used.add(found)
                    values.setdefault(id(tensor), state_dict[found])
    # A tensor reachable under several names (tied weights) needs a value under one of them only.
    missing = [key for tensor_id, key in unresolved.items() if tensor_id not in values]
    if missing or mismatched:
        problems = [f"no value for {len(missing)} tensor(s): {missing[:5]}"] if missing else []
        problems += [f"wrong shape for {mismatched[:5]}"] if mismatched else []
        raise LNTuneStateError(
            f"cannot materialize this graph: {'; '.join(problems)}. Pass the model's full state dict (e.g. "
            "safetensors.torch.load_file of its checkpoint); buffers that no checkpoint holds (rotary inv_freq) "
            "must exist at capture: build the model with only its parameters on meta (accelerate's "
            "init_empty_weights()) or add them to the state dict. The graph was not changed."
        )

    for tensor_id, places in slots.items():
        module, name, is_param = places[0]
        meta = (module._parameters if is_param else module._buffers)[name]
        real = torch.empty(meta.shape, dtype=meta.dtype, device=device)
        with torch.no_grad():
            real.copy_(values[tensor_id])
        if is_param:
            real = nn.Parameter(real, requires_grad=meta.requires_grad)
        for owner, slot, param_slot in places:
            (owner._parameters if param_slot else owner._buffers)[slot] = real
    gm.to(device)
    return [key for key in state_dict if key not in used]


def _source_keys(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Graph key -> model key for every tensor inside a dispatch module: the base slot's tensors and each
    adapter copy's (on ``meta`` nothing was trained, so a copy starts from the base) map to the key the model
    had at that path."""
    keys = {}
    for path, module in dispatch_modules(gm).items():
        children = [(module.base_name, module.base)]
        children += [(f"{module.copies_name}.{name}", copy) for name, copy in module.copies.items()]
        for prefix, child in children:
            for name, _ in [*child.named_parameters(), *child.named_buffers()]:
                keys[f"{path}.{prefix}.{name}"] = f"{path}.{name}"
    return keys
