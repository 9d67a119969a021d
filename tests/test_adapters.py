"""The adapter lifecycle (add/set/delete/disable/merge/unmerge/unload), with PEFT and the base graph as references."""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
import transformers
from conftest import captured
from models import make_config, make_inputs, make_labels, make_model

import fx_lntune as fl
from fx_lntune.passes._graphs import graph_modules

PREFIX = "base_model.model."
OTHER_SHAPE = {"batch": 3, "seq": 5, "seed": 1}
ADAPTER_KEYS = ("base_layer", "ln_tuning_layers", "original_module", "modules_to_save")


def _outputs(module, inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = module(**inputs)
    return {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}


def _assert_equal_outputs(ours: dict, reference: dict) -> None:
    assert ours.keys() == reference.keys() and ours
    assert all(torch.equal(value, reference[key]) for key, value in ours.items())


def _trainable(module, prefix: str = "") -> list[str]:
    return sorted(name.removeprefix(prefix) for name, p in module.named_parameters() if p.requires_grad)


def _perturb(root, names, adapter: str, seed: int, prefix: str = "", slot: str = "ln_tuning_layers") -> None:
    """The same seeded noise on ``<name>.<slot>.<adapter>`` for both sides (names in sorted order)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(names):
            for param in root.get_submodule(f"{prefix}{name}.{slot}.{adapter}").parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param.dtype))


def _nodes(gm) -> dict[str, list[tuple]]:
    """Per graph (the root and each layer's), its nodes."""
    return {
        path: [(n.op, n.target, str(n.args), str(n.kwargs)) for n in module.graph.nodes]
        for path, module in graph_modules(gm)
    }


def _snapshot(gm) -> dict:
    return {
        "code": {path: module.code for path, module in graph_modules(gm)},
        "nodes": _nodes(gm),
        "adapters": (fl.list_adapters(gm), fl.active_adapter(gm)),
        "trainable": _trainable(gm),
        "state": {key: value.clone() for key, value in gm.state_dict().items()},
    }


def _assert_unchanged(gm, before: dict) -> None:
    after = _snapshot(gm)
    for key in ("code", "nodes", "adapters", "trainable"):
        assert after[key] == before[key], key
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(value, before["state"][key]) for key, value in after["state"].items())


def _check_against_peft(gm, reference, inputs, *, trainable: bool = True, adapters: bool = True) -> None:
    """Same active adapter, adapters, outputs (1e-5) and, unless merged, the same trainable parameters."""
    assert fl.active_adapter(gm) == reference.active_adapter
    if adapters:
        assert sorted(fl.list_adapters(gm)) == sorted(reference.peft_config)
    ours, theirs = _outputs(gm, inputs), _outputs(reference, inputs)
    assert ours and ours.keys() <= theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=1e-4, msg=key)
    if trainable:
        assert _trainable(gm) == _trainable(reference, PREFIX)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart"])
def test_lifecycle_matches_peft_step_by_step(arch):
    model, gm = captured(arch)
    inputs = make_inputs(arch, **OTHER_SHAPE)
    base = _outputs(gm, inputs)  # a new adapter equals the base norm
    base_state = {key: value.clone() for key, value in gm.state_dict().items() if ".base_layer." in key}
    targets = fl.targeted_module_names(gm)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig())
    reference.add_adapter("other", peft.LNTuningConfig())
    fl.add_adapter(gm, "other")
    _check_against_peft(gm, reference, inputs)
    for seed, name in enumerate(["default", "other"], start=1):
        _perturb(gm, targets, name, seed)
        _perturb(reference, targets, name, seed, prefix=PREFIX)
    _check_against_peft(gm, reference, inputs)
    outputs = {}
    for name in ["other", "default", "other", "default"]:
        fl.set_adapter(gm, name)
        reference.set_adapter(name)
        _check_against_peft(gm, reference, inputs)
        outputs[name] = _outputs(gm, inputs)
    assert not torch.equal(outputs["default"]["logits"], outputs["other"]["logits"])

    with fl.disable_adapters(gm), reference.disable_adapter():
        _check_against_peft(gm, reference, inputs)
        _assert_equal_outputs(_outputs(gm, inputs), base)
        assert _trainable(gm) == []
    _check_against_peft(gm, reference, inputs)

    fl.merge_adapter(gm, "other")  # not the active one: forward then computes "other"
    reference.base_model.merge_adapter(["other"])
    _check_against_peft(gm, reference, inputs, trainable=False)
    _assert_equal_outputs(_outputs(gm, inputs), outputs["other"])
    fl.unmerge_adapter(gm)
    reference.base_model.unmerge_adapter()
    _check_against_peft(gm, reference, inputs)

    with pytest.warns(UserWarning, match="deleted"):
        fl.delete_adapter(gm, "default")  # the active one: sorted(remaining)[0] takes over
        reference.delete_adapter("default")
    assert fl.list_adapters(gm) == ["other"] and fl.active_adapter(gm) == "other"
    _check_against_peft(gm, reference, inputs)

    fl.merge_adapter(gm)
    reference.merge_adapter()
    _check_against_peft(gm, reference, inputs, trainable=False)
    plain, theirs = fl.merge_and_unload(gm), copy.deepcopy(reference).merge_and_unload()
    _check_plain_output(plain, theirs, inputs)
    _assert_equal_outputs(_outputs(plain, inputs), outputs["other"])
    fl.unmerge_adapter(gm)
    reference.base_model.unmerge_adapter()
    _check_against_peft(gm, reference, inputs)
    assert all(torch.equal(gm.state_dict()[key], value) for key, value in base_state.items())

    plain, theirs = fl.merge_and_unload(gm), copy.deepcopy(reference).merge_and_unload()
    _check_plain_output(plain, theirs, inputs)
    unloaded = fl.unload(gm)
    _check_plain_output(unloaded, copy.deepcopy(reference).unload(), inputs)
    _assert_equal_outputs(_outputs(unloaded, inputs), base)


