"""export_program(kv_cache=True): a .pt2 decoder with past whose greedy loop is fl.generate, also AOT-compiled."""

from __future__ import annotations

import pytest
import torch
from conftest import captured
from models import make_inputs, perturb_adapter

import fx_lntune as fl

NEW_TOKENS = 5


def greedy_loop(decoder, ids: torch.Tensor, past_shape: tuple[int, int], layers: int, steps: int) -> torch.Tensor:
    """Greedy decoding as a deployment runs the program: the whole prompt with an empty past, then one token per
    call with the present fed back as the past."""
    heads, dim = past_shape
    empty = torch.zeros(ids.shape[0], heads, 0, dim)
    past = tuple((empty, empty) for _ in range(layers))
    sequence, current = ids, ids
    for _ in range(steps):
        start = sequence.shape[1] - current.shape[1]
        inputs = {"input_ids": current, "attention_mask": torch.ones_like(sequence), "past_key_values": past}
        if uses_positions(decoder):
            inputs["position_ids"] = torch.arange(start, sequence.shape[1]).expand(current.shape)
        logits, past = decoder(**inputs)
        assert len(past) == layers and all(len(pair) == 2 for pair in past)
        assert past[0][0].shape == (ids.shape[0], heads, sequence.shape[1], dim)
        current = logits[:, -1].argmax(-1)[:, None]
        sequence = torch.cat([sequence, current], dim=1)
    return sequence


def uses_positions(decoder) -> bool:
    signature = getattr(decoder, "_in_spec", None)
    if signature is not None:
        return "position_ids" in signature.children_specs[1].context
    return True


def _cache_shape(gm) -> tuple[int, int, int]:
    config = gm.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return layers, kv_heads, hidden // heads


def _tuned(arch: str):
    _, gm = captured(arch)
    fl.add_adapter(gm, "other")
    perturb_adapter(gm, "other", seed=2)
    fl.set_adapter(gm, "other")
    return gm


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_program_greedy_loop_equals_generate(arch, tmp_path):
    gm = _tuned(arch)
    path = fl.export_program(gm, tmp_path / "decoder.pt2", make_inputs(arch), kv_cache=True)
    assert fl.active_adapter(gm) == "other" and list(tmp_path.iterdir()) == [path]
    decoder = torch.export.load(path).module()
    layers, heads, dim = _cache_shape(gm)
    for batch, length in ((2, 6), (1, 1)):
        ids = torch.randint(4, 99, (batch, length), generator=torch.Generator().manual_seed(3))
        expected = fl.generate(gm, ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        with torch.no_grad():
            got = greedy_loop(decoder, ids, (heads, dim), layers, NEW_TOKENS)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with fl.disable_adapters(gm):
        base = fl.generate(gm, ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert not torch.equal(expected, base)  # the program carries the adapter, not the base model
