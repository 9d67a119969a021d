"""Make a captured graph follow its inputs' device instead of the device it was captured on."""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.passes._graphs import graph_modules

__all__ = ["follow_input_device"]


def follow_input_device(gm: torch.fx.GraphModule) -> PassResult:
    """Replace every constant ``torch.device`` argument by the device of the graph's first tensor input (in
    place, also inside the graph's subgraph modules).

    `torch.export` writes the capture's device into factory and copy calls; the graph would then build masks
    on the CPU while the model runs on a GPU. Before::

        arange(n, device=device(type='cpu'))

    after::

        device = getattr(input_ids, 'device');  arange(n, device=device)
    """
    modified = False
    for _, module in graph_modules(gm):
        changed = _rewrite(module.graph)
        if changed and module is not gm:
            module.recompile()
        modified |= changed
    return PassResult(gm, modified)


def _rewrite(graph: torch.fx.Graph) -> bool:
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    source = next((node for node in placeholders if isinstance(node.meta.get("val"), torch.Tensor)), None)
    if source is None:
        return False
    device_node = None
    changed = False
    for node in list(graph.nodes):
        if node.op == "placeholder" or not _has_device(node):
            continue
        if device_node is None:
            with graph.inserting_after(placeholders[-1]):
                device_node = graph.call_function(getattr, (source, "device"))
        node.args = _swap(node.args, device_node)
        node.kwargs = _swap(node.kwargs, device_node)
        changed = True
    return changed


def _has_device(node: torch.fx.Node) -> bool:
    found = []
    torch.fx.node.map_aggregate(
        (node.args, node.kwargs), lambda a: found.append(a) if isinstance(a, torch.device) else a
    )
    return bool(found)


def _swap(value, device_node: torch.fx.Node):
    return torch.fx.node.map_aggregate(value, lambda a: device_node if isinstance(a, torch.device) else a)
