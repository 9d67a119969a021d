"""Look at a tuned graph: a networkx view of a GraphModule (with a diff, a filter, a module-level collapse and one box
per layer, the default for a large graph) and the files a person reads: DOT, an SVG or PNG picture (Graphviz ``dot``,
or a built-in layered SVG without it), and a table of the adapted modules with their parameter counts.

Every function here reads the GraphModule and never changes it (shape propagation restores what it touched).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape, quoteattr

import networkx as nx
import pydot
import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from fx_lntune.api import print_trainable_parameters
from fx_lntune.dispatch import AdapterDispatch, LNTuningDispatch
from fx_lntune.errors import LNTuneConfigError, LNTuneExportError, LNTuneTraceError
from fx_lntune.files import file_in_the_way, write_atomic
from fx_lntune.passes.split_layers import inline_layers, layer_calls
from fx_lntune.state import META_KEY, dispatch_modules, get_state

__all__ = [
    "PICTURE_FORMATS",
    "DOT_FORMATS",
    "VisualizeResult",
    "graph_to_networkx",
    "diff_graphs",
    "filter_graph",
    "find_module_paths",
    "collapse_graph",
    "collapse_layers",
    "LAYER_VIEW_NODES",
    "DOT_SIZE_LIMIT",
    "to_pydot",
    "write_dot",
    "write_picture",
    "layered_svg",
    "adapter_summary",
    "summary_table",
    "visualize_graph",
]

PICTURE_FORMATS = ("svg", "png")
DOT_FORMATS = ("dot", "gv")

# Fill colours by node kind; the same in the Graphviz and the built-in picture.
_OP_STYLE = {
    "placeholder": ("ellipse", "#d3f9d8"),
    "output": ("ellipse", "#d3f9d8"),
    "get_attr": ("note", "#f1f3f5"),
    "call_function": ("box", "#ffffff"),
    "call_method": ("box", "#ffffff"),
    "call_module": ("box", "#dbe4ff"),
    "module": ("box3d", "#e9ecef"),
}
_DISPATCH_FILL = "#ffd8a8"
_CHANGED_FILL, _CHANGED_PEN = "#ff8787", "#c92a2a"
_ADDED_FILL = "#b2f2bb"
_LARGE_GRAPH = 150
# Above this many nodes `visualize_graph` draws one box per layer unless told otherwise (nobody reads more).
LAYER_VIEW_NODES = 250
# Graphviz's layout time grows fast with size: a flat SmolLM2 (1,738 nodes, 2,714 edges) ran for minutes, 288 nodes
# with 444 edges took seconds. Above this many nodes plus edges dot is not started (see `write_picture`).
DOT_SIZE_LIMIT = 2000
# A dot that runs longer than this is stopped (a safety net under DOT_SIZE_LIMIT's estimate).
_DOT_TIMEOUT_S = 120
_ADAPTED_SHOWN = 3
_NO_LAYERS = (
    "this graph has no layer submodules to draw one box per layer; collapse it with depth=K (--depth K) instead, "
    "e.g. depth=3."
)
_INSTALL_GRAPHVIZ = "install Graphviz (apt-get install graphviz, brew install graphviz or conda install graphviz)"
# Node data that is networkx-only (not written to DOT).
_INTERNAL_KEYS = ("stack",)


@dataclass
class VisualizeResult:
    """What `visualize_graph` drew: the (filtered, collapsed) graph, the files written, how the picture was drawn
    (``"dot"``, ``"builtin"`` or ``None`` when only DOT was asked for), the summary table and notes for the user."""

    graph: nx.DiGraph
    files: list[Path]
    renderer: str | None
    summary: str
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- the graph


def graph_to_networkx(gm: torch.fx.GraphModule, example_inputs: Mapping[str, torch.Tensor] | None = None) -> nx.DiGraph:
    """The graph of ``gm`` as a ``networkx.DiGraph``: one node per fx node (keyed by its name), an edge from each
    input to its user. ``gm`` is not changed.

    Node data: ``op``, ``target`` (readable: ``aten.linear.default``, ``model.norm``), ``module_path`` (the
    call_module target, the module owning a get_attr's tensor, or the innermost module of
    ``node.meta["nn_module_stack"]``; ``""`` for none), ``module_type`` (its class name), ``adapter_dispatch``
    (the node calls an adapter-dispatch module), ``base_type`` (the class such a module wraps), ``tensor_shape``
    and ``dtype`` where known (from ``meta["val"]`` / ``meta["tensor_meta"]`` as torch.export leaves them, else
    from `torch.fx.passes.shape_prop.ShapeProp` run on ``example_inputs`` when given; ``""`` when unknown), and
    ``stack``: the enclosing ``(module path, class name)`` pairs, outermost first.

    A graph whose layers are submodules of their own (`passes.split_layers`) is drawn flat, each layer's nodes
    where the root calls it: ``module_path`` then groups them by layer, and `collapse_graph` folds a layer into
    one box at the layer's depth.
    """
    view = _flat(gm)
    nodes = list(view.graph.nodes)
    propagated: dict[str, Any] = {}
    if example_inputs is not None and any(_value_of(node) is None for node in nodes if node.op not in ("output",)):
        propagated = _propagate_shapes(view, example_inputs)
    graph = nx.DiGraph(name=type(gm).__name__)
    for node in nodes:
        graph.add_node(node.name, **_node_data(view, node, propagated.get(node.name)))
    for node in nodes:
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    graph.graph["layers"] = _layer_paths(gm)
    state = gm.meta.get(META_KEY) if isinstance(getattr(gm, "meta", None), dict) else None
    if state is not None:
        graph.graph["adapters"] = list(state.configs)
        graph.graph["active_adapter"] = state.active_adapter
    return graph


def diff_graphs(
    before: torch.fx.GraphModule,
    after: torch.fx.GraphModule,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
) -> nx.DiGraph:
    """`graph_to_networkx` of ``after`` with a ``diff`` mark on every node, against ``before`` (e.g.
    ``fx_lntune.unload(gm)`` or a separate capture of the model). Neither graph is changed.

    Nodes are matched by name. ``"changed"``: a call_module node whose module became an adapter-dispatch module
    (for LN tuning, exactly the adapted modules' nodes), or whose op or target differs; ``"added"``: no node of
    that name in ``before``; ``"same"`` otherwise. Names only in ``before`` are listed in ``graph["removed"]``.
    """
    for name, gm in (("before", before), ("after", after)):
        if not isinstance(gm, torch.fx.GraphModule):
            raise LNTuneConfigError(f"diff_graphs needs torch.fx.GraphModule graphs; '{name}' is {type(gm).__name__}.")
    graph = graph_to_networkx(after, example_inputs)
    before, after = _flat(before), _flat(after)
    previous = {node.name: node for node in before.graph.nodes}
    for node in after.graph.nodes:
        old = previous.get(node.name)
        if old is None:
            status = "added"
        elif (old.op, old.target) != (node.op, node.target):
            status = "changed"
        elif node.op == "call_module" and _calls_dispatch(after, node) and not _calls_dispatch(before, old):
            status = "changed"
        else:
            status = "same"
        graph.nodes[node.name]["diff"] = status
    graph.graph["removed"] = [name for name in previous if name not in graph]
    return graph


def filter_graph(graph: nx.DiGraph, pattern: str, hops: int = 1) -> nx.DiGraph:
    """The subgraph around the nodes whose ``module_path`` the regex ``pattern`` is found in (``re.search``):
    those nodes plus every node at most ``hops`` edges away from one (in either direction). A new graph.

    ``r"layers\\.0\\b"`` keeps decoder layer 0 (and its neighbours), ``"input_layernorm"`` every such norm.
    """
    if isinstance(hops, bool) or not isinstance(hops, int) or hops < 0:
        raise LNTuneConfigError(f"hops must be an integer >= 0, got {hops!r}.")
    found = set(find_module_paths(pattern, [data["module_path"] for _, data in graph.nodes(data=True)]))
    seeds = [name for name, data in graph.nodes(data=True) if data["module_path"] in found]
    reach = nx.multi_source_dijkstra_path_length(graph.to_undirected(as_view=True), seeds, cutoff=hops)
    return graph.subgraph(reach).copy()


def find_module_paths(pattern: str, paths: Iterable[str]) -> list[str]:
    """The non-empty ``paths`` the regex ``pattern`` is found in (``re.search``), in order, without repeats: the
    rule `filter_graph` uses. None found (or an invalid regex): `LNTuneConfigError` naming close paths."""
    regex = _compile(pattern, "filter")
    paths = list(dict.fromkeys(path for path in paths if path))
    found = [path for path in paths if regex.search(path)]
    if not found:
        close = difflib.get_close_matches(pattern, paths, n=5, cutoff=0.3) or paths[:5]
        raise LNTuneConfigError(
            f"filter {pattern!r} is found in no module path ({len(paths)} paths, e.g. {', '.join(close) or 'none'}); "
            r"the regex is searched in each module path, e.g. 'layers\.0\b' or 'input_layernorm'."
        )
    return found


def collapse_graph(graph: nx.DiGraph, depth: int) -> nx.DiGraph:
    """The graph at module level: every node with a module path joins the group named by the first ``depth``
    components of that path (``model.layers.0`` for ``depth=3``); nodes without one (inputs, output, ops of the
    model's own forward) stay as they are. A group is one node (``op="module"``, ``nodes``: how many it holds,
    ``adapter_dispatch`` and ``diff`` summarised over its members, ``adapted``: the adapted modules inside it,
    relative to it); an edge joins two groups when an edge joins members of both. A new graph.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise LNTuneConfigError(f"depth must be an integer >= 1 (module path components), got {depth!r}.")
    return _collapse(graph, lambda path: ".".join(path.split(".")[:depth]))


def collapse_layers(graph: nx.DiGraph, layer_paths: Iterable[str] | None = None) -> nx.DiGraph:
    """One box per layer: `collapse_graph` where every node inside a layer (its module path is the layer's path or
    below it) joins that layer's group, and every other node with a module path joins the group of as many path
    components as the shortest layer path has (``model.embed_tokens``, ``model.norm``, ``lm_head`` beside the
    ``model.layers.i`` boxes). ``layer_paths`` default to the layers `graph_to_networkx` recorded
    (``graph.graph["layers"]``: the layer submodules of the graph). An edge from a node that more than two layers
    read (the attention mask, rotary angles, sizes) is marked ``shared`` and not drawn (it would pull the layers
    apart); the node says ``read by N layers`` instead (``shared_readers``). A new graph.
    """
    layers = list(graph.graph.get("layers", ()) if layer_paths is None else layer_paths)
    if not layers:
        raise LNTuneConfigError(_NO_LAYERS)
    inside = re.compile("|".join(rf"{re.escape(path)}(?=\.|$)" for path in sorted(layers, key=len, reverse=True)))
    depth = min(len(path.split(".")) for path in layers)

    def group_of(path: str) -> str:
        found = inside.match(path)
        return found.group(0) if found else ".".join(path.split(".")[:depth])

    collapsed = _collapse(graph, group_of)
    boxes = set(layers)
    for name in collapsed:
        readers = [user for user in collapsed.successors(name) if user in boxes]
        if len(readers) > 2 and name not in boxes:  # read by many layers, not passed from one to the next
            for user in readers:
                collapsed.edges[name, user]["shared"] = True
            collapsed.nodes[name]["shared_readers"] = len(readers)
    return collapsed


# ------------------------------------------------------------------------------------------------------ output


def to_pydot(graph: nx.DiGraph) -> pydot.Dot:
    """A ``pydot.Dot`` of ``graph`` (from any function above) through ``networkx.nx_pydot.to_pydot``, with labels
    and colours: adapter-dispatch nodes orange, nodes a diff marks ``changed`` red, groups as 3-D boxes. Each
    node keeps its data (``op``, ``target``, ``module_path``, ...) as DOT attributes."""
    display = nx.DiGraph(name="fx-lntune graph")  # the SVG's title
    display.graph["graph"] = {"rankdir": "TB", "fontname": "Helvetica", "nodesep": "0.25", "ranksep": "0.35"}
    display.graph["node"] = {"fontname": "Helvetica", "fontsize": "10", "style": "filled", "margin": "0.15,0.05"}
    display.graph["edge"] = {"color": "#868e96", "arrowsize": "0.6"}
    if graph.number_of_nodes() > _LARGE_GRAPH:
        # dot's network-simplex passes dominate on big graphs (40 s for 300 nodes); bounded, it takes seconds.
        display.graph["graph"].update(nslimit="2", nslimit1="2")
    for name, data in graph.nodes(data=True):
        attributes = {key: value for key, value in data.items() if key not in _INTERNAL_KEYS and value != ""}
        attributes.update(_appearance(name, data))
        display.add_node(name, **{key: _quoted(value) for key, value in attributes.items()})
    display.add_edges_from(_drawn_edges(graph))
    return nx.nx_pydot.to_pydot(display)


def write_dot(graph: nx.DiGraph, path: str | os.PathLike) -> Path:
    """Write ``graph`` as a DOT file (`to_pydot`); the file is replaced only once it is complete."""
    path = Path(path)
    write_atomic(path, to_pydot(graph).to_string().encode())
    return path


def write_picture(graph: nx.DiGraph, path: str | os.PathLike, max_dot_size: int | None = DOT_SIZE_LIMIT) -> str:
    """Draw ``graph`` into ``path`` (``.svg`` or ``.png``); returns how: ``"dot"`` or ``"builtin"``.

    With Graphviz's ``dot`` on ``PATH`` it lays the picture out, if the graph is small enough for that to take
    seconds: at most ``max_dot_size`` nodes plus edges (``None``: no limit). Otherwise an SVG is drawn by
    `layered_svg` (a plainer layered layout, fast at any size) and a PNG is refused with `LNTuneConfigError` saying
    why and what to do. A dot that still runs after two minutes is stopped (`LNTuneExportError`). The file is
    replaced only once the picture is complete.
    """
    path = Path(path)
    kind = path.suffix.lower().lstrip(".")
    if kind not in PICTURE_FORMATS:
        raise LNTuneConfigError(f"a picture is .svg or .png, got {path.name!r}.")
    dot = shutil.which("dot")
    size = graph.number_of_nodes() + graph.number_of_edges()
    too_big = max_dot_size is not None and size > max_dot_size
    if dot is None or too_big:
        if kind == "png":
            why = (
                f"Graphviz would take minutes to lay out {graph.number_of_nodes():,} nodes and "
                f"{graph.number_of_edges():,} edges (more than {max_dot_size:,} in all): draw fewer (one box per "
                "layer, or filter / depth), or write an .svg, which is then drawn by the built-in layout"
                if too_big
                else f"drawing {path.name} needs Graphviz's 'dot', which is not on PATH: {_INSTALL_GRAPHVIZ}, or "
                "write an .svg, which is drawn without it"
            )
            raise LNTuneConfigError(f"{why}.")
        write_atomic(path, layered_svg(graph).encode())
        return "builtin"
    source = to_pydot(graph).to_string().encode()
    try:
        run = subprocess.run([dot, f"-T{kind}"], input=source, capture_output=True, timeout=_DOT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise LNTuneExportError(
            f"Graphviz dot ran for {_DOT_TIMEOUT_S} s on {graph.number_of_nodes():,} nodes and was stopped; draw "
            "fewer nodes (one box per layer, or filter / depth), or write an .svg with max_dot_size=0 (the "
            "built-in layout)."
        ) from None
    if run.returncode != 0:
        message = " ".join(run.stderr.decode(errors="replace").split())[:400]
        raise LNTuneExportError(
            f"Graphviz dot failed on {path.name} ({message}); write a .dot file and inspect it, or use "
            "filter/depth for a smaller graph."
        )
    write_atomic(path, run.stdout)
    return "dot"


def layered_svg(graph: nx.DiGraph) -> str:
    """An SVG of ``graph`` drawn without Graphviz: longest-path layers from the inputs down (cycles of a collapsed
    graph share a layer), each layer ordered by its predecessors' positions, straight edges."""
    whole = graph
    graph = nx.subgraph_view(whole, filter_edge=lambda u, v: not whole.edges[u, v].get("shared"))
    condensed = nx.condensation(graph)
    layer_of = {}
    for index, generation in enumerate(nx.topological_generations(condensed)):
        for component in generation:
            for name in condensed.nodes[component]["members"]:
                layer_of[name] = index
    for name in graph:  # a weight or an input sits just above its first reader, not at the top
        readers = [layer_of[user] for user in graph.successors(name)]
        if graph.in_degree(name) == 0 and readers:
            layer_of[name] = max(0, min(readers) - 1)
    layers: list[list[str]] = [[] for _ in range(max(layer_of.values(), default=-1) + 1)]
    for name in graph:  # graph order: inputs and parameters first, as the code reads
        layers[layer_of[name]].append(name)
    rank: dict[str, float] = {}
    for layer in layers:
        layer.sort(key=lambda name: _mean([rank[p] for p in graph.predecessors(name) if p in rank], 1.0))
        rank.update((name, (i + 0.5) / len(layer)) for i, name in enumerate(layer))

    char_w, line_h, pad, gap_x, gap_y = 6.6, 13.0, 8.0, 14.0, 34.0
    boxes: dict[str, tuple[float, float, float, float]] = {}
    appearance = {name: _appearance(name, data) for name, data in graph.nodes(data=True)}
    sizes = {}
    for name, look in appearance.items():
        lines = look["label"].split("\n")
        sizes[name] = (max(len(line) for line in lines) * char_w + 2 * pad, len(lines) * line_h + pad)
    widths = [sum(sizes[n][0] for n in layer) + gap_x * (len(layer) - 1) for layer in layers]
    total_w = max(widths, default=0.0) + 2 * gap_x
    y = gap_x
    for layer, width in zip(layers, widths, strict=True):
        x = (total_w - width) / 2
        height = max(sizes[n][1] for n in layer)
        for name in layer:
            w, h = sizes[name]
            boxes[name] = (x, y + (height - h) / 2, w, h)
            x += w + gap_x
        y += height + gap_y
    total_h = y - gap_y + gap_x

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w:.0f}" height="{total_h:.0f}" '
        f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" font-family="monospace" font-size="11">',
        "<title>fx-lntune graph (built-in layout; install Graphviz for a better one)</title>",
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" markerHeight="6" '
        'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#868e96"/></marker></defs>',
        f'<rect width="{total_w:.0f}" height="{total_h:.0f}" fill="white"/>',
    ]
    for source, target in _drawn_edges(graph):
        sx, sy, sw, sh = boxes[source]
        tx, ty, tw, _ = boxes[target]
        x1, y1, x2, y2 = sx + sw / 2, sy + sh, tx + tw / 2, ty
        if layer_of[source] >= layer_of[target]:  # inside a cycle: bend around the right side
            x1, y1, x2, y2 = sx + sw, sy + sh / 2, tx + tw, ty + 4
            bend = max(x1, x2) + 30
            out.append(
                f'<path d="M{x1:.1f},{y1:.1f} C{bend:.1f},{y1:.1f} {bend:.1f},{y2:.1f} {x2:.1f},{y2:.1f}" '
                'fill="none" stroke="#868e96" marker-end="url(#arrow)"/>'
            )
        else:
            out.append(
                f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#868e96" '
                'marker-end="url(#arrow)"/>'
            )
    for name, (x, y, w, h) in boxes.items():
        look = appearance[name]
        radius = h / 2 if look["shape"] == "ellipse" else 3
        out.append(f'<g class="node" id={quoteattr(name)}><title>{escape(name)}</title>')  # as Graphviz titles
        out.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="{radius:.1f}" '
            f'fill="{look["fillcolor"]}" stroke="{look.get("color", "#495057")}" '
            f'stroke-width="{look.get("penwidth", "1")}"/>'
        )
        for index, line in enumerate(look["label"].split("\n")):
            out.append(
                f'<text x="{x + w / 2:.1f}" y="{y + pad / 2 + line_h * (index + 0.8):.1f}" '
                f'text-anchor="middle">{escape(line)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def adapter_summary(gm: torch.fx.GraphModule) -> list[dict[str, Any]]:
    """One row per adapted module of a tuned graph: ``module`` (path), ``kind`` (``"target"`` or
    ``"modules_to_save"``), ``type`` (the wrapped class), ``base`` (its parameter count) and, for every adapter,
    the parameter count of that adapter's copy (0 where the adapter does not adapt the module)."""
    state = get_state(gm)
    rows = []
    for path, module in dispatch_modules(gm).items():
        original = module.original()
        row: dict[str, Any] = {
            "module": path,
            "kind": "target" if isinstance(module, LNTuningDispatch) else "modules_to_save",
            "type": type(original).__name__,
            "base": _count(original),
        }
        for adapter in state.configs:
            # While merged, the adapter's slot holds the original module: same shapes, same count.
            row[adapter] = _count(module.copies[adapter]) if adapter in module.copies else 0
        rows.append(row)
    return rows


def summary_table(gm: torch.fx.GraphModule) -> str:
    """A text table of `adapter_summary` with a total row, followed by PEFT's trainable-parameter line and the
    active adapter (marked ``*`` in the header)."""
    state = get_state(gm)
    rows = adapter_summary(gm)
    adapters = list(state.configs)
    header = ["module", "type", "kind", "base", *[a + ("*" if a == state.active_adapter else "") for a in adapters]]
    body = [[row["module"], row["type"], row["kind"], *(f"{row[k]:,d}" for k in ["base", *adapters])] for row in rows]
    totals = [sum(row[key] for row in rows) for key in ["base", *adapters]]
    body.append([f"total ({len(rows)} modules)", "", "", *(f"{n:,d}" for n in totals)])
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        cells = [
            cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "-" * len(fmt(header))
    peft_line = io.StringIO()
    with contextlib.redirect_stdout(peft_line):
        print_trainable_parameters(gm)
    notes = [f"active adapter: {state.active_adapter}"]
    if state.merged_adapter is not None:
        notes.append(f"merged: {state.merged_adapter}")
    if state.disabled:
        notes.append("adapters disabled")
    lines = [fmt(header), rule, *(fmt(line) for line in body[:-1]), rule, fmt(body[-1])]
    return "\n".join([*lines, peft_line.getvalue().rstrip("\n") + f" ({'; '.join(notes)})"])


def visualize_graph(
    gm: torch.fx.GraphModule,
    output: str | os.PathLike,
    *,
    before: torch.fx.GraphModule | None = None,
    filter_regex: str | None = None,
    hops: int = 1,
    depth: int | None = None,
    example_inputs: Mapping[str, torch.Tensor] | None = None,
    by_layer: bool | None = None,
    max_dot_size: int | None = DOT_SIZE_LIMIT,
) -> VisualizeResult:
    """Draw ``gm`` into ``output`` and return what was drawn; ``gm`` is not changed.

    ``output`` ending in ``.svg`` or ``.png`` gets the picture (`write_picture`) and a DOT file beside it (same
    name, ``.dot``); ``.dot`` or ``.gv`` gets the DOT file only. ``before`` (e.g. ``fx_lntune.unload(gm)``) marks
    the changed nodes (`diff_graphs`); ``filter_regex`` keeps the nodes of matching modules and ``hops``
    neighbours (`filter_graph`); ``depth`` then collapses nodes to module groups (`collapse_graph`).
    ``by_layer`` draws one box per layer of the model (`collapse_layers`, each box naming the adapted modules in
    it); by default (``None``) that is done for a graph of more than `LAYER_VIEW_NODES` nodes when neither
    ``filter_regex`` nor ``depth`` is given, and a note says how to zoom in. ``max_dot_size``: see `write_picture`
    (a larger picture is drawn by the built-in layout, with a note). ``example_inputs`` give shapes where the
    capture recorded none. Every check runs before any file is written.
    """
    output = Path(output)
    kind = output.suffix.lower().lstrip(".")
    if kind not in PICTURE_FORMATS + DOT_FORMATS:
        raise LNTuneConfigError(
            f"output {output.name!r} has no known extension; use .svg or .png (a picture and a .dot beside it) or "
            ".dot / .gv (DOT only)."
        )
    if not output.parent.is_dir():
        blocking = file_in_the_way(output)
        where = f"is under {str(blocking)!r}, which is a file" if blocking else "is in a folder that does not exist"
        raise LNTuneConfigError(f"output {str(output)!r} {where}; choose a path in an existing folder.")
    if not isinstance(gm, torch.fx.GraphModule):
        raise LNTuneConfigError(f"visualize_graph needs a torch.fx.GraphModule, got {type(gm).__name__}.")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise LNTuneConfigError(f"depth must be an integer >= 1 (module path components), got {depth!r}.")
    if by_layer is not None and not isinstance(by_layer, bool):
        raise LNTuneConfigError(f"by_layer must be True, False or None (automatic), got {by_layer!r}.")
    if by_layer and depth is not None:
        raise LNTuneConfigError("by_layer=True and depth both collapse the graph; pass one of them.")
    if max_dot_size is not None and (isinstance(max_dot_size, bool) or not isinstance(max_dot_size, int)):
        raise LNTuneConfigError(f"max_dot_size must be an integer or None, got {max_dot_size!r}.")
    if filter_regex is not None:
        _compile(filter_regex, "filter")
    layers = _layer_paths(gm)
    if by_layer and not layers:
        raise LNTuneConfigError(_NO_LAYERS)
    size = len(_flat(gm).graph.nodes)
    automatic = by_layer is None and filter_regex is None and depth is None and bool(layers) and size > LAYER_VIEW_NODES
    by_layer = bool(by_layer) or automatic
    # One box per layer shows no tensor shapes: the run that finds them is not needed.
    shapes = None if by_layer else example_inputs
    graph = diff_graphs(before, gm, shapes) if before is not None else graph_to_networkx(gm, shapes)
    if filter_regex is not None:
        graph = filter_graph(graph, filter_regex, hops)
    if depth is not None:
        graph = collapse_graph(graph, depth)
    elif by_layer:
        graph = collapse_layers(graph, layers)
    summary = summary_table(gm) if META_KEY in getattr(gm, "meta", {}) else ""

    notes = []
    if automatic:
        example, zoom = rf"{re.escape(layers[0])}\b", len(layers[0].split(".")) + 2
        notes.append(
            f"the graph has {size:,} nodes, too many to read: drawn one box per layer ({len(layers)} layers; boxes "
            f"holding adapted modules are orange and name them). Zoom in with --filter '{example}' --depth {zoom} "
            f"(filter_regex=..., depth=... in Python); every node: --no-by-layer (by_layer=False)."
        )
    files, renderer = [], None
    if kind in PICTURE_FORMATS:
        renderer = write_picture(graph, output, max_dot_size)
        files.append(output)
        if renderer == "builtin" and shutil.which("dot") is None:
            notes.append(
                f"Graphviz 'dot' is not on PATH: {output.name} was drawn with the built-in layered layout; for a "
                f"clearer one, {_INSTALL_GRAPHVIZ}."
            )
        elif renderer == "builtin":
            notes.append(
                f"{graph.number_of_nodes():,} nodes and {graph.number_of_edges():,} edges are more than Graphviz lays "
                f"out in seconds (max_dot_size={max_dot_size:,}): {output.name} was drawn with the built-in layered "
                "layout. For a Graphviz picture draw fewer nodes (--filter / --depth, or one box per layer), or "
                "raise --max-dot-size."
            )
        output = output.with_suffix(".dot")
    files.append(write_dot(graph, output))
    if before is not None:
        changed = sum(data.get("diff") == "changed" for _, data in graph.nodes(data=True))
        notes.append(f"diff: {changed} of the drawn nodes changed (drawn red)")
    return VisualizeResult(graph=graph, files=files, renderer=renderer, summary=summary, notes=notes)


# --------------------------------------------------------------------------------------------------- internals


def _compile(pattern: Any, what: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise LNTuneConfigError(f"{what} must be a non-empty regex string, got {pattern!r}.")
    try:
        return re.compile(pattern)
    except re.error as error:
        raise LNTuneConfigError(
            f"{what} {pattern!r} is not a valid regex ({error}); escape '.', '(' and '['."
        ) from None


def _layer_paths(gm: torch.fx.GraphModule) -> list[str]:
    """The paths of ``gm``'s layer submodules in call order, each once."""
    return list(dict.fromkeys(path for _, path in layer_calls(gm)))


def _flat(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` itself, or a flat view of it when its layers are graphs of their own (the same modules, not copied)."""
    return inline_layers(gm) if layer_calls(gm) else gm


def _value_of(node: torch.fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("tensor_meta"))


def _propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Each node's ``tensor_meta`` from one run of ShapeProp on ``example_inputs``; ``gm`` is left as it was (node
    meta, training flags, random state: the run is in eval mode, without grad, on a forked RNG)."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    args = []
    for node in placeholders:
        if node.target in example_inputs:
            args.append(example_inputs[node.target])
        elif node.args:
            args.append(node.args[0])  # the input's default
        else:
            raise LNTuneConfigError(
                f"example_inputs has no '{node.target}'; the graph's inputs are "
                f"{', '.join(str(p.target) for p in placeholders)}."
            )
    saved = {node: dict(node.meta) for node in gm.graph.nodes}  # ShapeProp writes "tensor_meta" and "type"
    modes = {module: module.training for module in gm.modules()}
    try:
        gm.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=_cuda_devices(gm, args)):
            ShapeProp(gm).propagate(*args)
        return {node.name: node.meta.get("tensor_meta") for node in gm.graph.nodes}
    except Exception as error:  # the model's own code: any exception
        raise LNTuneTraceError(
            f"running the graph on example_inputs to find tensor shapes failed ({type(error).__name__}: {error}); "
            "pass inputs the model accepts, or none (shapes are then shown only where the capture recorded them)."
        ) from error
    finally:
        for node, meta in saved.items():
            node.meta.clear()
            node.meta.update(meta)
        for module, training in modes.items():
            module.training = training


def _cuda_devices(gm: torch.nn.Module, args: list[Any]) -> list[int]:
    tensors = [*gm.parameters(), *gm.buffers(), *(arg for arg in args if isinstance(arg, torch.Tensor))]
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _node_data(gm: torch.fx.GraphModule, node: torch.fx.Node, propagated: Any) -> dict[str, Any]:
    stack = _module_stack(node)
    module = None
    if node.op == "call_module":
        path = str(node.target)
        module = gm.get_submodule(path)
        if stack and stack[-1][0] == path:  # fx tracers record the leaf itself, with the class it had then
            stack.pop()
        stack.append((path, type(module).__name__))
    elif node.op == "get_attr":
        path = str(node.target).rpartition(".")[0]
        if not stack and path:
            owner = _submodule_or_none(gm, path)
            # A capture's plain containers (torch.nn.Module itself) say nothing about the model's class.
            known = type(owner).__name__ if owner is not None and type(owner) is not torch.nn.Module else ""
            stack = [(path, known)]
    else:
        path = stack[-1][0] if stack else ""
    value = _value_of(node)
    shape, dtype = _shape_and_dtype(value if value is not None else propagated)
    return {
        "op": node.op,
        "target": _target_name(node.target),
        "module_path": path,
        "module_type": stack[-1][1] if stack and path else "",
        "adapter_dispatch": isinstance(module, AdapterDispatch),
        "base_type": type(module.original()).__name__ if isinstance(module, AdapterDispatch) else "",
        "tensor_shape": shape,
        "dtype": dtype,
        "stack": tuple(stack),
    }


def _module_stack(node: torch.fx.Node) -> list[tuple[str, str]]:
    stack = []
    for path, kind in (node.meta.get("nn_module_stack") or {}).values():
        name = kind if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        # Skip the root ("") and torch.export's placeholder entry for nodes without a stack (path == type).
        if path and path != name:
            stack.append((str(path), name.rpartition(".")[2]))
    return stack


def _submodule_or_none(gm: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return gm.get_submodule(path)
    except AttributeError:
        return None


def _calls_dispatch(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    return isinstance(_submodule_or_none(gm, str(node.target)), AdapterDispatch)


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    text = str(target)  # aten.linear.default for operator overloads
    if not text.startswith("<"):
        return text
    module = getattr(target, "__module__", None)
    name = getattr(target, "__name__", None) or text
    if not isinstance(module, str) or module in ("builtins", "_operator", "operator"):
        return name
    return f"{module}.{name}"  # torch.matmul, not torch._VariableFunctionsClass.matmul


def _shape_and_dtype(value: Any) -> tuple[str, str]:
    """``("[s0, 8, 32]", "float32")`` for a tensor or its metadata; tuples of them joined; ``("", "")`` else."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return "[" + ", ".join(str(size) for size in value.shape) + "]", str(value.dtype).removeprefix("torch.")
    if isinstance(value, (tuple, list)) and value:
        parts = [_shape_and_dtype(item) for item in value]
        if any(shape for shape, _ in parts):
            shapes = ", ".join(shape or "-" for shape, _ in parts)
            dtypes = sorted({dtype for _, dtype in parts if dtype})
            return f"({shapes})", ", ".join(dtypes)
    return "", ""


def _collapse(graph: nx.DiGraph, group_of: Callable[[str], str]) -> nx.DiGraph:
    """`collapse_graph` with the group of each module path given by ``group_of``."""
    keep = {name for name, data in graph.nodes(data=True) if not data["module_path"]}
    group_path = {name: group_of(data["module_path"]) for name, data in graph.nodes(data=True) if name not in keep}
    members: dict[str, list[str]] = {}
    for name, path in group_path.items():
        members.setdefault(path, []).append(name)
    home = {name: name for name in keep}
    for path, names in members.items():
        home.update(dict.fromkeys(names, path if path not in keep else f"{path} (module)"))

    collapsed = nx.DiGraph(**graph.graph)
    for name, data in graph.nodes(data=True):
        if name in keep:
            collapsed.add_node(name, **data)
        elif home[name] not in collapsed:
            collapsed.add_node(home[name], **_group_data(graph, group_path[name], members[group_path[name]]))
    collapsed.add_edges_from((home[u], home[v]) for u, v in graph.edges if home[u] != home[v])
    return collapsed


def _group_data(graph: nx.DiGraph, path: str, names: list[str]) -> dict[str, Any]:
    datas = [graph.nodes[name] for name in names]
    types = [kind for data in datas for entry_path, kind in data["stack"] if entry_path == path and kind]
    marks = [data["diff"] for data in datas if "diff" in data]
    group: dict[str, Any] = {
        "op": "module",
        "target": path,
        "module_path": path,
        "module_type": types[0] if types else "",
        "adapter_dispatch": any(data["adapter_dispatch"] for data in datas),
        "dispatch_nodes": sum(data["adapter_dispatch"] for data in datas),
        # The adapted modules inside, relative to the group ("input_layernorm" in "model.layers.0").
        "adapted": ", ".join(
            dict.fromkeys(_relative(data["module_path"], path) for data in datas if data["adapter_dispatch"])
        ),
        "base_type": next((data["base_type"] for data in datas if data["base_type"]), ""),
        "tensor_shape": "",
        "dtype": "",
        "nodes": len(names),
        "stack": tuple(entry for entry in datas[0]["stack"] if len(entry[0]) <= len(path)),
    }
    if marks:
        group["diff"] = "changed" if "changed" in marks else "added" if all(m == "added" for m in marks) else "same"
    return group


def _drawn_edges(graph: nx.DiGraph) -> list[tuple[str, str]]:
    """The edges a picture draws: all but the ``shared`` ones (`collapse_layers`), which would pull the layers
    apart; their source says "read by N layers" instead (``shared_readers``)."""
    return [(source, target) for source, target, data in graph.edges(data=True) if not data.get("shared")]


def _relative(module_path: str, group: str) -> str:
    """``module_path`` inside ``group`` ("input_layernorm" for "model.layers.0.input_layernorm" in "model.layers.0")."""
    return module_path[len(group) + 1 :] if module_path.startswith(group + ".") else module_path


def _appearance(name: str, data: Mapping[str, Any]) -> dict[str, str]:
    """Label, shape, colours and tooltip of one node, shared by the Graphviz and the built-in picture."""
    op = data["op"]
    shape, fill = _OP_STYLE.get(op, ("box", "#ffffff"))
    module_type = data["module_type"]
    if data["adapter_dispatch"] and data["base_type"] and op != "module":
        module_type = f"{module_type}({data['base_type']})"
    if op == "call_module":
        lines = [data["target"], module_type]
    elif op == "module":
        if data["adapter_dispatch"] and data["nodes"] == data["dispatch_nodes"]:  # the dispatch module itself
            module_type = f"{module_type}({data['base_type']})"
        size = f"[{data['nodes']} node{'s' if data['nodes'] != 1 else ''}]"
        lines = [data["target"], f"{module_type} {size}" if module_type else size]
        if data["adapter_dispatch"] and data["nodes"] != data["dispatch_nodes"]:
            adapted = data["adapted"].split(", ")
            more = f" +{len(adapted) - _ADAPTED_SHOWN} more" if len(adapted) > _ADAPTED_SHOWN else ""
            lines.append(f"adapted: {', '.join(adapted[:_ADAPTED_SHOWN])}{more}")
    elif op in ("placeholder", "output"):
        lines = [name]
    else:
        lines = [name, data["target"]]
    if data["tensor_shape"]:
        lines.append(data["tensor_shape"] + (f" {data['dtype']}" if data["dtype"] else ""))
    if data.get("shared_readers"):
        lines.append(f"(read by {data['shared_readers']} layers)")
    look = {"shape": shape, "fillcolor": fill}
    if data["adapter_dispatch"]:
        look["fillcolor"] = _DISPATCH_FILL
    mark = data.get("diff")
    if mark == "changed":
        lines.insert(0, "CHANGED: adapter-dispatch" if data["adapter_dispatch"] else "CHANGED")
        look.update(fillcolor=_CHANGED_FILL, color=_CHANGED_PEN, penwidth="2.5")
    elif mark == "added":
        lines.insert(0, "ADDED")
        look["fillcolor"] = _ADDED_FILL
    look["label"] = "\n".join(_clean(line) for line in lines if line)
    details = [name, op, data["target"], data["module_path"], module_type, data["tensor_shape"], data["dtype"]]
    look["tooltip"] = " | ".join(_clean(item) for item in details if item)
    return look


def _clean(text: str) -> str:
    # Backslashes are escapes in Graphviz labels (\n, \l); none of our names needs one.
    return str(text).replace("\\", "/")


def _quoted(value: Any) -> str:
    """A DOT string literal, so that no value is read as a keyword, a port or HTML."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def _count(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


def _mean(values: list[float], default: float) -> float:
    return sum(values) / len(values) if values else default
