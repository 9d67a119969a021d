"""Unload adapters: put back a plain module wherever a dispatch module stands, leaving a plain GraphModule."""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult
from tqdm import tqdm

from fx_lntune.modules import set_submodule
from fx_lntune.passes._graphs import graph_modules
from fx_lntune.passes.checkpoint_layers import checkpoint_layers
from fx_lntune.passes.inject import NODE_MARK
from fx_lntune.state import detach_state, dispatch_modules, get_state

__all__ = ["unload_adapters"]


def unload_adapters(gm: torch.fx.GraphModule, *, progressbar: bool = False) -> PassResult:
    """Replace every dispatch module by the module in its base slot and drop fx-lntune's state (in place).

    The inverse of `inject_adapters`: the graph keeps its nodes and targets, and each path holds a plain module
    again; layers are called as captured (activation checkpointing is turned off). The base slot holds the merged
    adapter's weights when one is merged (run `merge_adapters` first for ``merge_and_unload``), the model's own
    otherwise. Before::

        call_module[ln] -> ln = LNTuningDispatch(base_layer=LayerNorm, ln_tuning_layers={...})

    after::

        call_module[ln] -> ln = LayerNorm
    """
    get_state(gm)
    checkpoint_layers(gm, enabled=False)  # a plain graph calls its layers as captured
    modules = dispatch_modules(gm)
    for path, module in tqdm(modules.items(), desc="unloading", disable=not progressbar):
        set_submodule(gm, path, module.base.requires_grad_(False))
    for _, module in graph_modules(gm):
        for node in module.graph.nodes:
            node.meta.pop(NODE_MARK, None)
    detach_state(gm)
    return PassResult(gm, True)
