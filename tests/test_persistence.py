"""Adapter files (save_adapter / load_adapter) and apply_to_model, with PEFT's files and models as the reference."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import struct
import tempfile
from pathlib import Path

import peft
import pytest
import safetensors
import safetensors.torch
import torch
from conftest import captured
from models import make_inputs, make_model
from test_adapters import PREFIX, _assert_unchanged, _outputs, _perturb, _snapshot

import fx_lntune as fl
from fx_lntune.persistence import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, load_adapter_weights
from fx_lntune.state import get_state

ARCHS = ["llama", "gpt2", "bart", "t5"]
FILES = sorted([CARD_NAME, CONFIG_NAME, WEIGHTS_NAME])  # the model card too, as PEFT writes it
OTHER_SHAPE = {"batch": 3, "seq": 5, "seed": 1}
# PEFT writes its version and always inference_mode=true (it ignores both on load); we write our tag and the
# config's own inference_mode so that the config round-trips.
NOT_COMPARED = {"peft_version", "inference_mode"}


def _assert_close(ours: dict, theirs: dict) -> None:
    assert ours and ours.keys() <= theirs.keys()
    for key, value in ours.items():
        torch.testing.assert_close(value, theirs[key], atol=1e-5, rtol=1e-4, msg=key)


def _read(directory: Path) -> tuple[dict, dict, dict]:
    """(config JSON, tensors, safetensors metadata) of an adapter directory."""
    with safetensors.safe_open(str(directory / WEIGHTS_NAME), framework="pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        metadata = file.metadata()
    return json.loads((directory / CONFIG_NAME).read_text()), tensors, metadata


def _perturbed(arch: str, seed: int = 1):
    model, gm = captured(arch)
    _perturb(gm, fl.targeted_module_names(gm), "default", seed=seed)
    return model, gm


def _peft_model(model, seed: int, targets: list[str], **config):
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(**config))
    _perturb(reference, targets, "default", seed=seed, prefix=PREFIX)
    return reference


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_adapter_loads_in_peft(arch, tmp_path):
    model, gm = _perturbed(arch)
    fl.save_adapter(gm, tmp_path)
    assert sorted(os.listdir(tmp_path)) == FILES
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    inputs = make_inputs(arch, **OTHER_SHAPE)
    _assert_close(_outputs(gm, inputs), _outputs(reference, inputs))
    with fl.disable_adapters(gm):
        assert not torch.equal(_outputs(gm, inputs)["logits"], _outputs(reference, inputs)["logits"])
    assert reference.peft_config["default"].peft_type == peft.PeftType.LN_TUNING


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_adapter_loads_here(arch, tmp_path):
    model, gm = captured(arch)
    reference = _peft_model(model, seed=2, targets=fl.targeted_module_names(gm))
    reference.save_pretrained(tmp_path)
    before = _outputs(gm, make_inputs(arch, **OTHER_SHAPE))
    fl.load_adapter(gm, tmp_path, "peft")
    assert fl.list_adapters(gm) == ["default", "peft"] and fl.active_adapter(gm) == "default"
    inputs = make_inputs(arch, **OTHER_SHAPE)
    _assert_close(_outputs(gm, inputs), before)  # loading does not switch adapters
    fl.set_adapter(gm, "peft")
    _assert_close(_outputs(gm, inputs), _outputs(reference, inputs))
    loaded = get_state(gm).configs["peft"]
    assert loaded == fl.LNTuningConfig.from_dict(json.loads((tmp_path / CONFIG_NAME).read_text()))
    assert set(loaded.target_modules) == reference.peft_config["default"].target_modules


@pytest.mark.parametrize(("is_trainable", "trains"), [(None, False), (True, True), (False, False)])
def test_is_trainable_overrides_the_files_inference_mode(is_trainable, trains, tmp_path):
    """PEFT writes inference_mode=true; as in PEFT's load_adapter, is_trainable=True loads it to train further."""
    model, gm = captured("llama")
    _peft_model(model, seed=2, targets=fl.targeted_module_names(gm)).save_pretrained(tmp_path)
    fl.load_adapter(gm, tmp_path, "peft", is_trainable=is_trainable)
    fl.set_adapter(gm, "peft")
    trainable = {name for name, p in gm.named_parameters() if p.requires_grad}
    assert get_state(gm).configs["peft"].inference_mode is not trains
    assert bool(trainable) is trains and all(".ln_tuning_layers.peft." in name for name in trainable)


