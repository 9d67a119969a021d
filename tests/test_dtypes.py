"""Dtypes and devices: every adapter copy follows the graph's dtype and device, merge stays an exact swap, and a
tuned graph survives deepcopy, pickling and a state-dict round trip with its adapters working."""

from __future__ import annotations

import copy
import functools
import io
import pickle

import pytest
import torch
from models import make_inputs, make_model

import fx_lntune as fl
from fx_lntune.dispatch import AdapterDispatch
from fx_lntune.passes._graphs import graph_modules
from fx_lntune.state import dispatch_modules, get_state

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CONFIG = fl.LNTuningConfig(modules_to_save=["classifier"])
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@functools.cache
def _captured(dtype: torch.dtype):
    """A bert capture of the model converted to ``dtype``, with a second adapter whose copies differ."""
    model = make_model("bert").to(dtype)
    gm = fl.lntune_transform(model, CONFIG, example_inputs=make_inputs("bert"))
    fl.add_adapter(gm, "other")
    _perturb(gm, "default", seed=1)
    _perturb(gm, "other", seed=2)
    return model, gm


def _perturb(gm, adapter: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in dispatch_modules(gm).values():
            for param in module.copies[adapter].parameters():
                param.add_((0.1 * torch.randn(param.shape, generator=generator)).to(param.dtype))


def _fresh(dtype: torch.dtype = torch.float32):
    model, gm = _captured(dtype)
    return copy.deepcopy(model), copy.deepcopy(gm)


def _logits(gm, device: str | torch.device = "cpu") -> torch.Tensor:
    inputs = {key: value.to(device) for key, value in make_inputs("bert", batch=3, seq=5, seed=1).items()}
    with torch.no_grad():
        return gm(**inputs)["logits"]


def _state(gm) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in gm.state_dict().items()}


def _assert_state_equal(ours: dict, expected: dict) -> None:
    assert ours.keys() == expected.keys()
    for key, value in ours.items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key


