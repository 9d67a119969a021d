"""Capture-time layer discovery: the model's repeated layers (``model.layers.i``, ``encoder.layer.i``, ``h.i``, ...)
found by structure, and the layer lists a capture can run shortened.

After capture the layers are GraphModules of their own (`passes.split_layers`); the verbs on them are in
`fx_lntune.layer_graphs`.
"""

from __future__ import annotations

import logging

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.compat import is_stateless_function_module
from fx_lntune.passes.repeat_layers import LayerRun

log = logging.getLogger(__name__)

__all__ = ["LAYER_NUMBERS", "find_layers", "layer_runs"]

# Per-layer numbering, the one attribute alike layers differ in; what it decides (the slot in a KV cache) is off
# during capture, and the capture checks that the forward computes nothing from it (`capture.export._shortened`).
LAYER_NUMBERS = frozenset({"layer_idx", "layer_id"})
# Module attributes that are not configuration: state torch keeps and compares separately, or not at all.
_NOT_CONFIG = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"})


def find_layers(model: nn.Module) -> list[str]:
    """The paths of ``model``'s layers: the elements of every ``nn.ModuleList`` whose elements are all of one class
    (``model.layers.0``, ...), in module order. Found by structure, for any architecture; ``model`` is unchanged.

    Which of them become submodules is decided on the graph (`passes.split_layers`): a layer called more than
    once (albert shares one layer across depth) stays in the root graph.
    """
    found = []
    for path, module in _layer_lists(model):
        found.extend(f"{path}.{name}" if path else name for name in module._modules)
    return found


def _layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Every non-empty ``nn.ModuleList`` of ``model`` whose elements are all of one class, with its path."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) and len({type(child) for child in module}) == 1
    ]


def layer_runs(model: nn.Module, opaque: tuple[type[nn.Module], ...] = ()) -> list[LayerRun]:
    """The layer lists of ``model`` that a capture can run shortened (`passes.repeat_layers` adds the rest back).

    A list qualifies from the first layer on which every following layer is alike: the same classes, attributes
    (other than the layer number), hooks, and parameter and buffer names, shapes and dtypes. It is captured with
    three alike layers (two to check the pattern on), so it must have more than that. Lists inside another
    list's layers, or holding such lists, are left whole. A module of an ``opaque`` class (one the capture keeps
    as a call of its own, such as a dispatch module) is compared by its class only. ``model`` is unchanged.
    """
    lists = _layer_lists(model)
    runs = []
    for path, layers in lists:
        nested = any(other.startswith(path + ".") or path.startswith(other + ".") for other, _ in lists)
        if nested or not path:
            continue
        signatures = [_signature(layer, opaque) for layer in layers]
        first = len(signatures) - 1
        while first > 0 and signatures[first - 1] == signatures[-1]:
            first -= 1
        if len(layers) > first + 3:
            runs.append(LayerRun(path, first, first + 3, len(layers)))
        elif len(layers) > 3:  # the fast path is lost: say why, so that a silent fallback is one log line away
            log.info(
                "capturing every layer of %s: layers %d and %d differ in %s",
                path,
                first - 1,
                len(layers) - 1,
                _first_difference(signatures[first - 1], signatures[-1]),
            )
    return runs


def _first_difference(a: list, b: list) -> str:
    """Where two layer signatures first differ, in words: the submodule and the attribute or state."""
    for first, second in zip(a, b, strict=False):
        (name, cls, attributes, state, non_persistent), (name_b, cls_b, attributes_b, state_b, np_b) = first, second
        where = f"submodule {name!r}" if name else "the layer itself"
        if (name, cls) != (name_b, cls_b):
            return f"{where}: {cls.__name__} {name!r} vs {cls_b.__name__} {name_b!r}"
        if attributes != attributes_b:
            keys = [key for key, _ in attributes]
            keys_b = [key for key, _ in attributes_b]
            if keys != keys_b:
                return f"{where}: attributes {sorted(set(keys) ^ set(keys_b))} held by one only"
            key = next(k for (k, value), (_, value_b) in zip(attributes, attributes_b, strict=True) if value != value_b)
            return f"{where}: attribute {key!r}"
        if state != state_b:
            return f"{where}: parameters or buffers (names, shapes, dtypes, devices or requires_grad)"
        if non_persistent != np_b:
            return f"{where}: non-persistent buffers"
    return f"the number of submodules ({len(a)} vs {len(b)})"


def _signature(layer: nn.Module, opaque: tuple[type[nn.Module], ...] = ()) -> list:
    """What decides a layer's graph apart from its layer number: classes, attributes, hooks, state shapes."""
    signature = []
    inside: tuple[str, ...] = ()
    for name, module in layer.named_modules(remove_duplicate=False):
        if inside and name.startswith(inside):
            continue
        if isinstance(module, opaque):
            inside += (f"{name}.",)
            signature.append((name, type(module), [], [], []))
            continue
        attributes = sorted(
            (key, _comparable(value))
            for key, value in vars(module).items()
            if key not in _NOT_CONFIG and key not in LAYER_NUMBERS
        )
        state = [
            (kind, key, tuple(tensor.shape), tensor.dtype, tensor.device.type, tensor.requires_grad)
            for kind, tensors in (("parameter", module._parameters), ("buffer", module._buffers))
            for key, tensor in tensors.items()
            if tensor is not None
        ]
        signature.append((name, type(module), attributes, state, sorted(module._non_persistent_buffers_set)))
    return signature


def _comparable(value: object) -> object:
    """Plain values as themselves, containers element by element, anything else (configs, functions) by
    identity: alike layers share their config object and activation function."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_comparable(item) for item in value))
    if isinstance(value, (set, frozenset)):  # e.g. pruned attention heads
        return (type(value).__name__, frozenset(_comparable(item) for item in value))
    if isinstance(value, dict):  # hook dictionaries are keyed by a global handle id: compare the hooks only
        return (
            "dict",
            tuple((key if isinstance(key, str) else None, _comparable(item)) for key, item in value.items()),
        )
    if is_stateless_function_module(value):  # one per layer, each wrapping the same function
        return ("function module", type(value))
    return ("object", id(value))