@pytest.mark.parametrize("arch", ARCHS)
def test_files_equal_peft_files(arch, tmp_path):
    model, gm = _perturbed(arch, seed=3)
    reference = _peft_model(model, seed=3, targets=fl.targeted_module_names(gm))
    fl.save_adapter(gm, tmp_path / "ours")
    reference.save_pretrained(tmp_path / "peft")
    ours, theirs = _read(tmp_path / "ours"), _read(tmp_path / "peft")
    assert ours[1].keys() == theirs[1].keys() and ours[1]
    assert all(
        torch.equal(value, theirs[1][key]) and value.dtype == theirs[1][key].dtype for key, value in ours[1].items()
    )
    assert ours[2] == theirs[2] == {"format": "pt"}
    assert (tmp_path / "ours" / WEIGHTS_NAME).read_bytes() == (tmp_path / "peft" / WEIGHTS_NAME).read_bytes()
    config, peft_config = ours[0], theirs[0]
    assert config.keys() == peft_config.keys()
    assert set(config.pop("target_modules")) == set(peft_config.pop("target_modules"))
    assert {k: v for k, v in config.items() if k not in NOT_COMPARED} == {
        k: v for k, v in peft_config.items() if k not in NOT_COMPARED
    }


@functools.cache
def _bert_with_classifier():
    model = make_model("bert")
    config = fl.LNTuningConfig(modules_to_save=["classifier"])
    return model, fl.lntune_transform(model, config, example_inputs=make_inputs("bert"))


def test_modules_to_save_round_trip_both_ways(tmp_path):
    model, gm = copy.deepcopy(_bert_with_classifier())
    targets = fl.targeted_module_names(gm)
    _perturb(gm, targets, "default", seed=1)
    _perturb(gm, ["classifier"], "default", seed=2, slot="modules_to_save")
    inputs = make_inputs("bert", **OTHER_SHAPE)

    fl.save_adapter(gm, tmp_path / "ours")
    tensors = _read(tmp_path / "ours")[1]
    assert {f"{PREFIX}classifier.weight", f"{PREFIX}classifier.bias"} <= tensors.keys()
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours")
    _assert_close(_outputs(gm, inputs), _outputs(reference, inputs))

    # PEFT has no default targets for bert: it gets ours explicitly.
    theirs = _peft_model(model, seed=3, targets=targets, target_modules=targets, modules_to_save=["classifier"])
    _perturb(theirs, ["classifier"], "default", seed=4, prefix=PREFIX, slot="modules_to_save")
    theirs.save_pretrained(tmp_path / "peft")
    fl.load_adapter(gm, tmp_path / "peft", "peft")
    fl.set_adapter(gm, "peft")
    _assert_close(_outputs(gm, inputs), _outputs(theirs, inputs))
    assert not torch.equal(_outputs(gm, inputs)["logits"], _outputs(reference, inputs)["logits"])
    fl.save_adapter(gm, tmp_path / "again", "peft")
    again, peft_file = _read(tmp_path / "again"), _read(tmp_path / "peft")
    assert again[1].keys() == peft_file[1].keys()
    assert all(torch.equal(value, peft_file[1][key]) for key, value in again[1].items())
    assert again[0]["modules_to_save"] == peft_file[0]["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize(
    "config",
    [
        fl.LNTuningConfig(target_modules=["input_layernorm", "norm"], exclude_modules=["layers.0.input_layernorm"]),
        fl.LNTuningConfig(target_modules=r".*\.1\..*layernorm", task_type="CAUSAL_LM", inference_mode=True),
    ],
    ids=["list", "regex"],
)
def test_config_round_trips_through_saved_json(config, tmp_path):
    model, gm = captured("llama")
    fl.add_adapter(gm, "custom", config)
    fl.save_adapter(gm, tmp_path, "custom")
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert fl.LNTuningConfig.from_dict(saved) == config
    assert fl.LNTuningConfig.from_dict(config.to_dict()) == config
    fl.load_adapter(gm, tmp_path, "again")
    assert get_state(gm).configs["again"] == config
    assert [n for n in fl.targeted_module_names(gm) if "again" in gm.get_submodule(n).ln_tuning_layers] == [
        n for n in fl.targeted_module_names(gm) if "custom" in gm.get_submodule(n).ln_tuning_layers
    ]
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert reference.peft_config["default"].task_type == config.task_type
    assert reference.targeted_module_names == [
        n for n in fl.targeted_module_names(gm) if "custom" in gm.get_submodule(n).ln_tuning_layers
    ]


