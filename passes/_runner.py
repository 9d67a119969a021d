"""The one place that keeps a graph valid between passes: lint, recompile, and clean-up for rewrites back."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

__all__ = ["run_pass"]

# torch.export records vmap (used by transformers 4.x's mask code) as nesting calls whose results nobody reads;
# they are state changes all the same, and dropping them breaks the graph at run time.
_STATEFUL_MODULES = frozenset({"torch._functorch.predispatch"})


def _is_impure(node: torch.fx.Node) -> bool:
    return node.is_impure() or getattr(node.target, "__module__", None) in _STATEFUL_MODULES


def run_pass(
    pass_fn: Callable[..., PassResult],
    gm: torch.fx.GraphModule,
    *,
    cleanup: bool = False,
    **options,
) -> torch.fx.GraphModule:
    """Run one graph pass over ``gm`` and leave the result linted and recompiled.

    Works in place when the pass does (every pass in this package does) and returns the pass's graph module; the
    graphs of its layer submodules are checked and recompiled too.
    With ``cleanup=True`` dead nodes are removed as well. Submodules no node names are kept on purpose: a tied
    weight is read through one path only, and the module at the other path still holds the model's state-dict
    key (``transformer.wte.weight`` when the graph reads ``lm_head.weight``).
    """
    result = pass_fn(gm, **options)
    out = result.graph_module
    # The root and each layer's GraphModule inside it (`passes.split_layers`), innermost first.
    graphs = [module for module in out.modules() if isinstance(module, torch.fx.GraphModule)]
    for module in reversed(graphs):
        if cleanup:
            module.graph.eliminate_dead_code(is_impure_node=_is_impure)
        module.graph.lint()
        module.recompile()
    return out
