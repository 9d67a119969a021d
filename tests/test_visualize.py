"""fx_lntune.visualize and tools/visualize_graph.py: the networkx view, diff / filter / depth, DOT, SVG and summary."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import runpy
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pydot
import pytest
import torch
from conftest import captured
from models import make_inputs, make_model

import fx_lntune as fl
from fx_lntune import visualize as viz
from fx_lntune.passes.split_layers import inline_layers

TOOL = Path(__file__).resolve().parent.parent / "tools" / "visualize_graph.py"
SVG = "{http://www.w3.org/2000/svg}"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz 'dot' is not installed")


class Block(torch.nn.Module):
    """A plain module for the fx front-end, whose graph has no shapes in its meta."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.drop = torch.nn.Dropout(0.5)
        self.out_norm = torch.nn.LayerNorm(8)

    def forward(self, x):
        return self.out_norm(self.drop(self.norm(self.proj(x)).relu()) + x)


@functools.cache
def _bert_with_classifier():
    model = make_model("bert")
    config = fl.LNTuningConfig(modules_to_save=["classifier"])
    return fl.lntune_transform(model, config, tracer="export", example_inputs=make_inputs("bert"))


def _dot_nodes(path: Path) -> dict[str, dict[str, str]]:
    """Node name -> attributes (unquoted) of the one graph in a DOT file, read back with pydot."""
    (graph,) = pydot.graph_from_dot_file(str(path))
    nodes = {}
    for node in graph.get_nodes():
        name = node.get_name().strip('"')
        if name not in ("node", "edge", "graph"):  # default-attribute statements
            nodes[name] = {key: value.strip('"') for key, value in node.get_attributes().items()}
    return nodes


def _dot_edges(path: Path) -> set[tuple[str, str]]:
    (graph,) = pydot.graph_from_dot_file(str(path))
    return {(edge.get_source().strip('"'), edge.get_destination().strip('"')) for edge in graph.get_edges()}


def _svg_titles(path: Path) -> set[str]:
    """The titles of the node groups of an SVG (Graphviz and the built-in layout both title each node)."""
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return {g.find(f"{SVG}title").text for g in root.iter(f"{SVG}g") if g.get("class") == "node"}


def _changed(graph) -> set[str]:
    return {data["target"] for _, data in graph.nodes(data=True) if data.get("diff") == "changed"}


@needs_dot
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_tool_on_a_model_directory_writes_dot_svg_and_summary(arch, tmp_path, monkeypatch, capsys):
    model_dir = tmp_path / "model"
    make_model(arch).save_pretrained(model_dir)
    out = tmp_path / "graph.svg"
    monkeypatch.setattr("sys.argv", [str(TOOL), str(model_dir), "--diff", "-o", str(out)])
    with pytest.raises(SystemExit) as stop:
        runpy.run_path(str(TOOL), run_name="__main__")
    assert stop.value.code == 0

    _, gm = captured(arch)
    targets = fl.targeted_module_names(gm)
    nodes = _dot_nodes(tmp_path / "graph.dot")
    assert len(nodes) == len(inline_layers(gm).graph.nodes)
    assert _svg_titles(out) == set(nodes)  # every node drawn, by dot
    dispatch = {attrs["target"] for attrs in nodes.values() if attrs.get("adapter_dispatch") == "True"}
    marked = {attrs["target"] for attrs in nodes.values() if attrs["label"].startswith("CHANGED")}
    assert dispatch == marked == set(targets)
    printed = capsys.readouterr().out
    assert all(re.search(rf"^{re.escape(name)}\s", printed, re.M) for name in targets)
    assert f"wrote {out} (drawn by Graphviz dot)" in printed


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_dot_file_round_trips_the_networkx_graph(arch, tmp_path):
    _, gm = captured(arch)
    graph = viz.graph_to_networkx(gm)
    flat = inline_layers(gm)  # layers are drawn where the root calls them
    assert list(graph) == [node.name for node in flat.graph.nodes]
    viz.write_dot(graph, tmp_path / "g.dot")
    nodes = _dot_nodes(tmp_path / "g.dot")
    assert nodes.keys() == set(graph)
    assert _dot_edges(tmp_path / "g.dot") == set(graph.edges)
    for name, data in graph.nodes(data=True):
        for key in ("op", "target", "module_path", "module_type", "tensor_shape", "dtype"):
            assert nodes[name].get(key, "") == str(data[key]), (name, key)
    # Shapes as torch.export recorded them, e.g. (s0, s1, 32) for the output of every targeted norm.
    for node in flat.graph.nodes:
        if node.op == "call_module" and node.target in fl.targeted_module_names(gm):
            val = node.meta["val"]
            assert graph.nodes[node.name]["tensor_shape"] == "[" + ", ".join(map(str, val.shape)) + "]"
            assert graph.nodes[node.name]["dtype"] == "float32"
            assert graph.nodes[node.name]["module_type"] == "LNTuningDispatch"
            assert graph.nodes[node.name]["base_type"] == type(gm.get_submodule(node.target).base_layer).__name__