def test_default_targets_are_written_resolved(tmp_path):
    _, gm = captured("llama")
    fl.save_adapter(gm, tmp_path)
    saved = fl.LNTuningConfig.from_dict(json.loads((tmp_path / CONFIG_NAME).read_text()))
    assert saved == fl.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm"])


def test_merged_adapter_saves_its_own_weights(tmp_path):
    model, gm = _perturbed("llama")
    fl.save_adapter(gm, tmp_path / "unmerged")
    fl.merge_adapter(gm)
    fl.save_adapter(gm, tmp_path / "merged")
    assert (tmp_path / "merged" / WEIGHTS_NAME).read_bytes() == (tmp_path / "unmerged" / WEIGHTS_NAME).read_bytes()
    base = {f"{PREFIX}{key}": value for key, value in model.state_dict().items()}
    for key, value in _read(tmp_path / "merged")[1].items():
        assert not torch.equal(value, base[key.replace(".ln_tuning_layers", "")])


def test_dtype_follows_the_graph(tmp_path):
    _, gm = _perturbed("llama")
    fl.save_adapter(gm, tmp_path / "fp32")
    half = copy.deepcopy(gm).to(torch.bfloat16)
    fl.load_adapter(half, tmp_path / "fp32", "loaded")
    tensors = _read(tmp_path / "fp32")[1]
    assert all(value.dtype == torch.float32 for value in tensors.values())
    for name in fl.targeted_module_names(half):
        weight = half.get_submodule(f"{name}.ln_tuning_layers.loaded").weight
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, tensors[f"{PREFIX}{name}.ln_tuning_layers.weight"].to(torch.bfloat16))
    fl.save_adapter(half, tmp_path / "bf16", "loaded")
    assert all(value.dtype == torch.bfloat16 for value in _read(tmp_path / "bf16")[1].values())


def test_save_twice_leaves_the_three_files(tmp_path):
    _, gm = _perturbed("llama")
    fl.save_adapter(gm, tmp_path)
    _perturb(gm, fl.targeted_module_names(gm), "default", seed=5)
    fl.save_adapter(gm, tmp_path)
    assert sorted(os.listdir(tmp_path)) == FILES
    tensors = _read(tmp_path)[1]
    for name in fl.targeted_module_names(gm):
        current = gm.get_submodule(f"{name}.ln_tuning_layers.default").weight
        assert torch.equal(tensors[f"{PREFIX}{name}.ln_tuning_layers.weight"], current)


def _fail_writing_weights(monkeypatch):
    def partial_write(tensors, path, metadata=None):
        Path(path).write_bytes(b"\x00" * 16)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", partial_write)


def _fail_renaming_config(monkeypatch):
    rename = os.replace

    def replace(source, target):
        if Path(target).name == CONFIG_NAME:
            raise OSError("No space left on device")
        return rename(source, target)

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("fail", [_fail_writing_weights, _fail_renaming_config], ids=["write", "second-rename"])
@pytest.mark.parametrize("existing", [True, False], ids=["over-previous", "fresh"])
def test_failed_save_keeps_previous_files(fail, existing, tmp_path, monkeypatch):
    _, gm = _perturbed("llama")
    if existing:
        fl.save_adapter(gm, tmp_path)
    previous = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    _perturb(gm, fl.targeted_module_names(gm), "default", seed=5)
    fail(monkeypatch)
    with pytest.raises(OSError, match="No space"):
        fl.save_adapter(gm, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == previous
    assert sorted(previous) == (FILES if existing else [])


@functools.cache
def _adapter_files(arch: str) -> dict[str, bytes]:
    _, gm = _perturbed(arch)
    with tempfile.TemporaryDirectory() as directory:
        fl.save_adapter(gm, directory)
        return {name: (Path(directory) / name).read_bytes() for name in FILES}


def _saved(tmp_path: Path, arch: str = "llama") -> Path:
    """A directory holding ``arch``'s perturbed default adapter, as save_adapter wrote it."""
    directory = tmp_path / arch
    directory.mkdir()
    for name, data in _adapter_files(arch).items():
        (directory / name).write_bytes(data)
    return directory


def _rewrite(directory: Path, change) -> None:
    """Rewrite the safetensors header (a dict) with ``change``, keeping the data bytes as they are."""
    raw = (directory / WEIGHTS_NAME).read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + size])
    change(header)
    encoded = json.dumps(header).encode()
    (directory / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + size :])


