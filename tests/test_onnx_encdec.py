"""export_onnx(kv_cache=True) of an encoder-decoder: optimum's three files, whose onnxruntime greedy loop is
fl.generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import captured
from models import make_inputs, perturb_adapter

import fx_lntune as fl

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

NEW_TOKENS = 8
FILES = ["decoder_model.onnx", "decoder_with_past_model.onnx", "encoder_model.onnx"]
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, forced_eos_token_id=None)
# (seed, scale) of the adapter's perturbation under which the tiny model's greedy tokens are not one token repeated.
PERTURBATION = {"t5": (5, 3.0), "bart": (4, 2.0)}


def _greedy_loop(sessions: dict, ids: np.ndarray, mask: np.ndarray, start: int, steps: int):
    """Greedy decoding as a deployment runs optimum's files: the encoder once, ``decoder_model`` for the first token
    (it returns both caches), then ``decoder_with_past_model`` one token per call with the self-attention cache fed
    back and the cross-attention cache kept. Returns the tokens (start token first) and each step's last logits."""
    (hidden,) = sessions["encoder_model"].run(None, {"input_ids": ids, "attention_mask": mask})
    first = sessions["decoder_model"]
    current = np.full((ids.shape[0], 1), start, np.int64)
    feed = {"input_ids": current, "encoder_attention_mask": mask, "encoder_hidden_states": hidden}
    logits, *present = first.run(None, feed)
    cache = dict(zip([value.name for value in first.get_outputs()][1:], present, strict=True))
    later = sessions["decoder_with_past_model"]
    later_names = [value.name for value in later.get_outputs()][1:]
    tokens, step_logits = [current], []
    for step in range(steps):
        step_logits.append(logits[:, -1])
        current = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(current)
        if step == steps - 1:
            break
        past = {name.replace("present.", "past_key_values.", 1): value for name, value in cache.items()}
        logits, *present = later.run(None, {"input_ids": current, "encoder_attention_mask": mask, **past})
        cache.update(zip(later_names, present, strict=True))
    return np.concatenate(tokens, axis=1), np.stack(step_logits, axis=1)


def _cache_names(prefix: str, layers: int, parts: tuple[str, ...] = ("decoder", "encoder")) -> list[str]:
    return [f"{prefix}.{i}.{part}.{kind}" for i in range(layers) for part in parts for kind in ("key", "value")]


@pytest.mark.parametrize(("arch", "existing"), [("t5", False), ("bart", True)])
def test_three_files_greedy_loop_equals_generate(arch, existing, tmp_path):
    _, gm = captured(arch)
    fl.add_adapter(gm, "other")
    perturb_adapter(gm, "other", *PERTURBATION[arch])
    fl.set_adapter(gm, "other")
    gm.train()  # the export runs in evaluation mode and gives the modes back
    modes = [module.training for module in gm.modules()]
    directory = tmp_path / "onnx"
    if existing:  # an existing directory: its other files stay, an old file of the same name is replaced
        directory.mkdir()
        (directory / "config.json").write_text("{}")
        (directory / "encoder_model.onnx").write_bytes(b"stale")
    path = fl.export_onnx(gm, directory, make_inputs(arch), kv_cache=True)
    assert path == directory and list(tmp_path.iterdir()) == [directory]  # no staging directory left
    assert sorted(file.name for file in directory.iterdir()) == sorted(FILES + (["config.json"] if existing else []))
    assert [module.training for module in gm.modules()] == modes
    gm.eval()

    sessions = {name.removesuffix(".onnx"): ort.InferenceSession(str(directory / name)) for name in FILES}
    config = gm.config
    layers = getattr(config, "num_decoder_layers", None) or config.decoder_layers
    heads = getattr(config, "num_heads", None) or config.decoder_attention_heads
    dim = getattr(config, "d_kv", None) or config.d_model // heads
    inputs = {name: {value.name: value.shape for value in session.get_inputs()} for name, session in sessions.items()}
    outputs = {name: [value.name for value in session.get_outputs()] for name, session in sessions.items()}
    assert list(inputs["encoder_model"]) == ["input_ids", "attention_mask"]
    assert outputs["encoder_model"] == ["last_hidden_state"]
    assert list(inputs["decoder_model"]) == ["input_ids", "encoder_attention_mask", "encoder_hidden_states"]
    assert outputs["decoder_model"] == ["logits", *_cache_names("present", layers)]
    past = inputs["decoder_with_past_model"]
    assert list(past) == ["input_ids", "encoder_attention_mask", *_cache_names("past_key_values", layers)]
    assert past["past_key_values.0.decoder.key"] == ["batch_size", heads, "past_decoder_sequence_length", dim]
    assert past["past_key_values.0.encoder.key"] == ["batch_size", heads, "encoder_sequence_length", dim]
    assert outputs["decoder_with_past_model"] == ["logits", *_cache_names("present", layers, ("decoder",))]

    ids = torch.randint(4, 99, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # row 0 padded
    for rows in (slice(0, 2), slice(1, 2)):  # batch 2 with a padded row; batch 1
        expected = fl.generate(gm, ids[rows], attention_mask=mask[rows], **GREEDY)
        tokens, logits = _greedy_loop(
            sessions, ids[rows].numpy(), mask[rows].numpy(), config.decoder_start_token_id, NEW_TOKENS
        )
        np.testing.assert_array_equal(tokens, expected.numpy())
        # Each step's logits are the graph's over the whole sequence: both caches carry what a full forward computes.
        with torch.no_grad():
            full = gm(input_ids=ids[rows], attention_mask=mask[rows], decoder_input_ids=expected[:, :-1])["logits"]
        np.testing.assert_allclose(logits, full.numpy(), atol=1e-4, rtol=0)
    assert len(set(expected[0, 1:].tolist())) > 1  # not one token repeated
    with fl.disable_adapters(gm):
        base = fl.generate(gm, ids[rows], attention_mask=mask[rows], **GREEDY)
    assert not torch.equal(expected, base)  # the files carry the adapter, not the base model


def test_refuses_a_file_path_and_export_program(tmp_path):
    _, gm = captured("t5")
    inputs = make_inputs("t5")
    existing = tmp_path / "model.bin"
    existing.write_bytes(b"keep")
    for path, message in ((existing, "is a file"), (tmp_path / "decoder.onnx", "into a directory")):
        with pytest.raises(fl.LNTuneExportError, match=message):
            fl.export_onnx(gm, path, inputs, kv_cache=True)
    with pytest.raises(fl.LNTuneExportError, match="export_onnx"):
        fl.export_program(gm, tmp_path / "decoder.pt2", inputs, kv_cache=True)
    assert list(tmp_path.iterdir()) == [existing] and existing.read_bytes() == b"keep"


def test_a_failed_export_leaves_the_directory_as_it_was(tmp_path, monkeypatch):
    _, gm = captured("bart")
    written = []

    def fail_on_the_second(step, path, onnx):
        path.write_bytes(b"partial")
        written.append(path.name)
        if len(written) == 2:
            raise RuntimeError("disk full")

    monkeypatch.setattr("fx_lntune.deploy._write_onnx_step", fail_on_the_second)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "encoder_model.onnx").write_bytes(b"old")
    for directory in (tmp_path / "new", existing):
        written.clear()
        with pytest.raises(fl.LNTuneExportError, match="disk full"):
            fl.export_onnx(gm, directory, make_inputs("bart"), kv_cache=True)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["existing"]  # no new or staging directory left
    assert [(path.name, path.read_bytes()) for path in existing.iterdir()] == [("encoder_model.onnx", b"old")]
