"""export_program(kv_cache=True): a .pt2 decoder with past whose greedy loop is fl.generate, also AOT-compiled."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import captured
from models import make_inputs, make_model, perturb_adapter

import fx_lntune as fl

NEW_TOKENS = 5
# (batch, prompt length): a batch, and the least prompt (one token, whose mask is as short as a mask gets).
PROMPTS = ((2, 6), (1, 1))


def greedy_loop(decoder, ids: torch.Tensor, past_shape: tuple[int, int, int], positions: bool) -> torch.Tensor:
    """Greedy decoding as a deployment runs the program: the whole prompt with an empty past, then one token per
    call with the present fed back as the past."""
    layers, heads, dim = past_shape
    empty = torch.zeros(ids.shape[0], heads, 0, dim)
    past = tuple((empty, empty) for _ in range(layers))
    sequence, current = ids, ids
    for _ in range(NEW_TOKENS):
        inputs = {"input_ids": current, "attention_mask": torch.ones_like(sequence), "past_key_values": past}
        if positions:
            start = sequence.shape[1] - current.shape[1]
            inputs["position_ids"] = torch.arange(start, sequence.shape[1]).expand(current.shape)
        with torch.no_grad():
            logits, past = decoder(**inputs)
        assert len(past) == layers and all(len(pair) == 2 for pair in past)
        assert past[0][0].shape == (ids.shape[0], heads, sequence.shape[1], dim)
        current = logits[:, -1].argmax(-1)[:, None]
        sequence = torch.cat([sequence, current], dim=1)
    return sequence


def _past_shape(gm) -> tuple[int, int, int]:
    config = gm.config
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return config.num_hidden_layers, kv_heads, hidden // heads


def _with_other_adapter(gm):
    fl.add_adapter(gm, "other")
    perturb_adapter(gm, "other", seed=2)
    fl.set_adapter(gm, "other")
    return gm


def _check_loops(decoder, gm, positions: bool) -> None:
    for batch, length in PROMPTS:
        ids = torch.randint(4, 99, (batch, length), generator=torch.Generator().manual_seed(3))
        expected = fl.generate(gm, ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
        got = greedy_loop(decoder, ids, _past_shape(gm), positions)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"batch {batch}, prompt length {length}")
    with fl.disable_adapters(gm):
        base = fl.generate(gm, ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None)
    assert not torch.equal(expected, base)  # the program carries the adapter, not the base model


def _takes_positions(program: torch.export.ExportedProgram) -> bool:
    return any(node.op == "placeholder" and node.name == "position_ids" for node in program.graph.nodes)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_program_greedy_loop_equals_generate(arch, tmp_path):
    gm = _with_other_adapter(captured(arch)[1])
    path = fl.export_program(gm, tmp_path / "decoder.pt2", make_inputs(arch), kv_cache=True)
    assert fl.active_adapter(gm) == "other" and list(tmp_path.iterdir()) == [path]
    program = torch.export.load(path)
    assert _takes_positions(program)  # all three models take position_ids
    _check_loops(program.module(), gm, positions=True)


def test_program_decoder_needs_the_tuned_graph(tmp_path):
    plain = fl.merge_and_unload(captured("gpt2")[1])
    with pytest.raises(fl.LNTuneExportError, match="needs the tuned graph"):
        fl.export_program(plain, tmp_path / "decoder.pt2", make_inputs("gpt2"), kv_cache=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="needs a C++ compiler")
def test_aoti_package_greedy_loop_equals_generate(tmp_path):
    """One AOTInductor build (minutes of g++ on a busy machine): a one-layer llama, the wrapper built at -O0."""
    from torch._inductor import aoti_compile_and_package, aoti_load_package

    model = make_model("llama", depth=1)
    gm = _with_other_adapter(fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=make_inputs("llama")))
    program = torch.export.load(fl.export_program(gm, tmp_path / "decoder.pt2", make_inputs("llama"), kv_cache=True))
    package = aoti_compile_and_package(
        program,
        package_path=str(tmp_path / "decoder_aoti.pt2"),
        inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"},
    )
    _check_loops(aoti_load_package(package), gm, positions=_takes_positions(program))