def _floating(gm) -> list[torch.Tensor]:
    return [t for t in [*gm.parameters(), *gm.buffers()] if t.is_floating_point()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtype_kept_in_every_copy_and_merge_is_an_exact_swap(dtype):
    model, gm = _fresh(dtype)
    assert {t.dtype for t in _floating(gm)} == {dtype}
    fl.add_adapter(gm, "third")  # added after capture: copies the base, in its dtype
    assert {t.dtype for t in _floating(gm)} == {dtype}
    base = _state(gm)
    outputs = {}
    for name in ["default", "other"]:
        fl.set_adapter(gm, name)
        outputs[name] = _logits(gm)
        assert outputs[name].dtype == dtype
    assert not torch.equal(outputs["default"], outputs["other"])

    for name in ["other", "default"]:
        copies = {path: list(m.copies[name].parameters()) for path, m in dispatch_modules(gm).items()}
        fl.merge_adapter(gm, name)
        for path, module in dispatch_modules(gm).items():  # the copy's own tensors now sit in the base slot
            assert [p.data_ptr() for p in module.base.parameters()] == [p.data_ptr() for p in copies[path]]
        assert {t.dtype for t in _floating(gm)} == {dtype}
        assert torch.equal(_logits(gm), outputs[name])  # bit for bit: merging computes nothing
        fl.unmerge_adapter(gm)
        _assert_state_equal(_state(gm), base)
    with fl.disable_adapters(gm):
        assert torch.equal(_logits(gm), _logits(fl.unload(gm)))
    plain = fl.merge_and_unload(gm, "other")
    assert {t.dtype for t in _floating(plain)} == {dtype} and torch.equal(_logits(plain), outputs["other"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_to_dtype_moves_every_copy_and_the_base(dtype):
    _, gm = _fresh()
    fl.merge_adapter(gm, "other")  # a merged copy sits in the base slot: it must move too
    before = _state(gm)
    gm.to(dtype)
    assert {t.dtype for t in _floating(gm)} == {dtype}
    for module in dispatch_modules(gm).values():
        for child in [module.base, *module.copies.values()]:
            assert {p.dtype for p in child.parameters()} == {dtype}
    converted = {key: value.to(dtype) if value.is_floating_point() else value for key, value in before.items()}
    _assert_state_equal(_state(gm), converted)
    fl.unmerge_adapter(gm)
    fl.merge_adapter(gm, "other")
    _assert_state_equal(_state(gm), converted)
    with pytest.warns(UserWarning, match="unmerging"):
        fl.set_adapter(gm, "default")
    assert {p.dtype for p in gm.parameters() if p.requires_grad} == {dtype}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_bert_converted_after_capture_runs_in_the_new_dtype(dtype):
    """``gm.to(dtype)`` after an fp32 capture gives a working graph (every architecture: test_dtype_follow.py)."""
    _, gm = _fresh()
    fl.merge_adapter(gm, "other")
    expected = _logits(gm.to(dtype))
    assert expected.dtype == dtype
    fl.unmerge_adapter(gm)
    fl.merge_adapter(gm, "other")
    assert torch.equal(_logits(gm), expected)
    reference = copy.deepcopy(_captured(torch.float32)[1]).to(dtype)
    fl.set_adapter(reference, "other")
    assert torch.equal(_logits(gm), _logits(reference))


def test_to_device_moves_every_copy_and_the_base():
    """The meta device stands in for a second device on a CPU-only machine; CUDA is tested below when present."""
    _, gm = _fresh()
    fl.merge_adapter(gm, "other")
    gm.to("meta")
    assert {t.device.type for t in [*gm.parameters(), *gm.buffers()]} == {"meta"}
    for module in dispatch_modules(gm).values():
        assert {p.device.type for child in [module.base, *module.copies.values()] for p in child.parameters()} == {
            "meta"
        }
    assert _logits(gm, "meta").device.type == "meta"


@CUDA
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_graph_matches_cpu(dtype):
    _, gm = _fresh(dtype)
    expected = _logits(gm).float()
    gm.to("cuda")
    assert {t.device.type for t in [*gm.parameters(), *gm.buffers()]} == {"cuda"}
    tolerance = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(_logits(gm, "cuda").float().cpu(), expected, **tolerance)
    fl.set_adapter(gm, "other")
    other = _logits(gm, "cuda")
    fl.merge_adapter(gm)
    assert torch.equal(_logits(gm, "cuda"), other)
    fl.unmerge_adapter(gm)
    assert torch.equal(_logits(fl.merge_and_unload(gm), "cuda"), other)


@CUDA
def test_capture_on_cuda_runs_there():
    model = make_model("bert").to("cuda")
    inputs = {key: value.to("cuda") for key, value in make_inputs("bert").items()}
    gm = fl.lntune_transform(model, CONFIG, example_inputs=inputs)
    assert {p.device.type for p in gm.parameters()} == {"cuda"}
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs)["logits"], model(**inputs)["logits"], atol=1e-4, rtol=1e-4)


def _check_copy(original, other) -> None:
    """``other`` is an independent tuned graph equal to ``original``: same state, outputs and trainable
    parameters; its dispatch modules route to their own children; changing it leaves ``original`` alone."""
    assert other is not original
    ours, theirs = get_state(other), get_state(original)
    assert ours is not theirs and ours == theirs
    assert fl.list_adapters(other) == fl.list_adapters(original)
    assert fl.targeted_module_names(other) == fl.targeted_module_names(original)
    assert list(other.state_dict()) == list(original.state_dict())
    _assert_state_equal(_state(other), _state(original))
    trainable = sorted(name for name, p in original.named_parameters() if p.requires_grad)
    assert sorted(name for name, p in other.named_parameters() if p.requires_grad) == trainable
    for path, module in dispatch_modules(other).items():
        assert module._route in list(module.children()) + list(module.copies.values()), path
        assert module is not original.get_submodule(path)
    assert torch.equal(_logits(other), _logits(original))
    before, expected = _state(original), _logits(original)
    fl.set_adapter(other, "default")
    fl.merge_adapter(other)
    fl.add_adapter(other, "later")
    assert torch.equal(_logits(other), _logits(fl.merge_and_unload(original, "default")))
    assert fl.list_adapters(original) == ["default", "other"] and fl.active_adapter(original) == "other"
    _assert_state_equal(_state(original), before)
    assert torch.equal(_logits(original), expected)


def _tuned_and_merged():
    _, gm = _fresh()
    fl.set_adapter(gm, "other")
    return gm


def test_deepcopy_is_an_independent_tuned_graph():
    gm = _tuned_and_merged()
    _check_copy(gm, copy.deepcopy(gm))


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickled_graph_keeps_its_adapters_and_works(how):
    """torch.fx pickles a GraphModule's code and re-traces it on load; our state and dispatch modules survive."""
    gm = _tuned_and_merged()
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(gm))
    else:
        buffer = io.BytesIO()
        torch.save(gm, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert isinstance(loaded, torch.fx.GraphModule)
    assert [type(m).__name__ for m in loaded.modules() if isinstance(m, AdapterDispatch)] == [
        type(m).__name__ for m in dispatch_modules(gm).values()
    ]
    nodes = [n for _, module in graph_modules(loaded) for n in module.graph.nodes]
    assert [n.op for n in nodes if n.op == "call_module"] and not [
        n.target for n in nodes if n.op == "get_attr" and "_tensor_constant" in str(n.target)
    ]  # buffers are read, not baked into constants
    assert [path for path, _ in graph_modules(loaded)] == [path for path, _ in graph_modules(gm)]
    assert loaded.config.to_dict() == gm.config.to_dict()
    _check_copy(gm, loaded)
    assert copy.deepcopy(loaded).config.to_dict() == gm.config.to_dict()


def test_state_dict_round_trip(tmp_path):
    gm = _tuned_and_merged()
    torch.save(gm.state_dict(), tmp_path / "state.pt")
    _, fresh = copy.deepcopy(_captured(torch.float32))
    with torch.no_grad():  # a graph with the same adapters but other weights
        for param in fresh.parameters():
            param.add_(1.0)
    assert not torch.equal(_logits(fresh), _logits(gm))
    result = fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    fl.set_adapter(fresh, "other")
    assert torch.equal(_logits(fresh), _logits(gm))
    _assert_state_equal(_state(fresh), _state(gm))
