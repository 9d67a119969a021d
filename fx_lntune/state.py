"""What a tuned graph knows about itself, kept in ``gm.meta["fx_lntune"]`` so that it travels with the graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx

from fx_lntune.config import LNTuningConfig
from fx_lntune.dispatch import AdapterDispatch
from fx_lntune.errors import LNTuneStateError

__all__ = ["META_KEY", "LNTuneState", "dispatch_modules", "get_state"]

META_KEY = "fx_lntune"


@dataclass
class LNTuneState:
    """The graph-level adapter state; per-module state lives in the dispatch modules.

    - ``configs``: each adapter's config, in the order the adapters were added;
    - ``active_adapter``: the adapter forward uses;
    - ``disabled``: inside `disable_adapters`;
    - ``merged_adapter``: the adapter merged into the base weights, if any;
    - ``tracer``: the front-end that captured the graph; ``model_type``, ``base_model_name_or_path`` and
      ``input_names`` describe the model it came from.
    """

    configs: dict[str, LNTuningConfig]
    active_adapter: str
    tracer: str
    input_names: list[str]
    model_type: str | None = None
    base_model_name_or_path: str | None = None
    disabled: bool = False
    merged_adapter: str | None = None
    model_class: str | None = None
    extra: dict = field(default_factory=dict)


def get_state(gm: torch.fx.GraphModule) -> LNTuneState:
    """The state `lntune_transform` attached to ``gm``; a clear error for any other graph."""
    state = getattr(gm, "meta", {}).get(META_KEY) if isinstance(gm, torch.fx.GraphModule) else None
    if not isinstance(state, LNTuneState):
        raise LNTuneStateError(
            f"this {type(gm).__name__} was not produced by lntune_transform (no '{META_KEY}' entry in its "
            "meta); call fx_lntune.lntune_transform(model, config) first."
        )
    return state


def dispatch_modules(gm: torch.nn.Module) -> dict[str, AdapterDispatch]:
    """Every adapter-dispatch module in ``gm`` by qualified path, in module order."""
    return {name: module for name, module in gm.named_modules() if isinstance(module, AdapterDispatch)}
