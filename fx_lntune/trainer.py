"""Hugging Face ``Trainer`` checkpoints of a tuned graph in PEFT's adapter files, and their loading back.

The stock ``Trainer`` saves a model's adapter alone only for an ``isinstance`` of ``PreTrainedModel`` or
``peft.PeftModel`` (its ``_save``, ``_load_from_checkpoint`` and ``_load_best_model``); any other module gets its
whole state dict written. `install_trainer_hooks` (run when a tuned graph is made) gives the stock ``Trainer`` class
PEFT's behaviour for a tuned graph, and Trainer's own for any other model; `adapter_checkpoints` does the same for
one instance (a Trainer subclass that overrides these methods).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fx_lntune.errors import LNTuneStateError
from fx_lntune.persistence import CONFIG_NAME, WEIGHTS_NAME, load_adapter_weights, save_adapter
from fx_lntune.state import get_state

__all__ = ["adapter_checkpoints", "install_trainer_hooks"]

_logger = logging.getLogger(__name__)
# What Trainer's own _save writes for a module it cannot save_pretrained: here an empty placeholder, removed.
_FULL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_HOOKED = "_fx_lntune_adapter_checkpoints"
_TRAINER_METHODS = ("_save", "_load_from_checkpoint", "_load_best_model")
_CLASS_HOOKED = "_fx_lntune_trainer_hooks"


def install_trainer_hooks() -> None:
    """Make the stock ``transformers.Trainer`` checkpoint a tuned graph as `adapter_checkpoints` describes, with no
    line of the user's: its ``_save``, ``_load_from_checkpoint`` and ``_load_best_model`` are wrapped once per
    process, and each wrapper runs Trainer's own code for any model that is not a tuned graph.

    Why on the class: Trainer decides by ``isinstance(model, (PreTrainedModel, PeftModel))`` alone (transformers
    4.57 and 5.x) and asks the model nothing a tuned graph could answer, so without this every checkpoint holds the
    whole state dict. Called when a tuned graph is made (`fx_lntune.methods.with_methods`); idempotent.
    """
    try:
        from transformers import Trainer  # already imported with transformers' models; accelerate comes with it
    except ImportError:  # Trainer's own dependencies missing: nothing to hook
        return
    if Trainer.__dict__.get(_CLASS_HOOKED):
        return
    wrappers = {"_save": _saving, "_load_from_checkpoint": _loading_checkpoint, "_load_best_model": _loading_best}
    for name, wrap in wrappers.items():
        setattr(Trainer, name, _class_hook(getattr(Trainer, name), wrap))
    setattr(Trainer, _CLASS_HOOKED, True)


def _class_hook(original: Callable[..., Any], wrap: Callable[..., Callable[..., Any]]) -> Callable[..., Any]:
    @functools.wraps(original)
    def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get(_HOOKED):  # adapter_checkpoints' instance wrappers call back here for Trainer's own code
            return original(self, *args, **kwargs)
        return wrap(self, functools.partial(original, self))(*args, **kwargs)

    return hooked


def adapter_checkpoints(trainer: Any) -> None:
    """Make ``trainer`` checkpoint its tuned graph's adapters in PEFT's files instead of the whole state dict.

    In place, on this ``transformers.Trainer`` instance only; calling it again changes nothing. The stock Trainer
    does this by itself once a tuned graph exists (`install_trainer_hooks`); call it for a Trainer subclass that
    overrides ``_save``, ``_load_from_checkpoint`` or ``_load_best_model``. Afterwards, while ``trainer.model`` is a
    graph made by `fx_lntune.lntune_transform`:

    - every checkpoint and ``trainer.save_model()`` hold what ``PeftModel.save_pretrained`` writes
      (``adapter_config.json``, ``adapter_model.safetensors`` and ``README.md``; the adapter ``default`` in the
      directory, any other in a subdirectory named after it) beside Trainer's own files (optimizer, scheduler, RNG
      and trainer state, training arguments, the tokenizer); no base weights;
    - ``trainer.train(resume_from_checkpoint=...)`` and ``load_best_model_at_end=True`` copy the saved weights into
      the graph's adapters in place, so the optimizer's parameters stay the graph's. A checkpoint of the whole
      state dict (written without this call) still loads as before.

    Any other model (``model_init`` may give one) is saved and loaded by Trainer's own code. For one process or
    DDP; DeepSpeed and FSDP keep their own checkpoint formats.

    Raises:
        LNTuneStateError: ``trainer`` has no tuned graph as its model, or is not a ``transformers.Trainer`` (it lacks
            the methods this replaces: ``_save``, ``_load_from_checkpoint``, ``_load_best_model``).
    """
    missing = [name for name in _TRAINER_METHODS if not callable(getattr(trainer, name, None))]
    if missing:
        raise LNTuneStateError(
            f"adapter_checkpoints takes a transformers.Trainer; {type(trainer).__name__} has no {missing}. Pass the "
            "Trainer built with model=gm."
        )
    model = getattr(trainer, "model", None)
    if not _is_tuned(model):
        raise LNTuneStateError(
            f"adapter_checkpoints needs a Trainer whose model is a graph made by fx_lntune.lntune_transform; its model "
            f"is {type(model).__name__}. Build the Trainer with model=gm first."
        )
    if trainer.__dict__.get(_HOOKED):
        return
    save, load_checkpoint, load_best = (getattr(trainer, name) for name in _TRAINER_METHODS)
    trainer._save = _saving(trainer, save)
    trainer._load_from_checkpoint = _loading_checkpoint(trainer, load_checkpoint)
    trainer._load_best_model = _loading_best(trainer, load_best)
    trainer.__dict__[_HOOKED] = True


def _checkpoint_adapters(directory: str | os.PathLike) -> dict[str, Path]:
    """``{adapter name: its directory}`` for the adapters a checkpoint in ``directory`` holds, as
    ``PeftModel.save_pretrained`` lays them out: ``default`` in ``directory`` itself, any other in a subdirectory."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    found = {entry.name: entry for entry in sorted(directory.iterdir()) if _holds_adapter(entry)}
    if _holds_adapter(directory):
        found["default"] = directory
    return found


