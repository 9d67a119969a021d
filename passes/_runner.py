"""The one place that keeps a graph valid between passes: lint, recompile, and clean-up for rewrites back."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["run_pass"]


def run_pass(
    pass_fn: Callable[..., PassResult],
    gm: torch.fx.GraphModule,
    *,
    cleanup: bool = False,
    **options,
) -> torch.fx.GraphModule:
    """Run one graph pass over ``gm`` and leave the result linted and recompiled.

    Works in place when the pass does (every pass in this package does) and returns the pass's graph module.
    With ``cleanup=True`` dead nodes and submodules no node calls any more are removed as well, which the
    passes that rewrite a graph back to the captured one need.
    """
    result = pass_fn(gm, **options)
    out = result.graph_module
    if cleanup:
        out.graph.eliminate_dead_code()
        out.delete_all_unused_submodules()
    out.graph.lint()
    out.recompile()
    return out