def test_fallback_svg_when_dot_is_missing(tmp_path, monkeypatch):
    _, gm = captured("llama")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "dot" else real_which(name, *a, **k))
    result = viz.visualize_graph(gm, tmp_path / "g.svg", before=fl.unload(gm))
    assert result.renderer == "builtin"
    assert any("Graphviz" in note and "not on PATH" in note for note in result.notes)
    assert result.files == [tmp_path / "g.svg", tmp_path / "g.dot"]
    assert _svg_titles(tmp_path / "g.svg") == set(result.graph)
    root = ET.parse(tmp_path / "g.svg").getroot()
    drawn_edges = [e for e in root.iter() if e.tag in (f"{SVG}line", f"{SVG}path") and e.get("marker-end")]
    assert len(drawn_edges) == result.graph.number_of_edges()
    marked = {g.get("id") for g in root.iter(f"{SVG}g") if g.find(f"{SVG}text").text == "CHANGED: adapter-dispatch"}
    assert {result.graph.nodes[name]["target"] for name in marked} == set(fl.targeted_module_names(gm))

    with pytest.raises(fl.LNTuneConfigError, match="Graphviz"):
        viz.visualize_graph(gm, tmp_path / "g.png")
    assert not (tmp_path / "g.png").exists()


def test_fallback_svg_of_a_collapsed_graph_with_cycles(tmp_path):
    _, gm = captured("llama")
    graph = viz.collapse_graph(viz.graph_to_networkx(gm), 1)  # "model" feeds and reads the top-level ops
    svg = viz.layered_svg(graph)
    (tmp_path / "c.svg").write_text(svg)
    assert _svg_titles(tmp_path / "c.svg") == set(graph)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_diff_marks_exactly_the_adapted_nodes(arch):
    _, gm = captured(arch)
    graph = viz.diff_graphs(fl.unload(gm), gm)
    changed = [data for _, data in graph.nodes(data=True) if data["diff"] == "changed"]
    assert {data["target"] for data in changed} == set(fl.targeted_module_names(gm))
    assert all(data["op"] == "call_module" and data["adapter_dispatch"] for data in changed)
    assert {data["diff"] for _, data in graph.nodes(data=True)} == {"changed", "same"}
    assert graph.graph["removed"] == []
    assert _changed(viz.diff_graphs(gm, gm)) == set()  # a graph against itself: nothing changed


def test_diff_marks_modules_to_save_and_a_separate_capture():
    gm = _bert_with_classifier()
    assert _changed(viz.diff_graphs(fl.unload(gm), gm)) == {*fl.targeted_module_names(gm), "classifier"}

    block = Block()
    config = fl.LNTuningConfig(target_modules=["norm"])
    tuned = fl.lntune_transform(block, config, tracer="fx", example_inputs={"x": torch.randn(2, 4, 8)})
    assert _changed(viz.diff_graphs(torch.fx.symbolic_trace(block), tuned)) == {"norm"}