def _is_tuned(model: Any) -> bool:
    try:
        get_state(model)
    except LNTuneStateError:
        return False
    return True


def _holds_adapter(directory: Path) -> bool:
    return (directory / WEIGHTS_NAME).is_file() and (directory / CONFIG_NAME).is_file()


def _tuned_model(trainer: Any, model: torch.nn.Module | None = None) -> torch.nn.Module | None:
    """The tuned graph Trainer is about to save or load (unwrapped from DDP), or ``None`` for another model."""
    model = trainer.model if model is None else model
    model = trainer.accelerator.unwrap_model(model)
    return model if _is_tuned(model) else None


def _saving(trainer: Any, save: Callable[..., None]) -> Callable[..., None]:
    def _save(output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        model = _tuned_model(trainer)
        if model is None:
            save(output_dir, state_dict=state_dict)
            return
        output_dir = trainer.args.output_dir if output_dir is None else output_dir
        # Trainer's own _save writes the tokenizer and the training arguments; given an empty state dict, its
        # weights file is an empty placeholder, replaced by the adapter files.
        save(output_dir, state_dict={})
        if not trainer.args.should_save:
            return
        for name in _FULL_WEIGHTS:
            Path(output_dir, name).unlink(missing_ok=True)
        for name in get_state(model).configs:
            directory = output_dir if name == "default" else os.path.join(output_dir, name)
            save_adapter(model, directory, name, model_card=name == "default")

    return _save


def _loading_checkpoint(trainer: Any, load: Callable[..., None]) -> Callable[..., None]:
    def _load_from_checkpoint(resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        tuned = _tuned_model(trainer, model)
        saved = _checkpoint_adapters(resume_from_checkpoint)
        if tuned is None or not saved:
            load(resume_from_checkpoint, model)
            return
        _logger.info("Loading the adapters %s from %s.", sorted(saved), resume_from_checkpoint)
        _load_adapters(tuned, saved)

    return _load_from_checkpoint


def _loading_best(trainer: Any, load: Callable[[], None]) -> Callable[[], None]:
    def _load_best_model() -> None:
        tuned = _tuned_model(trainer)
        saved = _checkpoint_adapters(trainer.state.best_model_checkpoint)
        if tuned is None or not saved:
            load()
            return
        _logger.info(
            "Loading the best adapters from %s (score: %s).",
            trainer.state.best_model_checkpoint,
            trainer.state.best_metric,
        )
        _load_adapters(tuned, saved)

    return _load_best_model


def _load_adapters(gm: torch.nn.Module, saved: dict[str, Path]) -> None:
    """Copy each saved adapter into the graph's adapter of that name (in place)."""
    adapters = get_state(gm).configs
    unknown = sorted(set(saved) - set(adapters))
    if unknown:
        raise LNTuneStateError(
            f"the checkpoint holds adapters {unknown} that this graph lacks (it has {sorted(adapters)}): resume with "
            "the graph the checkpoint was trained with, or add those adapters first (fx_lntune.add_adapter)."
        )
    for name, directory in saved.items():
        load_adapter_weights(gm, directory, name)
