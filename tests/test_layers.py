"""Layers as submodules of their own: the split capture, per-layer FSDP2 and activation checkpointing."""

from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import captured
from ddp_worker import PER_RANK_BATCH, train
from models import make_config, make_inputs

import fx_lntune as fl
from fx_lntune.capture import hf_fx_available
from fx_lntune.dispatch import AdapterDispatch, LNTuningDispatch
from fx_lntune.passes._graphs import graph_modules, leaf_calls
from fx_lntune.passes.split_layers import inline_layers

LAYERS = {
    "llama": ["model.layers.0", "model.layers.1"],
    "bert": ["bert.encoder.layer.0", "bert.encoder.layer.1"],
    "t5": ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"],
    "gpt2": ["transformer.h.0", "transformer.h.1"],
}
WORKER = Path(__file__).with_name("fsdp_layers_worker.py")


def _first(output) -> torch.Tensor:
    return next(value for value in output.values() if isinstance(value, torch.Tensor))


def _paths(gm) -> list[str]:
    modules = {id(module): path for path, module in gm.named_modules()}
    return [modules[id(layer)] for layer in fl.layer_modules(gm)]


def _nodes(gm) -> dict[str, list[tuple]]:
    return {path: [(n.op, n.target, str(n.args)) for n in module.graph.nodes] for path, module in graph_modules(gm)}


@pytest.mark.parametrize("arch", list(LAYERS))
def test_each_layer_is_a_graph_module_the_root_calls(arch):
    model, gm = captured(arch)
    assert _paths(gm) == LAYERS[arch]
    calls = [str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.target in LAYERS[arch]]
    assert calls == LAYERS[arch]  # once each, in order, from the root graph
    for path in LAYERS[arch]:
        layer = gm.get_submodule(path)
        assert type(layer).__mro__[1] is torch.fx.GraphModule
        # The layer's own norms are dispatch modules inside it, called by its graph at their own names.
        inner = [name for name in fl.targeted_module_names(gm) if name.startswith(path + ".")]
        assert inner and all(isinstance(gm.get_submodule(name), LNTuningDispatch) for name in inner)
        assert {f"{path}.{n.target}" for n in layer.graph.nodes if n.op == "call_module"} >= set(inner)
    # No layer's nodes are left in the root graph.
    assert not [
        n for n in gm.graph.nodes if n.op == "get_attr" and any(str(n.target).startswith(p + ".") for p in LAYERS[arch])
    ]
    # The state dict keeps the model's keys (each targeted norm's under base_layer, plus the adapter copies).
    ours = {key.replace(".base_layer.", ".") for key in gm.state_dict() if ".ln_tuning_layers." not in key}
    assert ours == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(gm.state_dict()[key if key in gm.state_dict() else _base_key(gm, key)], value), key
    inputs = make_inputs(arch, batch=3, seq=5, seed=1)
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(gm(**inputs)), _first(model(**inputs)), atol=0, rtol=0)
        torch.testing.assert_close(_first(inline_layers(gm)(**inputs)), _first(model(**inputs)), atol=0, rtol=0)


def _base_key(gm, key: str) -> str:
    path, _, name = key.rpartition(".")
    return f"{path}.base_layer.{name}"


def test_values_shared_across_layers_are_inputs_of_each_layer():
    _, gm = captured("llama")
    calls = [n for n in gm.graph.nodes if n.op == "call_module" and n.target in LAYERS["llama"]]
    first, second = ([arg for arg in call.args] for call in calls)
    assert first[1:] == second[1:]  # rotary cos/sin, mask and sizes: the same root values into both layers
    assert second[0] is calls[0]  # the hidden states flow from one layer into the next
    assert len(first) >= 3


@pytest.mark.skipif(not hf_fx_available(), reason="transformers.utils.fx exists only in transformers < 5")
def test_hf_fx_capture_is_split_too():
    model, gm = captured("bert", tracer="hf_fx")
    assert _paths(gm) == LAYERS["bert"]
    inputs = make_inputs("bert", batch=3, seq=5, seed=1)
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(gm(**inputs)), _first(model(**inputs)), atol=0, rtol=0)


def test_a_layer_shared_across_depth_stays_in_the_root_graph():
    model, gm = captured("albert")  # one AlbertLayerGroup called num_hidden_layers times
    assert fl.layer_modules(gm) == []
    gm.eval()
    inputs = make_inputs("albert")
    with torch.no_grad():
        torch.testing.assert_close(_first(gm(**inputs)), _first(model(**inputs)))


@pytest.mark.parametrize("arch", ["llama", "t5"])
def test_merge_and_unload_gives_nested_plain_graph_modules_node_for_node(arch):
    _, gm = captured(arch)
    nodes = _nodes(gm)
    with torch.no_grad():
        for path in fl.targeted_module_names(gm):
            for param in gm.get_submodule(f"{path}.ln_tuning_layers.default").parameters():
                param.add_(0.05)
    inputs = make_inputs(arch)
    gm.eval()
    with torch.no_grad():
        expected = _first(gm(**inputs))
    for plain in (fl.merge_and_unload(gm), fl.unload(gm)):
        assert _paths(plain) == LAYERS[arch]
        assert all(type(module).__mro__[1] is torch.fx.GraphModule for _, module in graph_modules(plain))
        assert not [m for m in plain.modules() if isinstance(m, AdapterDispatch)]
        assert _nodes(plain) == nodes
    with torch.no_grad():
        torch.testing.assert_close(_first(fl.merge_and_unload(gm).eval()(**inputs)), expected, atol=0, rtol=0)
    assert _paths(fl.merge_and_unload(gm)) == LAYERS[arch]


