"""What a tuned graph knows about itself, kept in ``gm.meta["fx_lntune"]`` so that it travels with the graph."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.fx

from fx_lntune.config import LNTuningConfig
from fx_lntune.dispatch import AdapterDispatch
from fx_lntune.errors import LNTuneStateError

__all__ = ["META_KEY", "LNTuneState", "attach_state", "detach_state", "dispatch_modules", "get_state"]

META_KEY = "fx_lntune"
# Unpickling a GraphModule gives it a new, empty ``meta`` (torch.fx re-traces its code); the same state object,
# also held as this attribute, is restored by torch.fx with the module's other attributes. `get_state` puts it back.
_STATE_ATTRIBUTE = "_fx_lntune_state"
# torch.fx's own list of attributes that ``copy.deepcopy`` of a GraphModule keeps.
_PRESERVED = "_user_preserved_attributes"


@dataclass
class LNTuneState:
    """The graph-level adapter state; per-module state lives in the dispatch modules.

    - ``configs``: each adapter's config, in the order the adapters were added;
    - ``active_adapter``: the adapter forward uses (``None`` once the last adapter is deleted: the base model);
    - ``inference_mode``: ``set_adapter``'s ``inference_mode`` for the active adapter, or ``None`` while its
      config's ``inference_mode`` decides whether it trains;
    - ``disabled``: inside `disable_adapters`;
    - ``merged_adapter``: the adapter merged into the base weights, if any;
    - ``tracer``: the front-end that captured the graph; ``model_type``, ``base_model_name_or_path`` and
      ``input_names`` describe the model it came from.
    """

    configs: dict[str, LNTuningConfig]
    active_adapter: str | None
    tracer: str
    input_names: list[str]
    model_type: str | None = None
    base_model_name_or_path: str | None = None
    disabled: bool = False
    merged_adapter: str | None = None
    model_class: str | None = None
    extra: dict = field(default_factory=dict)
    inference_mode: bool | None = None


# The graph's class with PeftModel's methods comes from the package's top floor (`fx_lntune.methods`), which
# registers how to give it and take it back: state, on the lowest floor, imports nothing above it.
_CLASS_HOOKS: dict[str, Callable[[torch.fx.GraphModule], None]] = {}


def register_class_hooks(
    attach: Callable[[torch.fx.GraphModule], None], detach: Callable[[torch.fx.GraphModule], None]
) -> None:
    """Called once by `fx_lntune.methods`: ``attach`` runs when a graph gets its state, ``detach`` when it loses it."""
    _CLASS_HOOKS.update(attach=attach, detach=detach)


def attach_state(gm: torch.fx.GraphModule, state: LNTuneState) -> None:
    """Make ``state`` the graph's state (in place), kept through ``copy.deepcopy`` and pickling of ``gm``."""
    gm.meta[META_KEY] = state
    setattr(gm, _STATE_ATTRIBUTE, state)
    gm.meta.setdefault(_PRESERVED, {})[_STATE_ATTRIBUTE] = state
    if "attach" in _CLASS_HOOKS:
        _CLASS_HOOKS["attach"](gm)


def detach_state(gm: torch.fx.GraphModule) -> None:
    """Remove the graph's state (in place): ``gm`` is then a plain GraphModule again."""
    del gm.meta[META_KEY]
    gm.__dict__.pop(_STATE_ATTRIBUTE, None)
    preserved = gm.meta.get(_PRESERVED, {})
    preserved.pop(_STATE_ATTRIBUTE, None)
    if not preserved:
        gm.meta.pop(_PRESERVED, None)
    if "detach" in _CLASS_HOOKS:
        _CLASS_HOOKS["detach"](gm)


def get_state(gm: torch.fx.GraphModule) -> LNTuneState:
    """The state `lntune_transform` attached to ``gm``; a clear error for any other graph."""
    state = getattr(gm, "meta", {}).get(META_KEY) if isinstance(gm, torch.fx.GraphModule) else None
    if state is None and isinstance(gm, torch.fx.GraphModule):
        state = gm.__dict__.get(_STATE_ATTRIBUTE)
        if isinstance(state, LNTuneState):  # an unpickled graph: its meta came back empty
            _restore_after_unpickling(gm, state)
    if not isinstance(state, LNTuneState):
        raise LNTuneStateError(
            f"this {type(gm).__name__} was not produced by lntune_transform (no '{META_KEY}' entry in its "
            "meta); call fx_lntune.lntune_transform(model, config) first."
        )
    return state


def dispatch_modules(gm: torch.nn.Module) -> dict[str, AdapterDispatch]:
    """Every adapter-dispatch module in ``gm`` by qualified path, in module order."""
    return {name: module for name, module in gm.named_modules() if isinstance(module, AdapterDispatch)}


def _restore_after_unpickling(gm: torch.fx.GraphModule, state: LNTuneState) -> None:
    attach_state(gm, state)
    if "config" in gm.__dict__:  # the Hugging Face config lntune_transform put there, for the next deepcopy
        gm.meta[_PRESERVED]["config"] = gm.__dict__["config"]