def test_filter_keeps_the_matching_modules_and_hops_of_neighbours():
    _, gm = captured("llama")
    graph = viz.graph_to_networkx(gm)
    pattern = r"layers\.0\.input_layernorm"
    seeds = {name for name, data in graph.nodes(data=True) if re.search(pattern, data["module_path"])}
    assert len(seeds) == 1
    ring = {other for name in seeds for other in [*graph.predecessors(name), *graph.successors(name)]}
    assert set(viz.filter_graph(graph, pattern, hops=0)) == seeds
    one = viz.filter_graph(graph, pattern)
    assert set(one) == seeds | ring
    assert set(one.edges) == {(u, v) for u, v in graph.edges if u in one and v in one}
    two = viz.filter_graph(graph, pattern, hops=2)
    assert set(one) < set(two) < set(graph)

    layer = viz.filter_graph(graph, r"layers\.0\b", hops=0)
    assert {data["module_path"].split(".")[2] for _, data in layer.nodes(data=True)} == {"0"}
    assert {data["target"] for _, data in layer.nodes(data=True) if data["adapter_dispatch"]} == {
        "model.layers.0.input_layernorm",
        "model.layers.0.post_attention_layernorm",
    }


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(filter_regex="no_such_module"), ["no_such_module", "no module path"]),
        (dict(filter_regex="(unclosed"), ["not a valid regex"]),
        (dict(filter_regex="norm", hops=-1), ["hops"]),
        (dict(depth=0), ["depth"]),
        (dict(output_name="graph.jpg"), [".svg", ".dot"]),
    ],
)
def test_bad_options_raise_and_write_nothing(options, words, tmp_path):
    _, gm = captured("llama")
    code = gm.code
    output = tmp_path / options.pop("output_name", "graph.svg")
    with pytest.raises(fl.LNTuneConfigError) as caught:
        viz.visualize_graph(gm, output, **options)
    assert all(word in str(caught.value) for word in words)
    assert list(tmp_path.iterdir()) == [] and gm.code == code


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_depth_collapses_nodes_into_module_groups(depth):
    _, gm = captured("llama")
    graph = viz.diff_graphs(fl.unload(gm), gm)
    group = {
        name: ".".join(data["module_path"].split(".")[:depth]) if data["module_path"] else name
        for name, data in graph.nodes(data=True)
    }
    collapsed = viz.collapse_graph(graph, depth)
    assert set(collapsed) == set(group.values())
    assert collapsed.number_of_nodes() < graph.number_of_nodes()
    modules = {name: data for name, data in collapsed.nodes(data=True) if data["op"] == "module"}
    assert all(len(name.split(".")) <= depth for name in modules)
    held = sum(data["nodes"] for data in modules.values()) + collapsed.number_of_nodes() - len(modules)
    assert held == graph.number_of_nodes()
    assert set(collapsed.edges) == {(group[u], group[v]) for u, v in graph.edges if group[u] != group[v]}
    targets = fl.targeted_module_names(gm)
    changed = {name for name, data in collapsed.nodes(data=True) if data.get("diff") == "changed"}
    assert changed == {".".join(path.split(".")[:depth]) for path in targets}


def test_filter_then_depth_in_one_drawing(tmp_path):
    _, gm = captured("llama")
    result = viz.visualize_graph(gm, tmp_path / "g.dot", filter_regex=r"layers\.0\b", hops=0, depth=4)
    assert result.files == [tmp_path / "g.dot"] and result.renderer is None
    assert set(_dot_nodes(tmp_path / "g.dot")) == set(result.graph)
    assert {name for name, data in result.graph.nodes(data=True) if data["op"] == "module"} == {
        "model.layers.0.input_layernorm",
        "model.layers.0.self_attn",
        "model.layers.0.post_attention_layernorm",
        "model.layers.0.mlp",
        "model.layers.0",
    }


