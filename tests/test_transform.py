"""lntune_transform on every architecture, with the plain model and PEFT as references."""

from __future__ import annotations

import copy
import inspect

import peft
import pytest
import torch
from conftest import captured
from models import ARCHITECTURES, make_inputs, make_model

import fx_lntune as fl
from fx_lntune.capture import hf_fx_available
from fx_lntune.config import DEFAULT_TARGET_MODULES
from fx_lntune.graph_inputs import attention
from fx_lntune.passes._graphs import graph_modules, leaf_calls

# Where transformers 4.x's tracer captures at all (it fails on the others, see the README's coverage table).
HF_FX_ARCHITECTURES = ["bert", "roberta", "distilbert", "bart"]
OTHER_SHAPE = {"batch": 3, "seq": 5, "seed": 1}


def _tensors(output) -> dict[str, torch.Tensor]:
    return {key: value for key, value in output.items() if isinstance(value, torch.Tensor)}


def _assert_same_outputs(ours, reference, atol: float = 1e-5) -> None:
    ours, reference = _tensors(ours), _tensors(reference)
    assert ours.keys() <= reference.keys() and ours
    for key, value in ours.items():
        torch.testing.assert_close(value, reference[key], atol=atol, rtol=1e-4, msg=key)


def _peft_model(model, targets: list[str]):
    known = model.config.model_type in DEFAULT_TARGET_MODULES
    config = peft.LNTuningConfig(target_modules=None if known else targets)
    return peft.get_peft_model(copy.deepcopy(model), config)


def _perturb(modules: dict[str, torch.nn.Module], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(modules):
            for param in modules[name].parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param.dtype))


def _adapter_copies(root: torch.nn.Module, names: list[str], prefix: str = "") -> dict[str, torch.nn.Module]:
    return {name: root.get_submodule(f"{prefix}{name}.ln_tuning_layers.default") for name in names}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_matches_model_at_other_shapes(arch):
    model, gm = captured(arch)
    inputs = make_inputs(arch, **OTHER_SHAPE)
    with torch.no_grad():
        _assert_same_outputs(gm(**inputs), model(**inputs, **_no_cache(model)))


def _no_cache(model) -> dict:
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_targets_and_trainable_count_equal_peft(arch):
    model, gm = captured(arch)
    targets = fl.targeted_module_names(gm)
    reference = _peft_model(model, targets)
    assert sorted(targets) == sorted(reference.targeted_module_names)
    assert fl.get_nb_trainable_parameters(gm) == reference.get_nb_trainable_parameters()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_perturbed_adapter_gives_peft_outputs_and_gradients(arch):
    model, gm = captured(arch)
    targets = fl.targeted_module_names(gm)
    reference = _peft_model(model, targets)
    _perturb(_adapter_copies(gm, targets), seed=3)
    _perturb(_adapter_copies(reference, targets, prefix="base_model.model."), seed=3)
    inputs = make_inputs(arch, **OTHER_SHAPE)
    ours, theirs = gm(**inputs), reference(**inputs, **_no_cache(model))
    _assert_same_outputs(ours, theirs)
    with torch.no_grad():
        assert not torch.allclose(_first(ours), _first(model(**inputs))), "the perturbation changed nothing"

    _first(ours).float().pow(2).mean().backward()
    _first(theirs).float().pow(2).mean().backward()
    ours_grads = {name: p.grad for name, p in gm.named_parameters() if p.grad is not None}
    theirs_grads = {
        name.removeprefix("base_model.model."): p.grad for name, p in reference.named_parameters() if p.grad is not None
    }
    assert ours_grads and all(".ln_tuning_layers.default." in name for name in ours_grads)
    assert ours_grads.keys() == theirs_grads.keys()
    for name, grad in ours_grads.items():
        torch.testing.assert_close(grad, theirs_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _first(output) -> torch.Tensor:
    return next(iter(_tensors(output).values()))


@pytest.mark.parametrize("arch", ["bert", "gpt2", "t5", "bart", "vit"])
def test_dropout_follows_train_and_eval(arch):
    model, gm = captured(arch)
    dropouts = [path for path in leaf_calls(gm) if isinstance(gm.get_submodule(path), torch.nn.Dropout)]
    assert dropouts, "no dropout module call in the captured graph"
    inputs = make_inputs(arch, **OTHER_SHAPE)
    gm.train()
    with torch.no_grad():
        first, second = _first(gm(**inputs)), _first(gm(**inputs))
    assert not torch.equal(first, second)
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(gm(**inputs)), _first(model(**inputs, **_no_cache(model))))


