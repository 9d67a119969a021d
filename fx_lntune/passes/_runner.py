"""The one place that keeps a graph valid between passes: lint, recompile, and clean-up for rewrites back."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.passes._graphs import graph_modules

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
    graphs of its layer submodules are checked and recompiled too, where the pass changed them (most passes change
    only the root graph, and a 70B graph has 80 layers to regenerate code for).
    With ``cleanup=True`` dead nodes are removed as well. Submodules no node names are kept on purpose: a tied
    weight is read through one path only, and the module at the other path still holds the model's state-dict
    key (``transformer.wte.weight`` when the graph reads ``lm_head.weight``).
    """
    before = {module: _fingerprint(module) for module in _layer_graphs(gm)}
    result = pass_fn(gm, **options)
    out = result.graph_module
    # The root and each layer's GraphModule inside it (`passes.split_layers`), innermost first.
    graphs = [module for _, module in graph_modules(out)]
    for module in reversed(graphs):
        if cleanup:
            module.graph.eliminate_dead_code(is_impure_node=_is_impure)
        if module is not out and module in before and _same(before[module], _fingerprint(module)):
            continue
        module.graph.lint()
        module.recompile()
    return out


def _layer_graphs(gm: torch.fx.GraphModule) -> list[torch.fx.GraphModule]:
    return [module for path, module in graph_modules(gm) if path]  # not gm itself


def _fingerprint(module: torch.fx.GraphModule) -> tuple:
    """What a graph's generated code depends on, by object: the graph, its code generator, and each node's
    identity, name, op, target, type and argument tuples (torch.fx replaces those tuples on every change)."""
    graph = module.graph
    codegen = graph._codegen
    nodes = tuple((n, n.name, n.op, n.target, n.type, n.args, n.kwargs) for n in graph.nodes)
    return graph, codegen, getattr(codegen, "pytree_info", None), nodes


def _same(a: tuple, b: tuple) -> bool:
    if any(x is not y for x, y in zip(a[:3], b[:3], strict=True)) or len(a[3]) != len(b[3]):
        return False
    for old, new in zip(a[3], b[3], strict=True):
        same_objects = all(x is y for x, y in zip(old[4:], new[4:], strict=True))
        if old[0] is not new[0] or old[1:4] != new[1:4] or not same_objects:
            return False
    return True
