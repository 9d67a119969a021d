"""Adapter-dispatch submodules: the frozen base module, one trainable copy per adapter, and a route between them.

The graph calls a dispatch module where it called the base module. The module does not choose a copy on every
call: `select` points `_route` at the right child once, so a forward costs one extra Python call and
switching adapters costs no re-trace or recompile.
"""

from __future__ import annotations

import copy

import torch.nn as nn

__all__ = ["AdapterDispatch", "LNTuningDispatch", "ModulesToSaveDispatch", "fresh_copy"]


def fresh_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with parameters and buffers of its own (new storage, same device and dtype)."""
    return copy.deepcopy(module)


class AdapterDispatch(nn.Module):
    """Holds a frozen base module and per-adapter copies of it; calls whichever `select` chose.

    Subclasses name the two children (PEFT's state-dict names). State:
    - ``merged_adapter``: the adapter whose copy was swapped into the base slot by `merge`, or ``None``;
    - ``_route``: the child module forward calls (not registered, so it adds no state-dict keys).
    """

    base_name: str
    copies_name: str

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.add_module(self.base_name, base)
        self.add_module(self.copies_name, nn.ModuleDict())
        self.merged_adapter: str | None = None
        self._set_route(base)

    @property
    def base(self) -> nn.Module:
        return self._modules[self.base_name]

    @property
    def copies(self) -> nn.ModuleDict:
        return self._modules[self.copies_name]

    def _set_route(self, module: nn.Module) -> None:
        # object.__setattr__ keeps the alias out of _modules: one child, one set of state-dict keys.
        object.__setattr__(self, "_route", module)

    def forward(self, *args, **kwargs):
        return self._route(*args, **kwargs)

    def add_copy(self, adapter_name: str) -> None:
        """Add a trainable copy of the *base* weights for ``adapter_name`` (in place).

        While another adapter is merged, the base slot holds that adapter's weights; the unmerged base sits in
        its copy slot, and that is what a new adapter starts from.
        """
        source = self.copies[self.merged_adapter] if self.merged_adapter is not None else self.base
        self.copies[adapter_name] = fresh_copy(source)

    def remove_copy(self, adapter_name: str) -> None:
        """Delete ``adapter_name``'s copy (in place); the caller unmerges it first."""
        del self.copies[adapter_name]

    def merge(self, adapter_name: str) -> bool:
        """Swap ``adapter_name``'s copy into the base slot (in place, exact). False if it has no copy here."""
        if adapter_name not in self.copies:
            return False
        self._swap(adapter_name)
        self.merged_adapter = adapter_name
        return True

    def unmerge(self) -> None:
        """Swap the merged copy back, restoring the base module object and its weights bit for bit."""
        if self.merged_adapter is not None:
            self._swap(self.merged_adapter)
            self.merged_adapter = None

    def _swap(self, adapter_name: str) -> None:
        base, adapter = self.base, self.copies[adapter_name]
        self._modules[self.base_name] = adapter
        self.copies[adapter_name] = base

    def original(self) -> nn.Module:
        """The module the model had here, whatever is merged."""
        return self.copies[self.merged_adapter] if self.merged_adapter is not None else self.base

    def get_base_layer(self) -> nn.Module:
        """PEFT's name for `original`: the module the model had here (with its base weights, also while merged)."""
        return self.original()

    def select(self, adapter_name: str | None, *, disabled: bool = False) -> None:
        """Point forward at the right child: the merged base when merged, the original when disabled, the
        active adapter's copy when this module has one, else the base (an adapter need not target every
        dispatch module)."""
        if disabled:
            route = self.original()
        elif self.merged_adapter is not None or adapter_name not in self.copies:
            route = self.base
        else:
            route = self.copies[adapter_name]
        self._set_route(route)

    def set_trainable(self, adapter_name: str | None, trainable: bool) -> None:
        """Only ``adapter_name``'s copy requires grad, and only when ``trainable``; the base never does, nor the
        copy slot of a merged adapter (it holds the original base module then)."""
        for name, module in self.copies.items():
            module.requires_grad_(trainable and name == adapter_name and name != self.merged_adapter)
        self.base.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"merged_adapter={self.merged_adapter!r}"


class LNTuningDispatch(AdapterDispatch):
    """A targeted (normalization) module: ``base_layer`` and ``ln_tuning_layers[adapter]``, as in PEFT."""

    base_name = "base_layer"
    copies_name = "ln_tuning_layers"

    @property
    def in_features(self) -> int | None:
        """As on PEFT's ``LNTuningLayer``: the base module's input size where PEFT reads one (a ``Linear``'s
        ``in_features``, a convolution's ``in_channels``, an ``Embedding``'s ``num_embeddings``), else ``None``
        (every normalization module)."""
        return _in_out_features(self.original())[0]

    @property
    def out_features(self) -> int | None:
        """As on PEFT's ``LNTuningLayer``: the base module's output size, or ``None`` (see `in_features`)."""
        return _in_out_features(self.original())[1]


def _in_out_features(module: nn.Module) -> tuple[int | None, int | None]:
    """The sizes PEFT's ``LNTuningLayer`` records for a base module (PEFT's ``_get_in_out_features`` rules for the
    module kinds LN tuning meets; ``None`` for the others, norms included)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:  # transformers' GPT-2 Conv1D
        rows, columns = module.weight.shape
        return rows, columns
    return None, None


class ModulesToSaveDispatch(AdapterDispatch):
    """A ``modules_to_save`` module: ``original_module`` and ``modules_to_save[adapter]``, as in PEFT."""

    base_name = "original_module"
    copies_name = "modules_to_save"
