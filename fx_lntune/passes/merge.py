"""Merge an adapter into the base weights, and back: a swap of modules, so it is exact both ways."""

from __future__ import annotations

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult
from tqdm import tqdm

from fx_lntune.state import dispatch_modules

__all__ = ["merge_adapters", "unmerge_adapters"]


def merge_adapters(gm: torch.fx.GraphModule, *, adapter_name: str, progressbar: bool = False) -> PassResult:
    """Swap ``adapter_name``'s copy into the base slot of every dispatch module that has one (in place).

    The graph's nodes do not change; each dispatch module's children do. Before::

        call_module[ln] -> ln.base_layer = base, ln.ln_tuning_layers[a] = tuned

    after::

        call_module[ln] -> ln.base_layer = tuned, ln.ln_tuning_layers[a] = base    (ln.merged_adapter = a)

    Whatever was merged before is unmerged first. `unmerge_adapters` is the inverse, bit for bit.
    """
    modules = dispatch_modules(gm)
    modified = False
    for module in tqdm(modules.values(), desc="merging", disable=not progressbar):
        if module.merged_adapter != adapter_name:
            module.unmerge()
            modified |= module.merge(adapter_name)
    return PassResult(gm, modified)


def unmerge_adapters(gm: torch.fx.GraphModule) -> PassResult:
    """Swap every merged copy back out of the base slot (in place): the inverse of `merge_adapters`."""
    modified = False
    for module in dispatch_modules(gm).values():
        modified |= module.merged_adapter is not None
        module.unmerge()
    return PassResult(gm, modified)
