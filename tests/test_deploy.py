"""Export to TorchScript, ONNX and torch.export programs: each file, loaded back, against the tuned graph."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import captured
from models import make_inputs

import fx_lntune as fl
from fx_lntune.state import META_KEY

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

OTHER_SIZE = {"batch": 3, "seq": 5, "seed": 1}
TOLERANCE = {"atol": 1e-4, "rtol": 0.0}


def _tuned(arch: str, seed: int = 1) -> torch.fx.GraphModule:
    """A tuned graph whose active adapter differs from the base, so that only a merged export matches it."""
    _, gm = captured(arch)
    _perturb(gm, fl.active_adapter(gm), seed)
    return gm


def _perturb(gm, adapter: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(gm.named_parameters()):
            if f".ln_tuning_layers.{adapter}." in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _outputs(module, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = module(**inputs)
    return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}


def _snapshot(gm) -> dict:
    tuned = META_KEY in gm.meta
    return {
        "code": gm.code,
        "training": [module.training for module in gm.modules()],
        "trainable": sorted(name for name, param in gm.named_parameters() if param.requires_grad),
        "adapters": (fl.list_adapters(gm), fl.active_adapter(gm), gm.meta[META_KEY].merged_adapter) if tuned else None,
        "state": {key: value.clone() for key, value in gm.state_dict().items()},
    }


def _assert_unchanged(gm, before: dict) -> None:
    after = _snapshot(gm)
    for key in ("code", "training", "trainable", "adapters"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(value, before["state"][key]) for key, value in after["state"].items())


def _check_against_graph(run, gm, arch: str, sizes=({}, OTHER_SIZE)) -> None:
    """``run(inputs)`` (the loaded file) gives the graph's outputs at every size, and the graph is not the base."""
    for size in sizes:
        inputs = make_inputs(arch, **size)
        reference, ours = _outputs(gm, inputs), run(inputs)
        assert sorted(ours) == sorted(reference)
        for key, value in reference.items():
            torch.testing.assert_close(ours[key], value, **TOLERANCE, msg=f"{key} at {size}")
    with fl.disable_adapters(gm):
        base = _outputs(gm, inputs)
    assert not torch.allclose(base["logits"], reference["logits"], **TOLERANCE)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5", "bart", "vit"])
def test_onnx_runs_in_onnxruntime_like_the_graph(arch, tmp_path):
    gm = _tuned(arch)
    before = _snapshot(gm)
    path = fl.export_onnx(gm, tmp_path / "model.onnx", make_inputs(arch))
    _assert_unchanged(gm, before)
    assert [file.name for file in tmp_path.iterdir()] == ["model.onnx"]

    model = onnx.load(path)
    onnx.checker.check_model(model)
    # The file takes the inputs given (in the graph's order); the graph's other inputs are optional.
    input_names = [name for name in gm.meta[META_KEY].input_names if name in make_inputs(arch)]
    shapes = {
        value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in model.graph.input
    }
    assert list(shapes) == input_names
    for name, shape in shapes.items():
        sequence = "decoder_sequence" if name.startswith("decoder_") else "sequence"
        assert shape == (["batch", 3, 16, 16] if name == "pixel_values" else ["batch", sequence]), name
    assert [value.name for value in model.graph.output] == list(_outputs(gm, make_inputs(arch)))

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_outputs()]

    def run(inputs):
        values = session.run(names, {name: value.numpy() for name, value in inputs.items()})
        return {name: torch.from_numpy(value) for name, value in zip(names, values, strict=True)}

    _check_against_graph(run, gm, arch)


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5"])
def test_torchscript_runs_like_the_graph(arch, tmp_path):
    gm = _tuned(arch)
    before = _snapshot(gm)
    path = fl.export_torchscript(gm, tmp_path / "model.pt", make_inputs(arch))
    _assert_unchanged(gm, before)
    module = torch.jit.load(str(path))
    _check_against_graph(lambda inputs: module(**inputs), gm, arch)
    inputs = make_inputs(arch, **OTHER_SIZE)
    positional = module(*(inputs[name] for name in gm.meta[META_KEY].input_names if name in inputs))
    assert all(torch.equal(value, positional[key]) for key, value in module(**inputs).items())


def test_program_follows_the_active_adapter_at_any_size(tmp_path):
    gm = _tuned("llama")
    fl.add_adapter(gm, "other")
    _perturb(gm, "other", seed=2)
    inputs = make_inputs("llama", **OTHER_SIZE)
    default = _outputs(gm, inputs)["logits"]
    fl.set_adapter(gm, "other")
    before = _snapshot(gm)
    path = fl.export_program(gm, tmp_path / "model.pt2", make_inputs("llama"))
    _assert_unchanged(gm, before)
    module = torch.export.load(str(path)).module()
    _check_against_graph(lambda inputs: module(**inputs), gm, "llama", ({}, OTHER_SIZE, {"batch": 4, "seq": 12}))
    assert not torch.allclose(module(**inputs)["logits"], default, **TOLERANCE)


def test_program_follows_an_adapter_merged_in_place(tmp_path):
    """With "other" merged while "default" is active, the graph computes "other": so does the file."""
    gm = _tuned("llama")
    fl.add_adapter(gm, "other")
    _perturb(gm, "other", seed=2)
    fl.merge_adapter(gm, "other")
    before = _snapshot(gm)
    path = fl.export_program(gm, tmp_path / "model.pt2", make_inputs("llama"))
    _assert_unchanged(gm, before)
    module = torch.export.load(str(path)).module()
    inputs = make_inputs("llama", **OTHER_SIZE)
    assert fl.active_adapter(gm) == "default"
    torch.testing.assert_close(module(**inputs)["logits"], _outputs(gm, inputs)["logits"], **TOLERANCE)