def _retensor(directory: Path, change, metadata=None) -> None:
    tensors = _read(directory)[1]
    change(tensors)
    safetensors.torch.save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata or {"format": "pt"})


def _reconfig(directory: Path, change) -> None:
    data = json.loads((directory / CONFIG_NAME).read_text())
    change(data)
    (directory / CONFIG_NAME).write_text(json.dumps(data))


NORM_KEY = f"{PREFIX}model.layers.0.input_layernorm.ln_tuning_layers.weight"


def _case_missing_dir(tmp_path):
    return tmp_path / "nowhere"


def _case_missing_config(tmp_path):
    directory = _saved(tmp_path)
    (directory / CONFIG_NAME).unlink()
    return directory


def _case_missing_weights(tmp_path):
    directory = _saved(tmp_path)
    (directory / WEIGHTS_NAME).unlink()
    return directory


def _case_pickle_only(tmp_path):
    directory = _case_missing_weights(tmp_path)
    (directory / "adapter_model.bin").write_bytes(b"not loaded")
    return directory


def _case_truncated(tmp_path):
    directory = _saved(tmp_path)
    raw = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(raw[: len(raw) - 7])
    return directory


def _case_lying_shape(tmp_path):
    directory = _saved(tmp_path)
    _rewrite(directory, lambda header: header[NORM_KEY].update(shape=[64]))
    return directory


def _case_lying_offsets(tmp_path):
    directory = _saved(tmp_path)
    _rewrite(directory, lambda header: header[NORM_KEY].update(data_offsets=[0, 1 << 20]))
    return directory