def _check_plain_output(plain, reference, inputs) -> None:
    ours, theirs = _outputs(plain, inputs), _outputs(reference, inputs)
    assert ours and ours.keys() <= theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("merged", [None, "default", "other"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_and_unload_and_unload_give_plain_graphs(arch, merged):
    _, gm = captured(arch)
    fl.add_adapter(gm, "other")
    targets = fl.targeted_module_names(gm)
    _perturb(gm, targets, "default", seed=1)
    _perturb(gm, targets, "other", seed=2)
    inputs = make_inputs(arch, **OTHER_SHAPE)
    fl.set_adapter(gm, "other")
    other = _outputs(gm, inputs)
    with fl.disable_adapters(gm):
        base = _outputs(gm, inputs)
    fl.set_adapter(gm, "default")
    if merged:
        fl.merge_adapter(gm, merged)
    before = _snapshot(gm)
    storage = {t.data_ptr() for t in [*gm.parameters(), *gm.buffers()]}

    results = {"merged": fl.merge_and_unload(gm, "other", progressbar=False), "unloaded": fl.unload(gm)}
    _assert_unchanged(gm, before)
    _assert_equal_outputs(_outputs(results["merged"], inputs), other)
    _assert_equal_outputs(_outputs(results["unloaded"], inputs), base)
    for plain in results.values():
        assert type(plain).__mro__[1:] == (torch.fx.GraphModule, torch.nn.Module, object)
        assert not [m for m in plain.modules() if type(m).__module__.split(".")[0] == "fx_lntune"]
        assert not [key for key in plain.state_dict() if set(key.split(".")) & set(ADAPTER_KEYS)]
        assert "fx_lntune" not in plain.meta
        assert _nodes(plain) == _nodes(gm)
        assert {t.data_ptr() for t in [*plain.parameters(), *plain.buffers()]} <= storage
    assert results["merged"].state_dict().keys() == results["unloaded"].state_dict().keys()


def test_adapter_with_fewer_targets_runs_base_norm_elsewhere():
    """PEFT #3574: there an active adapter missing from a layer raises KeyError; here that layer runs its base."""
    model, gm = captured("llama")
    only_input = peft.LNTuningConfig(target_modules=["input_layernorm"])
    fl.add_adapter(gm, "b", only_input)
    with_b = [name for name in fl.targeted_module_names(gm) if "b" in gm.get_submodule(name).ln_tuning_layers]
    reference = peft.get_peft_model(copy.deepcopy(model), only_input, adapter_name="b")
    assert with_b == reference.targeted_module_names and len(with_b) < len(fl.targeted_module_names(gm))
    _perturb(gm, fl.targeted_module_names(gm), "default", seed=1)
    _perturb(gm, with_b, "b", seed=2)
    _perturb(reference, with_b, "b", seed=2, prefix=PREFIX)
    inputs = make_inputs("llama", **OTHER_SHAPE)
    fl.set_adapter(gm, "b")
    # PEFT cannot hold "default" beside "b" here (its forward raises), so its model has "b" only.
    _check_against_peft(gm, reference, inputs, adapters=False)
    fl.merge_adapter(gm)
    reference.merge_adapter()
    _check_against_peft(gm, reference, inputs, trainable=False, adapters=False)


def test_new_adapter_starts_from_base_weights_while_another_is_merged():
    """PEFT #3423: there a new adapter copies the merged weights; here it copies the base."""
    model, gm = captured("llama")
    inputs = make_inputs("llama", **OTHER_SHAPE)
    base = _outputs(gm, inputs)
    _perturb(gm, fl.targeted_module_names(gm), "default", seed=1)
    fl.merge_adapter(gm)
    fl.add_adapter(gm, "new")
    assert fl.active_adapter(gm) == "default"
    for name in fl.targeted_module_names(gm):
        assert torch.equal(gm.get_submodule(f"{name}.ln_tuning_layers.new").weight, model.get_submodule(name).weight)
    with pytest.warns(UserWarning, match="merged"):
        fl.set_adapter(gm, "new")
    _assert_equal_outputs(_outputs(gm, inputs), base)


@pytest.mark.parametrize("body_raises", [False, True])
def test_disable_on_merged_graph_restores_the_merge(body_raises):
    """PEFT's disable_adapter unmerges and leaves the model unmerged; here the merge returns on exit."""
    _, gm = captured("llama")
    inputs = make_inputs("llama", **OTHER_SHAPE)
    base = _outputs(gm, inputs)
    _perturb(gm, fl.targeted_module_names(gm), "default", seed=1)
    unmerged = _outputs(gm, inputs)
    fl.merge_adapter(gm)
    merged, before = _outputs(gm, inputs), _snapshot(gm)
    with pytest.raises(RuntimeError) if body_raises else torch.no_grad():
        with fl.disable_adapters(gm):
            _assert_equal_outputs(_outputs(gm, inputs), base)
            assert _trainable(gm) == []
            if body_raises:
                raise RuntimeError("user code failed")
    _assert_unchanged(gm, before)
    _assert_equal_outputs(_outputs(gm, inputs), merged)
    assert not torch.equal(merged["logits"], base["logits"])
    with pytest.warns(UserWarning, match="already merged"):
        fl.merge_adapter(gm)
    _assert_unchanged(gm, before)
    fl.unmerge_adapter(gm)
    with pytest.warns(UserWarning, match="nothing to unmerge"):
        fl.unmerge_adapter(gm)
    _assert_equal_outputs(_outputs(gm, inputs), unmerged)


def _merge_other(gm):
    fl.add_adapter(gm, "other")
    fl.merge_adapter(gm, "default")


BAD_INPUT = [
    ("set-unknown", None, lambda gm: fl.set_adapter(gm, "nope"), r"'nope'.*default"),
    ("delete-unknown", None, lambda gm: fl.delete_adapter(gm, "nope"), r"'nope'.*default"),
    ("merge-unknown", None, lambda gm: fl.merge_adapter(gm, "nope"), r"'nope'.*default"),
    ("merge-unload-unknown", None, lambda gm: fl.merge_and_unload(gm, "nope"), r"'nope'.*default"),
    ("add-empty", None, lambda gm: fl.add_adapter(gm, ""), "non-empty"),
    ("add-dot", None, lambda gm: fl.add_adapter(gm, "a.b"), r"'\.'"),
    ("add-slash", None, lambda gm: fl.add_adapter(gm, "a/b"), "'/'"),
    ("add-dotdot", None, lambda gm: fl.add_adapter(gm, ".."), r"'\.\.'"),
    ("add-existing", None, lambda gm: fl.add_adapter(gm, "default"), "already exists"),
    ("delete-merged", _merge_other, lambda gm: fl.delete_adapter(gm, "default"), "unmerge"),
    ("set-unknown-merged", _merge_other, lambda gm: fl.set_adapter(gm, "nope"), r"'nope'.*default, other"),
]


@pytest.mark.parametrize(("setup", "operation", "match"), [row[1:] for row in BAD_INPUT], ids=[r[0] for r in BAD_INPUT])
def test_bad_input_is_refused_and_graph_unchanged(setup, operation, match):
    _, gm = captured("llama")
    if setup:
        setup(gm)
    before = _snapshot(gm)
    with pytest.raises(fl.LNTuneAdapterError, match=match):
        operation(gm)
    _assert_unchanged(gm, before)


def _tied_llama():
    config = make_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize(
    "arch, saved",
    [
        ("bert", "classifier"),
        # With tie_word_embeddings the capture's embedding reads lm_head.weight; once the head is a dispatch module
        # that read must stay the frozen base embedding (PEFT's copy of a tied head is untied from it too).
        ("tied-llama", "lm_head"),
    ],
)
def test_modules_to_save_match_peft(arch, saved):
    model = make_model("bert") if arch == "bert" else _tied_llama()
    family = "bert" if arch == "bert" else "llama"
    config = fl.LNTuningConfig(modules_to_save=[saved])
    gm = fl.lntune_transform(model, config, example_inputs=make_inputs(family))
    # PEFT has no default targets for bert; ours (every norm) are given to it explicitly.
    peft_config = peft.LNTuningConfig(target_modules=fl.targeted_module_names(gm), modules_to_save=[saved])
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config)
    assert set(gm.state_dict()) == {key.removeprefix(PREFIX) for key in reference.state_dict()}
    assert {f"{saved}.original_module.weight", f"{saved}.modules_to_save.default.weight"} <= set(gm.state_dict())
    assert fl.get_nb_trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    inputs = make_inputs(family, **OTHER_SHAPE)
    base = _outputs(gm, inputs)
    for root, prefix in [(gm, ""), (reference, PREFIX)]:
        _perturb(root, fl.targeted_module_names(gm), "default", seed=1, prefix=prefix)
        _perturb(root, [saved], "default", seed=2, prefix=prefix, slot="modules_to_save")
    _check_against_peft(gm, reference, inputs)
    with fl.disable_adapters(gm), reference.disable_adapter():
        _check_against_peft(gm, reference, inputs)
        _assert_equal_outputs(_outputs(gm, inputs), base)
    fl.add_adapter(gm, "other")
    reference.add_adapter("other", copy.deepcopy(peft_config))
    for name in ["other", "default"]:
        fl.set_adapter(gm, name)
        reference.set_adapter(name)
        _check_against_peft(gm, reference, inputs)
    _check_plain_output(fl.merge_and_unload(gm), copy.deepcopy(reference).merge_and_unload(), inputs)
    # PEFT's unload keeps its ModulesToSaveWrapper (the trained head); ours gives the base model back whole.
    _assert_equal_outputs(_outputs(fl.unload(gm), inputs), base)


@functools.cache
def _llama_with_labels():
    model = make_model("llama")
    inputs = make_inputs("llama")
    inputs["labels"] = make_labels("llama", inputs)
    return fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=inputs), inputs