def test_program_of_a_plain_graph(tmp_path):
    plain = fl.merge_and_unload(_tuned("llama"))
    before = _snapshot(plain)
    module = torch.export.load(str(fl.export_program(plain, tmp_path / "model.pt2", make_inputs("llama")))).module()
    _assert_unchanged(plain, before)
    for size in ({}, OTHER_SIZE):
        inputs = make_inputs("llama", **size)
        assert all(torch.equal(module(**inputs)[key], value) for key, value in _outputs(plain, inputs).items())


EXPORTS = {"torchscript": fl.export_torchscript, "onnx": fl.export_onnx, "program": fl.export_program}


def _loaded(fmt: str, path):
    """A callable over keyword inputs giving the exported file's outputs as tensors by name."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [value.name for value in session.get_outputs()]

        def run(inputs):
            values = session.run(names, {name: value.numpy() for name, value in inputs.items()})
            return {name: torch.from_numpy(value) for name, value in zip(names, values, strict=True)}

        return run
    module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    return lambda inputs: module(**inputs)


@pytest.mark.parametrize(
    ("fmt", "size"),
    [("torchscript", {"batch": 1}), ("onnx", {"batch": 1}), ("program", {"batch": 1}), ("program", {"seq": 1})],
)
def test_size_one_example_inputs_export_a_file_for_any_size(fmt, size, tmp_path):
    """One example of batch or length 1 is accepted, as lntune_transform accepts it; the file is not fixed to 1."""
    gm = _tuned("llama")
    before = _snapshot(gm)
    example = make_inputs("llama", **size)
    path = EXPORTS[fmt](gm, tmp_path / "model", example)
    _assert_unchanged(gm, before)
    assert [file.name for file in tmp_path.iterdir()] == ["model"]
    run = _loaded(fmt, path)
    _check_against_graph(run, gm, "llama", ({}, OTHER_SIZE, size))


# --- refusals and failures: our error, a message naming the cause, the graph unchanged, no file written ----------


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda inputs: inputs.pop("input_ids"), r"missing \['input_ids'\]"),
        (lambda inputs: inputs.update(pixel_values=inputs["input_ids"]), r"unknown \['pixel_values'\]"),
        (lambda inputs: inputs.update(attention_mask=None), "must be a tensor"),
    ],
)
def test_inputs_that_are_not_the_graphs_are_refused(change, words, tmp_path):
    gm = _tuned("llama")
    inputs = make_inputs("llama")
    change(inputs)
    with pytest.raises(fl.LNTuneExportError, match=words):
        fl.export_program(gm, tmp_path / "model.pt2", inputs)
    assert not list(tmp_path.iterdir())


def test_not_a_graph_module_is_refused(tmp_path):
    model, _ = captured("llama")
    with pytest.raises(fl.LNTuneExportError, match="lntune_transform"):
        fl.export_program(model, tmp_path / "model.pt2", make_inputs("llama"))


def test_missing_onnx_extra_says_how_to_install(monkeypatch, tmp_path):
    gm = _tuned("llama")
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx now raises ImportError
    with pytest.raises(fl.LNTuneExportError, match=r"pip install fx-lntune\[onnx\]"):
        fl.export_onnx(gm, tmp_path / "model.onnx", make_inputs("llama"))
    assert not list(tmp_path.iterdir())


@torch.library.custom_op("fx_lntune_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:
    """An operator with no fake (meta) kernel: torch.export, and so the ONNX exporter, cannot trace it."""
    return x * 2


class _WithOpaqueOp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x):
        return torch.ops.fx_lntune_test.opaque(self.norm(x))


@pytest.mark.parametrize("fmt", ["onnx", "program"])
def test_failing_export_names_the_operator_and_leaves_everything(fmt, tmp_path):
    inputs = {"x": torch.randn(2, 3, 4)}
    gm = fl.lntune_transform(_WithOpaqueOp(), fl.LNTuningConfig(target_modules=["norm"]), example_inputs=inputs)
    before = _snapshot(gm)
    path = tmp_path / "model"
    path.write_bytes(b"previous")
    with pytest.raises(fl.LNTuneExportError, match="fx_lntune_test(::|\\.)opaque") as caught:
        EXPORTS[fmt](gm, path, inputs)
    assert "export failed" in str(caught.value)
    _assert_unchanged(gm, before)
    assert path.read_bytes() == b"previous" and len(list(tmp_path.iterdir())) == 1


def test_torchscript_names_an_operator_whose_size_the_trace_would_freeze(tmp_path):
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    size = graph.call_function(torch.ops.aten.sym_size.int, (x, 0))
    graph.output(graph.call_function(torch.ops.aten.new_full.default, (x, [size, 2], 1.0)))
    plain = torch.fx.GraphModule(torch.nn.Module(), graph)
    path = tmp_path / "model.pt"
    with pytest.raises(fl.LNTuneExportError, match="aten.new_full"):
        fl.export_torchscript(plain, path, {"x": torch.randn(2, 3)})
    assert not list(tmp_path.iterdir())