def _table_columns(table: str) -> tuple[list[str], dict[str, list[int]], dict[str, int]]:
    """Header, per-column numbers of the module rows, and the total row, from `summary_table`'s text."""
    lines = table.splitlines()
    header = lines[0].split()
    rows = [line.split() for line in lines[2:] if line and not line.startswith(("-", "total", "trainable"))]
    total = next(line for line in lines if line.startswith("total")).split()
    numbers = header[3:]
    columns = {name: [int(row[3 + i].replace(",", "")) for row in rows] for i, name in enumerate(numbers)}
    totals = {name: int(value.replace(",", "")) for name, value in zip(numbers, total[-len(numbers) :], strict=True)}
    return [row[0] for row in rows], columns, totals


def _peft_line(gm) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        fl.print_trainable_parameters(gm)
    return buffer.getvalue().strip()


def test_summary_table_counts_equal_get_nb_trainable_parameters():
    _, gm = captured("llama")
    fl.add_adapter(gm, "other", fl.LNTuningConfig(target_modules=["input_layernorm"]))
    for active in ["default", "other"]:
        fl.set_adapter(gm, active)
        table = viz.summary_table(gm)
        modules, columns, totals = _table_columns(table)
        assert modules == fl.targeted_module_names(gm)
        assert f"{active}*" in columns
        trainable, _ = fl.get_nb_trainable_parameters(gm)
        assert sum(columns[f"{active}*"]) == totals[f"{active}*"] == trainable
        assert table.splitlines()[-1].startswith(_peft_line(gm))
    other = dict(zip(modules, columns["other*"], strict=True))
    assert [name for name, count in other.items() if count] == [
        "model.layers.0.input_layernorm",
        "model.layers.1.input_layernorm",
    ]

    gm = _bert_with_classifier()
    modules, columns, totals = _table_columns(viz.summary_table(gm))
    assert modules == [*fl.targeted_module_names(gm), "classifier"]
    assert sum(columns["default*"]) == fl.get_nb_trainable_parameters(gm)[0]
    assert columns["base"] == columns["default*"]


def test_shape_propagation_fills_missing_shapes_and_restores_the_graph():
    block = Block().train()
    x = torch.randn(3, 5, 8)
    gm = fl.lntune_transform(block, fl.LNTuningConfig(target_modules=["norm"]), tracer="fx", example_inputs={"x": x})
    assert all(data["tensor_shape"] == "" for _, data in viz.graph_to_networkx(gm).nodes(data=True))
    metas = {node.name: dict(node.meta) for node in gm.graph.nodes}
    modes = [module.training for module in gm.modules()]
    rng = torch.get_rng_state()
    graph = viz.graph_to_networkx(gm, {"x": x})
    assert {name: graph.nodes[name]["tensor_shape"] for name in ("x", "norm", "out_norm")} == dict.fromkeys(
        ("x", "norm", "out_norm"), "[3, 5, 8]"
    )
    assert {node.name: dict(node.meta) for node in gm.graph.nodes} == metas
    assert [module.training for module in gm.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)

    with pytest.raises(fl.LNTuneConfigError, match="'x'"):
        viz.graph_to_networkx(gm, {"y": x})


# --- a picture of any size: one box per layer, and no Graphviz run that would take minutes ---------------------


