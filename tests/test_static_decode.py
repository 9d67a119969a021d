"""fl.generate(cache_implementation="static"): preallocated KV buffers and a torch.compile'd decode step give the
default cache's tokens, and adapter switches, merges and disabling need no new compile.

Most tests run the static step uncompiled (``disable_compile=True``, the same graph) or compiled with the
``aot_eager`` backend (dynamo's capture and guards without code generation); one compiles with Inductor on a
one-layer llama, since Inductor's C++ code generation takes tens of seconds on the 2-core CI machine.
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import transformers
from conftest import captured
from models import make_model, perturb_adapter
from torch._dynamo.utils import counters

import fx_lntune as fl
from fx_lntune import static_decode

NEW_TOKENS = 6
UNCOMPILED = {"cache_implementation": "static", "disable_compile": True}

needs_transformers_5 = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x builds llama's attention mask with vmap, which dynamo cannot trace (see test_compile)",
)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@functools.cache
def _tuned(arch: str) -> torch.fx.GraphModule:
    _, gm = captured(arch)
    fl.add_adapter(gm, "other")
    perturb_adapter(gm, "default", seed=1)
    perturb_adapter(gm, "other", seed=2)
    return gm.eval()


def tuned(arch: str) -> torch.fx.GraphModule:
    gm = _tuned(arch)
    fl.set_adapter(gm, "default")
    return gm


def _prompt(batch: int = 2, length: int = 6, seed: int = 3) -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 99, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask}


GREEDY = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0}
SAMPLED = {**GREEDY, "do_sample": True, "top_k": 20, "temperature": 0.8}


def _states(gm: torch.fx.GraphModule):
    """The adapter states generation must follow: (name, context manager), in an order that goes back and forth."""
    yield "default", contextlib.nullcontext()
    fl.set_adapter(gm, "other")
    yield "other", contextlib.nullcontext()
    yield "disabled", fl.disable_adapters(gm)
    fl.merge_adapter(gm, "other")
    try:
        yield "other merged", contextlib.nullcontext()
    finally:
        fl.unmerge_adapter(gm)
    fl.set_adapter(gm, "default")
    yield "default again", contextlib.nullcontext()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_cache_gives_the_default_caches_tokens(arch):
    """Greedy for every adapter state (llama; gpt2: the first two), seeded sampling for one, on a left-padded batch
    (step uncompiled)."""
    gm = tuned(arch)
    prompt = _prompt()
    outputs = {}
    for state, context in _states(gm):
        if arch != "llama" and state not in ("default", "other"):
            continue
        with context:
            default = fl.generate(gm, **prompt, **GREEDY)
            assert torch.equal(fl.generate(gm, **prompt, **GREEDY, **UNCOMPILED), default), state
        outputs[state] = default
    # Every state decodes something of its own, so a stale route could not pass the checks above.
    assert not torch.equal(outputs["default"], outputs["other"])
    assert "disabled" not in outputs or not torch.equal(outputs["other"], outputs["disabled"])
    torch.manual_seed(0)
    default = fl.generate(gm, **prompt, **SAMPLED)
    torch.manual_seed(0)
    assert torch.equal(fl.generate(gm, **prompt, **SAMPLED, **UNCOMPILED), default)


@needs_transformers_5
def test_compiled_step_follows_adapters_with_one_compile():
    """aot_eager: dynamo's graph capture and guards, as Inductor gets them. Neither an adapter switch, a merge,
    disabling, another prompt length (of the same bucket) nor another call compiles again."""
    gm = tuned("llama")
    compiled = {**GREEDY, "cache_implementation": "static"}
    compiled["compile_config"] = transformers.CompileConfig(backend="aot_eager", fullgraph=True, mode=None)
    trainable = {name for name, param in gm.named_parameters() if param.requires_grad}
    for index, (state, context) in enumerate(_states(gm)):
        with context:
            prompt = _prompt(length=6 + index)
            assert torch.equal(fl.generate(gm, **prompt, **compiled), fl.generate(gm, **prompt, **GREEDY)), state
    assert counters["stats"]["unique_graphs"] == 1
    # Parameters are frozen for the compiled calls only (torch.compile guards on requires_grad).
    assert {name for name, param in gm.named_parameters() if param.requires_grad} == trainable


@needs_transformers_5
def test_inductor_compiles_the_step_once_and_keeps_the_tokens():
    model = make_model("llama", depth=1)
    gm = fl.lntune_transform(model, fl.LNTuningConfig())
    perturb_adapter(gm, "default", seed=1)
    prompt = _prompt()
    static = {**GREEDY, "cache_implementation": "static"}
    assert torch.equal(fl.generate(gm, **prompt, **static), fl.generate(gm, **prompt, **GREEDY))
    assert counters["inductor"]["fxgraph_cache_miss"] + counters["inductor"]["fxgraph_cache_hit"] >= 1
    with torch.compiler.set_stance("fail_on_recompile"):
        fl.generate(gm, **_prompt(seed=4), **static)
    assert counters["stats"]["unique_graphs"] == 1


def test_buffers_grow_when_the_generation_outruns_them(monkeypatch):
    """The slot count is planned from max_new_tokens / max_length; a longer run copies into larger buffers."""
    gm = tuned("llama")
    monkeypatch.setattr(static_decode, "_MIN_SLOTS", 4)
    monkeypatch.setattr(static_decode, "_planned_length", lambda input_ids, *_: input_ids.shape[1] + 1)
    prompt = _prompt()
    long = {**GREEDY, "max_new_tokens": 12, "min_new_tokens": 12}
    assert torch.equal(fl.generate(gm, **prompt, **long, **UNCOMPILED), fl.generate(gm, **prompt, **long))


def test_returned_cache_holds_the_computed_keys_and_values():
    gm = tuned("gpt2")
    prompt = _prompt()
    kwargs = {**GREEDY, "return_dict_in_generate": True}
    default = fl.generate(gm, **prompt, **kwargs)
    static = fl.generate(gm, **prompt, **kwargs, **UNCOMPILED)
    assert torch.equal(static.sequences, default.sequences)
    for ours, theirs in zip(static.past_key_values.layers, default.past_key_values.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys)
        torch.testing.assert_close(ours.values, theirs.values)


def test_slot_count_buckets():
    assert [static_decode.slot_count(n) for n in (1, 64, 65, 95, 128, 129)] == [64, 64, 128, 128, 128, 256]


@pytest.mark.parametrize(
    ("arch", "kwargs", "match"),
    [
        ("t5", UNCOMPILED, "decoder-only"),
        ("llama", {"cache_implementation": "offloaded"}, "cache_implementation='offloaded' is not supported"),
        ("llama", {"cache_implementation": "static", "compile_config": {"fullgrap": True}}, "fullgrap"),
    ],
)
def test_refusals(arch, kwargs, match):
    _, gm = captured(arch)
    with pytest.raises(fl.LNTuneGenerationError, match=match):
        fl.generate(gm, **_prompt(), **GREEDY, **kwargs)