def _case_lying_header_size(tmp_path):
    directory = _saved(tmp_path)
    raw = (directory / WEIGHTS_NAME).read_bytes()
    (directory / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    return directory


def _case_wrong_shape(tmp_path):
    directory = _saved(tmp_path)
    _retensor(directory, lambda tensors: tensors.update({NORM_KEY: torch.ones(16)}))
    return directory


def _case_int_dtype(tmp_path):
    directory = _saved(tmp_path)
    _retensor(directory, lambda tensors: tensors.update({NORM_KEY: torch.ones(32, dtype=torch.int32)}))
    return directory


def _case_unknown_key(tmp_path):
    directory = _saved(tmp_path)
    extra = NORM_KEY.replace("layers.0", "layers.7")
    _retensor(directory, lambda tensors: tensors.update({extra: torch.ones(32)}))
    return directory


def _case_missing_key(tmp_path):
    directory = _saved(tmp_path)
    _retensor(directory, lambda tensors: tensors.pop(NORM_KEY))
    return directory


def _case_tf_format(tmp_path):
    directory = _saved(tmp_path)
    _retensor(directory, lambda tensors: None, metadata={"format": "tf"})
    return directory


def _case_corrupt_config(tmp_path):
    directory = _saved(tmp_path)
    text = (directory / CONFIG_NAME).read_text()
    (directory / CONFIG_NAME).write_text(text[: len(text) // 2])
    return directory


def _case_no_peft_type(tmp_path):
    directory = _saved(tmp_path)
    _reconfig(directory, lambda data: data.pop("peft_type"))
    return directory


def _case_other_peft_type(tmp_path):
    directory = _saved(tmp_path)
    _reconfig(directory, lambda data: data.update(peft_type="LORA"))
    return directory


def _case_other_architecture(tmp_path):
    return _saved(tmp_path, "gpt2")


def _case_config_not_matching_weights(tmp_path):
    directory = _saved(tmp_path)
    _reconfig(directory, lambda data: data.update(target_modules=["input_layernorm"]))
    return directory


def _case_target_not_in_graph(tmp_path):
    directory = _saved(tmp_path)
    _reconfig(directory, lambda data: data.update(modules_to_save=["lm_head"]))
    return directory


STATE_ERRORS = [
    ("missing-dir", _case_missing_dir, r"nowhere does not exist"),
    ("missing-config", _case_missing_config, r"adapter_config\.json is missing"),
    ("missing-weights", _case_missing_weights, r"adapter_model\.safetensors is missing"),
    ("pickle-only", _case_pickle_only, r"adapter_model\.bin is there.*never unpickles"),
    ("truncated", _case_truncated, r"adapter_model\.safetensors is not a valid safetensors file"),
    ("lying-shape", _case_lying_shape, r"adapter_model\.safetensors is not a valid safetensors file"),
    ("lying-offsets", _case_lying_offsets, r"adapter_model\.safetensors is not a valid safetensors file"),
    ("lying-header-size", _case_lying_header_size, r"adapter_model\.safetensors is not a valid safetensors file"),
    ("wrong-shape", _case_wrong_shape, r"safetensors: tensor '.*layers\.0\.input_layernorm.*' has shape \(16,\)"),
    ("int-dtype", _case_int_dtype, r"safetensors: tensor '.*layers\.0\.input_layernorm.*' is torch\.int32"),
    ("unknown-key", _case_unknown_key, r"safetensors holds 1 tensor.*layers\.7\.input_layernorm"),
    ("missing-key", _case_missing_key, r"safetensors lacks 1 tensor.*layers\.0\.input_layernorm"),
    ("tf-format", _case_tf_format, r"safetensors says format 'tf'"),
    ("corrupt-config", _case_corrupt_config, r"adapter_config\.json is not readable JSON"),
    ("no-peft-type", _case_no_peft_type, r"adapter_config\.json is not a PEFT adapter config.*peft_type"),
    ("other-peft-type", _case_other_peft_type, r"adapter_config\.json: .*'LORA'"),
    ("other-architecture", _case_other_architecture, r"adapter_config\.json does not fit this graph.*ln_1"),
    ("config-weights-mismatch", _case_config_not_matching_weights, r"holds 3 tensor.*post_attention_layernorm"),
    ("target-not-in-graph", _case_target_not_in_graph, r"adapter_config\.json does not fit.*'lm_head'.*graph leaves"),
]


@pytest.mark.parametrize(("make_dir", "match"), [r[1:] for r in STATE_ERRORS], ids=[r[0] for r in STATE_ERRORS])
def test_bad_adapter_files_are_refused_and_graph_unchanged(make_dir, match, tmp_path):
    directory = make_dir(tmp_path)
    _, gm = captured("llama")
    inputs = make_inputs("llama", **OTHER_SHAPE)
    before, outputs = _snapshot(gm), _outputs(gm, inputs)
    files = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    with pytest.raises(fl.LNTuneStateError, match=match):
        fl.load_adapter(gm, directory, "loaded")
    _assert_unchanged(gm, before)
    assert all(torch.equal(value, outputs[key]) for key, value in _outputs(gm, inputs).items())
    assert {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == files


@pytest.mark.parametrize(("name", "match"), [("default", "already exists"), ("a.b", r"'\.'"), ("", "non-empty")])
def test_bad_adapter_names_are_refused(name, match, tmp_path):
    directory = _saved(tmp_path)
    _, gm = captured("llama")
    before = _snapshot(gm)
    with pytest.raises(fl.LNTuneAdapterError, match=match):
        fl.load_adapter(gm, directory, name)
    _assert_unchanged(gm, before)


def test_save_refuses_unknown_adapter_and_file_path(tmp_path):
    _, gm = captured("llama")
    with pytest.raises(fl.LNTuneAdapterError, match="'nope'"):
        fl.save_adapter(gm, tmp_path, "nope")
    (tmp_path / "file").write_text("keep")
    with pytest.raises(fl.LNTuneStateError, match="is a file"):
        fl.save_adapter(gm, tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "keep"


def _shared_capture(arch: str):
    """A model and the graph captured from it, which share the base weights' storage (a deepcopy would not)."""
    if arch == "bert":
        return copy.deepcopy(_bert_with_classifier())
    model = make_model(arch)
    gm = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=make_inputs(arch))
    assert {t.untyped_storage().data_ptr() for t in gm.state_dict().values()} & {
        t.untyped_storage().data_ptr() for t in model.state_dict().values()
    }
    return model, gm


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_apply_to_model_gives_an_ordinary_checkpoint(arch, tmp_path):
    model, gm = _shared_capture(arch)
    _perturb(gm, fl.targeted_module_names(gm), "default", seed=1)
    if arch == "bert":
        _perturb(gm, ["classifier"], "default", seed=2, slot="modules_to_save")
    inputs = make_inputs(arch, **OTHER_SHAPE)
    tuned = _outputs(gm, inputs)
    with fl.disable_adapters(gm):
        base = _outputs(gm, inputs)
    before = _snapshot(gm)
    fl.merge_adapter(gm)  # a merged adapter gives its own weights too
    fl.apply_to_model(gm, model)
    fl.unmerge_adapter(gm)
    _assert_unchanged(gm, before)  # the graph shared its base weights with the model, and keeps them
    with fl.disable_adapters(gm):
        _assert_close(_outputs(gm, inputs), base)
    _assert_close(_outputs(model, inputs), tuned)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    _assert_close(_outputs(reloaded, inputs), tuned)


def _other_sizes(model) -> None:
    model.model.norm.weight = torch.nn.Parameter(torch.ones(16))


@pytest.mark.parametrize(
    ("make_model_", "match"),
    [
        (lambda model: make_model("gpt2"), r"GPT2LMHeadModel has no module 'model\.layers\.0\.input_layernorm'"),
        (lambda model: _other_sizes(model) or model, r"model\.norm\.weight has shape \(16,\) in the model"),
        (lambda model: model.model, r"LlamaModel has no module 'model\.layers"),
    ],
    ids=["other-architecture", "other-sizes", "inner-model"],
)
def test_apply_to_incompatible_model_writes_nothing(make_model_, match):
    model, gm = _perturbed("llama")
    target = make_model_(model)
    state = {key: value.clone() for key, value in target.state_dict().items()}
    before = _snapshot(gm)
    with pytest.raises(fl.LNTuneStateError, match=match):
        fl.apply_to_model(gm, target)
    assert target.state_dict().keys() == state.keys()
    assert all(torch.equal(value, state[key]) for key, value in target.state_dict().items())
    _assert_unchanged(gm, before)


def test_module_both_tuned_and_saved_is_refused_before_anything_changes(tmp_path):
    """The classifier is a modules_to_save module of "default"; a config tuning it as a norm would first wrap the
    LayerNorms and then fail: the check runs before any module is injected."""
    _, gm = copy.deepcopy(_bert_with_classifier())
    targets = [*fl.targeted_module_names(gm), "classifier"]
    config = fl.LNTuningConfig(target_modules=targets)
    fl.save_adapter(gm, tmp_path)
    _reconfig(tmp_path, lambda data: data.update(target_modules=targets, modules_to_save=None))
    before = _snapshot(gm)
    with pytest.raises(fl.LNTuneConfigError, match="'classifier' is a ModulesToSaveDispatch"):
        fl.add_adapter(gm, "both", config)
    _assert_unchanged(gm, before)
    with pytest.raises(fl.LNTuneStateError, match=r"adapter_config\.json does not fit.*'classifier'"):
        fl.load_adapter(gm, tmp_path, "both")
    _assert_unchanged(gm, before)


def test_load_adapter_weights_overwrites_the_adapter_in_place(tmp_path):
    directory = _saved(tmp_path)  # the perturbed default adapter of a llama
    _, saved = _perturbed("llama")
    _, gm = captured("llama")
    params = {name: param for name, param in gm.named_parameters() if param.requires_grad}
    load_adapter_weights(gm, directory)
    assert all(param is dict(gm.named_parameters())[name] for name, param in params.items())
    assert fl.list_adapters(gm) == ["default"] and all(param.requires_grad for param in params.values())
    expected = saved.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in gm.state_dict().items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda tensors: tensors.pop(sorted(tensors)[0]), "lacks 1 tensor"),
        (lambda tensors: tensors.update(extra=torch.zeros(1)), "no place for"),
        (lambda tensors: tensors.update({sorted(tensors)[0]: torch.zeros(3)}), "has shape (3,)"),
    ],
    ids=["missing", "unknown", "shape"],
)
def test_load_adapter_weights_refuses_another_adapter_and_changes_nothing(change, message, tmp_path):
    directory = _saved(tmp_path)
    _retensor(directory, change)
    _, gm = captured("llama")
    before = _snapshot(gm)
    with pytest.raises(fl.LNTuneStateError, match=re.escape(message)):
        load_adapter_weights(gm, directory)
    _assert_unchanged(gm, before)
    with pytest.raises(fl.LNTuneAdapterError):
        load_adapter_weights(gm, directory, "other")