def test_a_large_graph_is_drawn_one_box_per_layer_by_default(tmp_path, monkeypatch):
    _, gm = captured("llama")
    flat = viz.graph_to_networkx(gm)
    monkeypatch.setattr(viz, "LAYER_VIEW_NODES", flat.number_of_nodes() - 1)  # the tiny llama counts as large
    result = viz.visualize_graph(gm, tmp_path / "g.svg", before=fl.unload(gm))
    layers = [f"model.layers.{i}" for i in range(2)]
    boxes = {name: data for name, data in result.graph.nodes(data=True) if data["op"] == "module"}
    assert set(layers) <= set(boxes)
    assert not [
        data
        for data in result.graph.nodes.values()
        if data["module_path"].startswith("model.layers.") and data["op"] != "module"
    ]
    # Each layer box names the adapted modules inside it (relative to it) and is marked changed.
    targets = fl.targeted_module_names(gm)
    for layer in layers:
        adapted = [path[len(layer) + 1 :] for path in targets if path.startswith(layer + ".")]
        assert boxes[layer]["adapted"].split(", ") == adapted and boxes[layer]["diff"] == "changed"
        assert f"adapted: {', '.join(adapted)}" in viz._appearance(layer, boxes[layer])["label"]
    assert {"model.norm", "lm_head", "model.embed_tokens"} <= set(boxes)
    assert result.graph.number_of_nodes() < flat.number_of_nodes() / 3
    (note,) = [note for note in result.notes if "one box per layer" in note]
    assert r"--filter 'model\.layers\.0\b' --depth 5" in note and "--no-by-layer" in note
    # An input that every layer reads is one label, not an edge to each layer; the layers form one chain.
    shared = [(u, v) for u, v, data in result.graph.edges(data=True) if data.get("shared")]
    assert not set(shared) & _dot_edges(tmp_path / "g.dot")
    assert set(result.graph.edges) - set(shared) == _dot_edges(tmp_path / "g.dot")
    assert ("model.layers.0", "model.layers.1") in _dot_edges(tmp_path / "g.dot")
    assert _svg_titles(tmp_path / "g.svg") == set(result.graph)

    # Zooming in (a filter or a depth) or by_layer=False draws nodes again; by_layer=True forces the boxes.
    assert viz.visualize_graph(gm, tmp_path / "a.dot", by_layer=False).graph.number_of_nodes() == len(flat)
    zoom = viz.visualize_graph(gm, tmp_path / "b.dot", filter_regex=r"model\.layers\.0\b", depth=5)
    assert "model.layers.0.input_layernorm" in zoom.graph and not zoom.notes
    monkeypatch.setattr(viz, "LAYER_VIEW_NODES", 10**6)
    assert set(viz.visualize_graph(gm, tmp_path / "c.dot", by_layer=True).graph) == set(result.graph)


def test_by_layer_refusals(tmp_path):
    _, gm = captured("llama")
    with pytest.raises(fl.LNTuneConfigError, match="pass one of them"):
        viz.visualize_graph(gm, tmp_path / "g.svg", by_layer=True, depth=3)
    plain = torch.fx.symbolic_trace(Block())
    with pytest.raises(fl.LNTuneConfigError, match="no layer submodules"):
        viz.visualize_graph(plain, tmp_path / "g.svg", by_layer=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["svg", "png"])
def test_graphviz_is_not_started_on_a_picture_too_large_for_it(kind, tmp_path, monkeypatch):
    _, gm = captured("llama")

    def no_dot(*args, **kwargs):
        raise AssertionError("Graphviz was started")

    monkeypatch.setattr(viz.subprocess, "run", no_dot)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/dot")  # as if installed
    if kind == "png":
        with pytest.raises(fl.LNTuneConfigError, match=r"Graphviz would take minutes .* write an \.svg"):
            viz.visualize_graph(gm, tmp_path / "g.png", by_layer=False, max_dot_size=100)
        assert list(tmp_path.iterdir()) == []
        return
    result = viz.visualize_graph(gm, tmp_path / "g.svg", by_layer=False, max_dot_size=100)
    assert result.renderer == "builtin" and _svg_titles(tmp_path / "g.svg") == set(result.graph)
    assert any("max_dot_size=100" in note and "--filter" in note for note in result.notes)


def test_a_graphviz_run_that_hangs_is_stopped(tmp_path, monkeypatch):
    _, gm = captured("llama")

    def hangs(command, **kwargs):
        assert kwargs["timeout"] > 0
        raise viz.subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(viz.subprocess, "run", hangs)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/dot")
    with pytest.raises(fl.LNTuneExportError, match="was stopped; draw fewer nodes"):
        viz.visualize_graph(gm, tmp_path / "g.svg", filter_regex=r"layers\.0\b")
    assert list(tmp_path.iterdir()) == []
