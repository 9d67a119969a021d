"""The methods of a PEFT model on the tuned graph: each delegates to the `fx_lntune` function of the same job.

`lntune_transform` gives its graph the class `TunedGraphModule` (a ``torch.fx.GraphModule`` subclass, one
class per graph as torch.fx makes them); `fx_lntune.merge_and_unload` / ``unload`` give a plain
``torch.fx.GraphModule`` back. The free functions stay the core: these are thin, PEFT-named wrappers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.fx

from fx_lntune import adapters, api, generation, layer_graphs, persistence
from fx_lntune.errors import LNTuneAdapterError, LNTuneConfigError, LNTuneError
from fx_lntune.state import get_state, register_class_hooks
from fx_lntune.trainer import install_trainer_hooks

__all__ = ["TunedGraphModule", "with_methods", "without_methods"]


class TunedGraphModule(torch.fx.GraphModule):
    """A ``torch.fx.GraphModule`` made by `fx_lntune.lntune_transform`, answering PeftModel's methods."""

    def __reduce__(self) -> tuple[Any, ...]:
        # torch.fx rebuilds a plain GraphModule from code; the state (kept in __dict__) brings the methods back.
        return (_rebuild_tuned, (super().__reduce__(),))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            state = self.__dict__.get("_fx_lntune_state")
            model = getattr(state, "model_class", None) or "a model"
            raise AttributeError(
                f"'{name}' is not an attribute of this tuned torch.fx.GraphModule (the LN-tuned graph of {model}, "
                "made by fx_lntune.lntune_transform). It has PeftModel's methods (generate, save_pretrained, "
                "merge_and_unload, ...) and the model's config; everything else is a function of fx_lntune "
                "(fl.generate(gm, ...), fl.save_adapter(gm, ...), ...): see dir(fx_lntune)."
            ) from None

    # --- what PEFT's LNTuningModel / PeftModel answer -----------------------------------------------------
    @property
    def peft_config(self) -> dict[str, Any]:
        return adapters.peft_config(self)

    @property
    def active_adapter(self) -> str | None:
        return api.active_adapter(self)

    @property
    def active_adapters(self) -> list[str]:
        return api.active_adapters(self)

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        floats = [p.dtype for p in self.parameters() if p.is_floating_point()]
        return floats[0] if floats else torch.get_default_dtype()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(get_state(self).extra.get(layer_graphs._CHECKPOINTING, False))

    def can_generate(self) -> bool:
        try:
            generation._check_can_generate(self, get_state(self))
        except LNTuneError:
            return False
        return True

    def generate(self, *args: Any, **kwargs: Any) -> torch.LongTensor:
        return generation.generate(self, *args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return api.get_nb_trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        api.print_trainable_parameters(self)

    def add_adapter(self, adapter_name: str, peft_config: Any = None, low_cpu_mem_usage: bool = False) -> None:
        adapters.add_adapter(self, adapter_name, peft_config, low_cpu_mem_usage=low_cpu_mem_usage)

    def set_adapter(self, adapter_name: str, inference_mode: bool | None = None) -> None:
        adapters.set_adapter(self, adapter_name, inference_mode=inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        adapters.delete_adapter(self, adapter_name)

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        with adapters.disable_adapters(self):
            yield

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> torch.fx.GraphModule:
        return adapters.merge_and_unload(self, *args, **kwargs)

    def unload(self, *args: Any, **kwargs: Any) -> torch.fx.GraphModule:
        return adapters.unload(self, *args, **kwargs)

    def gradient_checkpointing_enable(
        self,
        gradient_checkpointing_kwargs: Mapping[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """As the Hugging Face model's: every layer call recomputes in backward (non-reentrant checkpointing)."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        kwargs.pop("use_reentrant", None) if kwargs.get("use_reentrant") is False else None
        if kwargs or every_n_layers != 1 or offload:
            raise LNTuneConfigError(
                f"the tuned graph checkpoints every layer with use_reentrant=False only; got kwargs {kwargs}, "
                f"every_n_layers={every_n_layers}, offload={offload}: leave them out."
            )
        layer_graphs.gradient_checkpointing(self, True)

    def activation_checkpointing_enable(
        self,
        activation_checkpointing_kwargs: Mapping[str, Any] | None = None,
        every_n_layers: int = 1,
        offload: bool = False,
    ) -> None:
        """transformers 5's name of `gradient_checkpointing_enable` (the stock Trainer calls it)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def activation_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_disable()

    def gradient_checkpointing_disable(self) -> None:
        layer_graphs.gradient_checkpointing(self, False)

    def enable_input_require_grads(self) -> None:
        """Nothing to do: non-reentrant checkpointing needs no input that requires grad (kept for Trainer/PEFT)."""

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        **kwargs: Any,
    ) -> None:
        """As ``PeftModel.save_pretrained``: each selected adapter (default: all) as PEFT writes it, the adapter
        ``default`` in ``save_directory`` and any other in ``save_directory/<name>``."""
        if not safe_serialization:
            raise LNTuneAdapterError(
                "save_pretrained writes safetensors only (safe_serialization=True); leave the argument out."
            )
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown:
            raise LNTuneAdapterError(
                f"selected_adapters {unknown} are not adapters of this graph; it has {list(self.peft_config)}."
            )
        if not is_main_process:
            return
        for name in names:
            directory = save_directory if name == "default" else os.path.join(save_directory, name)
            # PEFT writes its model card once, in save_directory.
            persistence.save_adapter(self, directory, name, model_card=name == "default")


def _rebuild_tuned(reduced: tuple[Any, ...]) -> torch.fx.GraphModule:
    function, args = reduced
    gm = function(*args)
    get_state(gm)  # puts the state back into meta and the class back to TunedGraphModule
    return gm


def _per_instance(base: type, name: str) -> type:
    # As torch.fx names its per-instance classes, so that its deepcopy makes its own class over `base`.
    cls = type(name, (base,), {"__module__": torch.fx.GraphModule.__module__})
    cls.__qualname__ = "GraphModuleImpl"
    return cls


def with_methods(gm: torch.fx.GraphModule) -> None:
    """Give ``gm`` the class `TunedGraphModule` (in place; its name, code and state unchanged), and the stock
    ``Trainer`` its checkpoints of adapters (`fx_lntune.trainer.install_trainer_hooks`)."""
    install_trainer_hooks()
    if not isinstance(gm, TunedGraphModule):
        gm.__class__ = _per_instance(TunedGraphModule, type(gm).__name__)
        gm.recompile()


def without_methods(gm: torch.fx.GraphModule) -> None:
    """Make ``gm`` a plain ``torch.fx.GraphModule`` again (in place)."""
    if isinstance(gm, TunedGraphModule):
        gm.__class__ = _per_instance(torch.fx.GraphModule, type(gm).__name__)
        gm.recompile()


register_class_hooks(with_methods, without_methods)