def _split_state(gm) -> tuple[dict, dict]:
    """(adapter copies, everything else), cloned."""
    state = {name: p.detach().clone() for name, p in gm.named_parameters()}
    adapter = {name: value for name, value in state.items() if ".ln_tuning_layers." in name}
    return adapter, {name: value for name, value in state.items() if name not in adapter}


def _assert_only_adapter_trained(gm, adapter: dict, frozen: dict) -> None:
    now = dict(gm.named_parameters())
    assert all(torch.equal(now[name], value) for name, value in frozen.items())
    assert all(not torch.equal(now[name], value) for name, value in adapter.items())


def test_training_loop_trains_only_the_adapter():
    gm, batch = _llama_with_labels()
    gm = copy.deepcopy(gm)
    adapter, frozen = _split_state(gm)
    gm.train()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = gm(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    _assert_only_adapter_trained(gm, adapter, frozen)


class _TinyDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        inputs = make_inputs("llama", batch=1, seed=index)
        inputs["labels"] = make_labels("llama", inputs, seed=index)
        return {key: value[0] for key, value in inputs.items()}


def test_hf_trainer_trains_the_graph(tmp_path):
    gm = copy.deepcopy(_llama_with_labels()[0])
    adapter, frozen = _split_state(gm)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = transformers.Trainer(model=gm, args=args, train_dataset=_TinyDataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 5 and all(0 < loss < 10 for loss in losses)
    _assert_only_adapter_trained(gm, adapter, frozen)


def test_copied_graph_keeps_hf_config_and_default_targets():
    """A deepcopy keeps ``gm.config``, so a new adapter without a config gets the model type's default targets."""
    model, gm = captured("bart")  # a deepcopy of the captured graph
    assert gm.config is not model.config and gm.config.to_dict() == model.config.to_dict()
    fl.add_adapter(gm, "other")
    copies = {name: set(gm.get_submodule(name).ln_tuning_layers) for name in fl.targeted_module_names(gm)}
    assert copies and all(adapters == {"default", "other"} for adapters in copies.values())
