"""export_onnx(kv_cache=True): a decoder with past in optimum's layout; its onnxruntime greedy loop is fl.generate."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import captured
from models import make_inputs, perturb_adapter

import fx_lntune as fl

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

NEW_TOKENS = 5


def _greedy_loop(session, ids: np.ndarray, layers: list[tuple[int, int]], steps: int) -> np.ndarray:
    """Greedy decoding as a deployment would run the file: the whole prompt with an empty past, then one token
    per call with the presents fed back as the past."""
    names = {value.name for value in session.get_inputs()}
    past_names = [f"past_key_values.{i}.{kind}" for i in range(len(layers)) for kind in ("key", "value")]
    batch = ids.shape[0]
    past = {
        name: np.zeros((batch, heads, 0, dim), np.float32)
        for name, (heads, dim) in zip(past_names, [shape for shape in layers for _ in range(2)], strict=True)
    }
    sequence, current = ids, ids
    for _ in range(steps):
        feed = {"input_ids": current, "attention_mask": np.ones_like(sequence), **past}
        if "position_ids" in names:
            start = sequence.shape[1] - current.shape[1]
            feed["position_ids"] = np.broadcast_to(np.arange(start, sequence.shape[1]), current.shape).astype(np.int64)
        logits, *present = session.run(None, feed)
        current = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        past = dict(zip(past_names, present, strict=True))
        sequence = np.concatenate([sequence, current], axis=1)
    return sequence


def test_decoder_with_past_greedy_loop_equals_generate(tmp_path):
    model, gm = captured("llama")
    fl.add_adapter(gm, "other")
    perturb_adapter(gm, "other", seed=2)
    fl.set_adapter(gm, "other")
    gm.train()  # a graph in training: the export runs in evaluation mode and gives the modes back
    modes = [module.training for module in gm.modules()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = fl.export_onnx(gm, tmp_path / "decoder.onnx", make_inputs("llama"), kv_cache=True)
    assert not [str(w.message) for w in caught if "training mode" in str(w.message)]
    assert [module.training for module in gm.modules()] == modes and gm.training
    gm.eval()
    assert fl.active_adapter(gm) == "other" and list(tmp_path.iterdir()) == [path]

    session = ort.InferenceSession(str(path))
    config = gm.config
    layers, heads, dim = config.num_hidden_layers, config.num_key_value_heads, config.hidden_size // 4
    inputs = {value.name: value.shape for value in session.get_inputs()}
    assert list(inputs)[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert inputs["past_key_values.0.key"] == ["batch_size", heads, "past_sequence_length", dim]
    assert list(inputs)[3:] == [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    outputs = [value.name for value in session.get_outputs()]
    assert outputs == ["logits", *(f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value"))]

    ids = torch.randint(4, 99, (2, 6), generator=torch.Generator().manual_seed(3))
    expected = fl.generate(gm, ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    with fl.disable_adapters(gm):
        base = fl.generate(gm, ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert not torch.equal(expected, base)  # the file carries the adapter, not the base model
    got = _greedy_loop(session, ids.numpy(), [(heads, dim)] * layers, NEW_TOKENS)
    np.testing.assert_array_equal(got, expected.numpy())
