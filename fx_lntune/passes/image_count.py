"""Let a captured llava-style graph take any number of images, not only the capture's.

A llava model merges its image features into the token embeddings with ``list(image_features)`` (one tensor
per image), ``torch.cat`` and a check that the image tokens and features agree. ``torch.export`` unrolls the
``list`` into a fixed number of ``unbind`` items and bakes the feature count into the check, so the graph ran at
the capture's image count only. This pass gives the merge back its dynamic count.
"""

from __future__ import annotations

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.graph_inputs import image_list, scatter_image_features

__all__ = ["free_image_count"]

_aten = torch.ops.aten
_CONVERSIONS = {_aten.to.dtype, _aten.to.device, _aten.to.dtype_layout, _aten._to_copy.default}
_CHECKS = {_aten._assert_scalar.default}


def free_image_count(gm: torch.fx.GraphModule) -> PassResult:
    """Rewrite each image-feature merge of ``gm``'s root graph to work for any image count (in place)::

        parts = unbind(features, 0); cat([parts[0], ..., parts[n - 1]], 0)  # n: the capture's image count
        assert (image_mask.sum() * hidden == <capture's feature count>)       # torch_compilable_check
        masked_scatter(embeds, image_mask, merged)

    becomes::

        merged = flatten(features, 0, 1)                                     # the same rows, any count
        scatter_image_features(embeds, image_mask, merged)                  # checks the count at run time

    and the per-image list the model also returns (``image_outputs.pooler_output``) is ``image_list(features)``.

    A graph without such a merge is left as it is. Run with ``cleanup=True`` to drop the dead check nodes.
    """
    graph = gm.graph
    modified = False
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _aten.masked_scatter.default:
            continue
        embeds, mask, source = node.args
        cat = source
        while cat.op == "call_function" and cat.target in _CONVERSIONS:
            cat = cat.args[0]
        features = _unrolled_features(cat)
        if features is None:
            continue
        parts = list(cat.args[0])
        if not _listed_whole(parts, cat):
            continue
        with graph.inserting_before(cat):
            merged = graph.call_function(_aten.flatten.using_ints, (features, 0, 1))
        merged.meta = {key: value for key, value in cat.meta.items() if key != "val"}
        cat.replace_all_uses_with(merged)
        graph.erase_node(cat)
        _list_images(graph, parts)
        with graph.inserting_before(node):
            scatter = graph.call_function(scatter_image_features, (embeds, mask, source))
        scatter.meta = {key: value for key, value in node.meta.items() if key != "val"}
        node.replace_all_uses_with(scatter)
        graph.erase_node(node)
        _drop_count_checks(graph)
        modified = True
    return PassResult(gm, modified)


def _unrolled_features(cat: torch.fx.Node) -> torch.fx.Node | None:
    """The tensor ``x`` when ``cat`` is ``cat([unbind(x, 0)[0], ..., unbind(x, 0)[n - 1]], 0)``, else None."""
    if cat.op != "call_function" or cat.target is not _aten.cat.default:
        return None
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim != 0 or not parts:
        return None
    unbind = parts[0].args[0] if parts[0].op == "call_function" and parts[0].args else None
    if unbind is None or unbind.op != "call_function" or unbind.target is not _aten.unbind.int:
        return None
    if (unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0)) != 0:
        return None
    expected = [(unbind, index) for index in range(len(parts))]
    if [tuple(part.args) for part in parts] != expected or len(unbind.users) != len(parts):
        return None
    return unbind.args[0]


def _listed_whole(parts: list[torch.fx.Node], cat: torch.fx.Node) -> bool:
    """Whether every use of the unrolled images besides ``cat`` is a list of all of them, in order (which
    `_list_images` can replace); an item used alone would keep the capture's count."""

    def whole(value) -> bool:
        if isinstance(value, (list, tuple)):
            return list(value) == parts or all(whole(item) for item in value)
        if isinstance(value, dict):
            return all(whole(item) for item in value.values())
        return value not in parts

    users = {user for part in parts for user in part.users} - {cat}
    return all(whole(user.args) and whole(user.kwargs) for user in users)


def _list_images(graph: torch.fx.Graph, parts: list[torch.fx.Node]) -> None:
    """Replace every list of exactly ``parts`` (the unrolled images, as in an output's ``pooler_output``) by one
    node that lists the images at run time, then erase the unrolled items."""
    unbind = parts[0].args[0]
    with graph.inserting_after(unbind):
        images = graph.call_function(image_list, (unbind.args[0],))

    def substitute(value):
        if isinstance(value, (list, tuple)) and list(value) == parts:
            return images
        if isinstance(value, (list, tuple)):
            return type(value)(substitute(item) for item in value)
        if isinstance(value, dict):
            return {key: substitute(item) for key, item in value.items()}
        return value

    for user in {user for part in parts for user in part.users}:
        user.args, user.kwargs = substitute(user.args), substitute(user.kwargs)
    for part in reversed(parts):
        if not part.users:
            graph.erase_node(part)
    if not images.users:
        graph.erase_node(images)
    if not unbind.users:
        graph.erase_node(unbind)


def _drop_count_checks(graph: torch.fx.Graph) -> None:
    """Erase the runtime asserts that came from the model's token/feature count check (a
    ``torch_compilable_check``: ``_is_all_true`` -> ``item`` -> asserts), which pinned the capture's count."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _CHECKS and _from_all_true(node):
            graph.erase_node(node)


def _from_all_true(node: torch.fx.Node) -> bool:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "call_function" and current.target is _aten._is_all_true.default:
            return True
        stack.extend(current.all_input_nodes)
    return False