def test_adapters_inside_layers_switch_merge_and_add():
    _, gm = captured("llama")
    fl.add_adapter(gm, "other", fl.LNTuningConfig(target_modules=["input_layernorm"]))
    assert set(leaf_calls(gm)) >= set(fl.targeted_module_names(gm))
    layer_norm = gm.get_submodule("model.layers.1.input_layernorm")
    assert set(layer_norm.copies) == {"default", "other"}
    fl.set_adapter(gm, "other")
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == [
        "model.layers.0.input_layernorm.ln_tuning_layers.other.weight",
        "model.layers.1.input_layernorm.ln_tuning_layers.other.weight",
    ]
    fl.merge_adapter(gm)
    assert layer_norm.merged_adapter == "other"
    fl.unmerge_adapter(gm)
    fl.delete_adapter(gm, "other")
    assert set(layer_norm.copies) == {"default"}


# ------------------------------------------------------------------------------------------ activation checkpointing


def _llama(layers: int) -> torch.fx.GraphModule:
    config = make_config("llama")
    config.num_hidden_layers = layers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
    return fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=make_inputs("llama")).eval()


def _step(gm, inputs) -> tuple[int, list[torch.Tensor]]:
    """(bytes of the distinct tensors saved for backward, adapter gradients) of one loss."""
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = gm(**inputs)["logits"]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), inputs["input_ids"][:, 1:].flatten())
    grads = torch.autograd.grad(loss, [p for p in gm.parameters() if p.requires_grad])
    return sum(saved.values()), list(grads)


@pytest.fixture(scope="module")
def six_layers() -> torch.fx.GraphModule:
    return _llama(6)


def test_checkpointing_keeps_gradients_and_saves_at_most_40_percent(six_layers):
    gm = copy.deepcopy(six_layers)
    inputs = make_inputs("llama", batch=2, seq=16, seed=3)
    plain_bytes, plain_grads = _step(gm, inputs)
    fl.gradient_checkpointing(gm)
    assert all("checkpointed_call" not in module.code for _, module in graph_modules(gm) if module is not gm)
    assert gm.code.count("checkpointed_call(") == 6
    ckpt_bytes, ckpt_grads = _step(gm, inputs)
    assert len(ckpt_grads) == len(plain_grads) == 13
    for ours, reference in zip(ckpt_grads, plain_grads, strict=True):
        assert reference.abs().sum() > 0
        torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-5)
    assert ckpt_bytes <= 0.4 * plain_bytes, (ckpt_bytes, plain_bytes)


def test_checkpointing_off_restores_the_plain_graph_and_survives_copies(six_layers):
    gm = copy.deepcopy(six_layers)
    code = {path: module.code for path, module in graph_modules(gm)}
    nodes = _nodes(gm)
    inputs = make_inputs("llama", seed=4)
    with torch.no_grad():
        expected = gm(**inputs)["logits"]
    fl.gradient_checkpointing(gm, enabled=True)
    assert fl.state.get_state(gm).extra["gradient_checkpointing"] is True
    reference_bytes, _ = _step(gm, inputs)
    copies = [copy.deepcopy(gm)]
    if not hf_fx_available():  # transformers 4's vmap mask code cannot be re-traced on unpickling, split or not
        copies.append(pickle.loads(pickle.dumps(gm)))
    for other in copies:
        assert fl.state.get_state(other).extra["gradient_checkpointing"] is True
        assert other.code.count("checkpointed_call(") == 6
        assert _step(other, inputs)[0] == reference_bytes
    plain = fl.merge_and_unload(gm)  # a plain graph calls its layers as captured
    assert _nodes(plain) == nodes
    fl.gradient_checkpointing(gm, enabled=False)
    assert {path: module.code for path, module in graph_modules(gm)} == code
    assert _nodes(gm) == nodes
    assert fl.state.get_state(gm).extra["gradient_checkpointing"] is False
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs)["logits"], expected, atol=0, rtol=0)


def test_checkpointing_needs_a_tuned_graph():
    plain = fl.unload(captured("llama")[1])
    code = plain.code
    with pytest.raises(fl.LNTuneStateError, match="not produced by lntune_transform"):
        fl.gradient_checkpointing(plain)
    assert plain.code == code


# --------------------------------------------------------------------------------------------------- per-layer FSDP2


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    out = tmp_path_factory.mktemp("fsdp_layers")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    done = subprocess.run([*command, str(WORKER), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def test_per_layer_fsdp_gathers_one_layer_at_a_time_and_trains_like_one_process(fsdp_run):
    report = json.loads((fsdp_run / "fsdp_layers.json").read_text())
    layers = report["layer_bytes"]
    root = report["params_bytes"] - sum(layers)
    assert len(layers) == 2 and report["peak_root_only"] == report["params_bytes"]
    assert report["peak_per_layer"] <= root + max(layers)  # the root's parameters and one layer's
    assert report["peak_per_layer"] < report["peak_root_only"]

    gm = captured("llama")[1].eval()
    initial = {name: value.clone() for name, value in gm.state_dict().items()}
    losses = train(gm, rank=0, world=1, per_rank=2 * PER_RANK_BATCH)
    trained = torch.load(fsdp_run / "fsdp_layers.pt")
    assert trained.keys() == gm.state_dict().keys()
    for name, value in trained.items():
        if ".ln_tuning_layers." in name:
            torch.testing.assert_close(value, gm.state_dict()[name], atol=1e-6, rtol=1e-5, msg=name)
            assert not torch.equal(value, initial[name]), name
        else:
            assert torch.equal(value, initial[name]), f"{name} is frozen but changed"
    assert len(report["losses"]) == len(losses)