@pytest.mark.skipif(not hf_fx_available(), reason="transformers.utils.fx exists only in transformers < 5")
@pytest.mark.parametrize("arch", HF_FX_ARCHITECTURES)
def test_hf_fx_front_end_matches_model_and_export(arch):
    model, gm = captured(arch, tracer="hf_fx")
    _, exported = captured(arch)
    inputs = make_inputs(arch)
    with torch.no_grad():
        _assert_same_outputs(gm(**inputs), model(**inputs, **_no_cache(model)))
    assert fl.targeted_module_names(gm) == fl.targeted_module_names(exported) or sorted(
        fl.targeted_module_names(gm)
    ) == sorted(fl.targeted_module_names(exported))
    assert gm.meta["fx_lntune"].tracer == "hf_fx"


def test_albert_shared_layer_is_one_dispatch_called_per_layer():
    model, gm = captured("albert")
    calls = [path for path, nodes in leaf_calls(gm).items() for _ in nodes if path in fl.targeted_module_names(gm)]
    assert len(calls) > len(set(calls)), "the shared layer's norms should be called once per layer"
    inputs = make_inputs("albert", **OTHER_SHAPE)
    with torch.no_grad():
        _assert_same_outputs(gm(**inputs), model(**inputs))


def test_model_is_not_modified_and_frozen_weights_share_storage():
    model = make_model("llama")
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    training = [m.training for m in model.modules()]
    use_cache = model.config.use_cache
    gm = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=make_inputs("llama"))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name][0]) and p.requires_grad == before[name][1], name
    assert [m.training for m in model.modules()] == training and model.config.use_cache == use_cache
    assert gm.get_submodule("lm_head").weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert gm.get_submodule("lm_head").weight is not model.lm_head.weight
    base = gm.get_submodule("model.norm.base_layer").weight
    copy_ = gm.get_submodule("model.norm.ln_tuning_layers.default").weight
    assert base.data_ptr() == model.model.norm.weight.data_ptr() != copy_.data_ptr()


def test_state_dict_keys_keep_model_paths():
    model, gm = captured("gpt2")
    targets = set(fl.targeted_module_names(gm))
    expected = set()
    for key in model.state_dict():
        owner, _, leaf = key.rpartition(".")
        if owner in targets:
            expected |= {f"{owner}.base_layer.{leaf}", f"{owner}.ln_tuning_layers.default.{leaf}"}
        else:
            expected.add(key)
    assert set(gm.state_dict()) == expected


def test_plain_module_with_fx_front_end():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(8)
            self.proj = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.proj(self.norm(x)) + x

    model = Block().eval()
    gm = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs={"x": torch.randn(2, 3, 8)})
    assert gm.meta["fx_lntune"].tracer == "fx" and fl.targeted_module_names(gm) == ["norm"]
    x = torch.randn(5, 7, 8)
    torch.testing.assert_close(gm(x=x), model(x))
    assert fl.get_nb_trainable_parameters(gm) == (16, 8 * 8 + 8 + 16 + 16)


def test_print_trainable_parameters_line(capsys):
    _, gm = captured("llama")
    fl.print_trainable_parameters(gm)
    trainable, total = fl.get_nb_trainable_parameters(gm)
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
    )


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_graph_follows_its_inputs_device_and_dtype(arch):
    model, gm = captured(arch)
    assert all("device(type='cpu')" not in module.code for _, module in graph_modules(gm))
    gm.to("meta")
    out = gm(**{key: value.to("meta") for key, value in make_inputs(arch, **OTHER_SHAPE).items()})
    assert all(value.device.type == "meta" for value in _tensors(out).values())

    # torch.export records the capture's dtypes (a rotary table cast "to the input's dtype" is a constant cast
    # to float32 in a float32 capture), so a bfloat16 graph is captured from the bfloat16 model.
    model = make_model(arch).to(torch.bfloat16)
    inputs = make_inputs(arch, **OTHER_SHAPE)
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    gm = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=make_inputs(arch))
    assert {p.dtype for p in gm.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        ours, reference = _first(gm(**inputs)), _first(model(**inputs, **_no_cache(model)))
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours, reference, atol=5e-2, rtol=5e-2)  # bfloat16 keeps ~3 digits


def test_attention_dropout_keeps_the_fused_kernel_and_follows_train_and_eval():
    model, gm = captured("bert")
    sdpa = [
        n
        for _, module in graph_modules(gm)
        for n in module.graph.nodes
        # `graph_inputs.attention` where `passes.attention` shares the mask: the same kernel, same arguments
        if n.target in (torch.ops.aten.scaled_dot_product_attention.default, attention)
    ]
    rates = [n.args[4] if len(n.args) > 4 else n.kwargs["dropout_p"] for n in sdpa]
    assert sdpa and all(isinstance(rate, torch.fx.Node) for rate in rates)  # read from the module, not baked in
    for name, module in gm.named_modules():
        if isinstance(module, torch.nn.Dropout) and not name.endswith("fx_attention_dropout"):
            module.p = 0.0  # only attention dropout is left to make two training calls differ
    inputs = make_inputs("bert", **OTHER_SHAPE)
    gm.train()
    with torch.no_grad():
        assert not torch.equal(_first(gm(**inputs)), _first(gm(**inputs)))
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(gm(**inputs)), _first(model(**inputs)))
