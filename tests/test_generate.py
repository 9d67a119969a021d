"""fl.generate: Hugging Face generate semantics with a KV cache, against PEFT's generate for the same adapters."""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import torch
from conftest import captured
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import perturb_adapter

import fx_lntune as fl
from fx_lntune.generation import decoder_for

NEW_TOKENS = 5


def _peft_twin(model: torch.nn.Module, gm: torch.fx.GraphModule) -> peft.PeftModel:
    """A PEFT model with the same adapters and weights as ``gm``."""
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig())
    for name in fl.list_adapters(gm)[1:]:
        twin.add_adapter(name, peft.LNTuningConfig())
    weights = {key: value for key, value in gm.state_dict().items() if ".ln_tuning_layers." in key}
    unexpected = twin.base_model.model.load_state_dict(weights, strict=False).unexpected_keys
    assert not unexpected
    return twin.eval()


def _prompt(arch: str) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(4, 99, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    if arch == "t5":
        mask[0, -2:] = 0  # an encoder's padding may sit anywhere
    else:
        mask[0, :2] = 0  # left padding, as for generation
    return {"input_ids": ids, "attention_mask": mask}


@functools.cache
def _tuned(arch: str) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """One capture per architecture for this module, with two perturbed adapters: its step graphs are captured
    once and reused by every test (each starts from `tuned`, which resets the adapter state)."""
    model, gm = captured(arch)
    fl.add_adapter(gm, "other")
    perturb_adapter(gm, "default", seed=1)
    perturb_adapter(gm, "other", seed=2)
    return model, gm


def tuned(arch: str) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    model, gm = _tuned(arch)
    if fl.active_adapter(gm) != "default":
        fl.set_adapter(gm, "default")
    return model, gm


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5"])
def test_greedy_tokens_equal_peft_for_adapters_merged_and_disabled(arch):
    model, gm = tuned(arch)
    twin = _peft_twin(model, gm)
    prompt = _prompt(arch)
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)

    ours = fl.generate(gm, **prompt, **greedy)
    assert torch.equal(ours, twin.generate(**prompt, **greedy))
    graphs = dict(decoder_for(gm).graphs)

    fl.set_adapter(gm, "other")
    twin.set_adapter("other")
    other = fl.generate(gm, **prompt, **greedy)
    assert torch.equal(other, twin.generate(**prompt, **greedy))

    fl.merge_adapter(gm, "other")
    try:
        assert torch.equal(fl.generate(gm, **prompt, **greedy), other)
    finally:
        fl.unmerge_adapter(gm)

    with fl.disable_adapters(gm):
        base = fl.generate(gm, **prompt, **greedy)
    assert torch.equal(base, model.generate(**prompt, **greedy))
    # The adapters change the text, and switching them needed no new capture.
    assert not torch.equal(ours, base) and not torch.equal(other, base)
    assert decoder_for(gm).graphs == graphs


def test_returns_prompt_and_new_tokens_and_stops_at_eos():
    model, gm = tuned("llama")
    ids = _prompt("llama")["input_ids"][1:]
    torch.manual_seed(0)
    sampled = fl.generate(gm, ids, do_sample=True, top_k=20, temperature=0.8, max_new_tokens=NEW_TOKENS)
    assert sampled.shape == (1, ids.shape[1] + NEW_TOKENS) and torch.equal(sampled[:, : ids.shape[1]], ids)
    torch.manual_seed(0)
    twin = _peft_twin(model, gm)
    sampling = dict(do_sample=True, top_k=20, temperature=0.8, max_new_tokens=NEW_TOKENS)
    assert torch.equal(twin.generate(ids, **sampling), sampled)

    new = sampled[0, ids.shape[1] :].tolist()
    eos = new[2]
    torch.manual_seed(0)
    stopped = fl.generate(
        gm, ids, do_sample=True, top_k=20, temperature=0.8, max_new_tokens=NEW_TOKENS, eos_token_id=eos
    )
    assert stopped[0, ids.shape[1] :].tolist() == new[: new.index(eos) + 1]


def test_decoding_computes_the_prompt_once():
    _, gm = tuned("gpt2")
    prompt = _prompt("gpt2")
    fl.generate(gm, **prompt, max_new_tokens=1)  # captures the step graph
    ((name, _),) = decoder_for(gm).graphs.items()
    graph = decoder_for(gm).runnable[name, False]  # the copy that runs (the prompt is padded: masked)
    calls = []
    forward = graph.forward

    def counting(input_ids, attention_mask, *rest):  # rest: the past, flat (key, value per layer), then positions
        calls.append((input_ids.shape[1], rest[0].shape[2]))
        return forward(input_ids, attention_mask, *rest)

    graph.forward = counting
    try:
        fl.generate(gm, **prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    finally:
        del graph.forward
    prompt_length = prompt["input_ids"].shape[1]
    assert calls == [(prompt_length, 0)] + [(1, prompt_length + step) for step in range(NEW_TOKENS - 1)]


def test_model_generation_config_is_the_default_and_can_be_overridden():
    from transformers import GenerationConfig

    model, gm = tuned("llama")
    twin = _peft_twin(model, gm)
    ids = _prompt("llama")["input_ids"]
    # No arguments: the model's own generation_config (greedy, max_length 20, its eos/pad ids), kept at capture.
    assert torch.equal(fl.generate(gm, ids), twin.generate(input_ids=ids))
    config = GenerationConfig(max_new_tokens=3, do_sample=False, pad_token_id=0, repetition_penalty=1.5)
    out = fl.generate(gm, ids, generation_config=config)
    assert out.shape[1] == ids.shape[1] + 3
    assert torch.equal(out, twin.generate(input_ids=ids, generation_config=config))


def test_unknown_and_unsupported_arguments_are_refused():
    _, gm = tuned("gpt2")
    ids = _prompt("gpt2")["input_ids"]
    with pytest.raises(fl.LNTuneGenerationError, match="did you mean 'max_new_tokens'"):
        fl.generate(gm, ids, max_new_token=3)
    with pytest.raises(fl.LNTuneGenerationError, match="output_attentions"):
        fl.generate(gm, ids, output_attentions=True)
    with pytest.raises(fl.LNTuneGenerationError, match="2-D tensor"):
        fl.generate(gm, ids[0])


@functools.cache
def _llama_with_config_cache(use_cache: bool) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """The tiny llama whose config says ``use_cache`` (False as saved after training with gradient checkpointing)
    and its capture."""
    from models import make_model

    model = make_model("llama").eval()
    model.config.use_cache = use_cache
    gm = fl.lntune_transform(copy.deepcopy(model), fl.LNTuningConfig())
    perturb_adapter(gm, "default", seed=1)
    return model, gm.eval()


@settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    config_cache=st.booleans(),
    generation_cache=st.sampled_from([None, True, False]),
    left_padding=st.booleans(),
    batch=st.integers(1, 3),
    padded=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_greedy_tokens_are_the_models_own_whatever_its_cache_settings(
    config_cache, generation_cache, left_padding, batch, padded, seed
):
    """The model's config / generation config may turn its cache off (use_cache=False): its own generate then
    feeds the whole sequence per step; fl.generate must still give its tokens, for any padding side and batch."""
    from transformers import GenerationConfig

    model, gm = _llama_with_config_cache(config_cache)
    twin = _peft_twin(model, gm)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 99, (batch, 7), generator=generator)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :padded] = 0 if left_padding else 1
        if not left_padding:
            mask[0, -padded:] = 0
    config = GenerationConfig(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    if generation_cache is not None:
        config.use_cache = generation_cache
    kwargs = {"input_ids": ids, "attention_mask": mask, "generation_config": config}
    assert torch.equal(fl.generate(gm, **kwargs), twin.generate(**kwargs))


def test_prefill_computes_the_last_positions_logits_only():
    """The prompt step keeps the head's logits of the last position only (transformers' logits_to_keep=1)."""
    model, gm = tuned("llama")
    prompt = _prompt("llama")
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    decoder = decoder_for(gm)
    logits = decoder.graph("step")(ids, mask, *decoder.layout.empty_past(ids.shape[0], ids.device))[0]
    assert logits.shape == (ids.shape[0], 1, model.config.vocab_size)
    with torch.no_grad():
        expected = _peft_twin(model, gm)(**prompt).logits[:, -1:]
    torch.testing.assert_close(logits, expected)


def test_step_graph_captured_shortened_is_the_graph_of_every_layer(monkeypatch):
    """The causal step of a 6-layer model is exported with 3 layers and the others copied (`passes.repeat_layers`,
    each copy with its own past in and present out): the graph and tokens of a capture of every layer."""
    from models import make_model

    import fx_lntune.capture.decoder as capture_decoder

    model = make_model("llama", depth=6).eval()
    gm = fl.lntune_transform(copy.deepcopy(model), fl.LNTuningConfig())
    perturb_adapter(gm, "default", seed=1)
    real, exported = torch.export.export, []

    def spy(root, args, **kwargs):
        exported.append(len(root.model.model.layers))
        return real(root, args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.export, "export", spy)
        short = decoder_for(gm).graph("step_positions")
    with monkeypatch.context() as patch:
        patch.setattr(capture_decoder, "_step_runs", lambda shell, args: [])
        whole_gm = copy.deepcopy(gm)
        whole = decoder_for(whole_gm).graph("step_positions")
    assert exported == [3]

    def ops(graph):
        return [(node.op, str(node.target)) for node in graph.graph.nodes if node.op not in ("get_attr", "placeholder")]

    assert ops(short) == ops(whole)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 99, (2, 2), generator=generator)
    past = tuple(
        torch.randn(2, heads, 3, dim, generator=generator)
        for heads, dim in decoder_for(gm).layout.self_attention
        for _ in "kv"
    )
    args = (ids, torch.ones(2, 5, dtype=torch.long), *past, torch.tensor([[3, 4], [3, 4]]))
    assert len(short(*args)) == 1 + 2 * 6
    for got, expected in zip(short(*args), whole(*args), strict=True):
        assert torch.equal(got, expected)
    prompt = _prompt("llama")
    greedy = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(fl.generate(gm, **prompt, **greedy), _peft_twin(model, gm).generate(**prompt, **greedy))


@functools.cache
def _windowed(arch: str, window: int | None) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    from models import make_model

    model = make_model(arch)
    if window is not None:
        model.config.sliding_window = window
    gm = fl.lntune_transform(copy.deepcopy(model), fl.LNTuningConfig())
    perturb_adapter(gm, "default", seed=1)
    return model, gm.eval()


@pytest.mark.parametrize(
    ("arch", "window", "unmasked"),
    [("llama", None, True), ("gpt2", None, True), ("mistral", 9, True), ("bloom", None, False)],
)
def test_steps_with_nothing_masked_run_without_a_mask_as_the_eager_model(arch, window, unmasked):
    """Where no token is padded, the eager model's sdpa attention takes no mask (a causal prompt step, then one token
    at a time) up to its sliding window: so does fl.generate, with a step graph that builds none, and the tokens
    stay the model's own. A padded batch, and an attention that takes a float mask (bloom's alibi), keep the mask."""
    model, gm = _windowed(arch, window)
    twin = _peft_twin(model, gm)
    ids = torch.randint(4, 99, (2, 6), generator=torch.Generator().manual_seed(5))
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    padded = torch.ones_like(ids)
    padded[0, :2] = 0
    fl.generate(gm, ids, max_new_tokens=1)  # captures the step graph and makes its unmasked copy
    fl.generate(gm, ids, attention_mask=padded, max_new_tokens=1)  # and its masked one
    decoder = decoder_for(gm)
    (name,) = decoder.graphs
    assert (decoder.runnable[name, True] is not None) == unmasked
    graphs = {"masked": decoder.runnable[name, False], "unmasked": decoder.runnable[name, True]}
    graphs = {kind: graph for kind, graph in graphs.items() if graph is not None}
    calls = []

    def counting(kind, forward):
        def call(input_ids, attention_mask, *rest):
            calls.append((kind, input_ids.shape[1], attention_mask.shape[1]))
            return forward(input_ids, attention_mask, *rest)

        return call

    for kind, graph in graphs.items():
        graph.forward = counting(kind, graph.forward)
    try:
        for prompt, free in (({"input_ids": ids[:1]}, unmasked), ({"input_ids": ids, "attention_mask": padded}, False)):
            calls.clear()
            assert torch.equal(fl.generate(gm, **prompt, **greedy), twin.generate(**prompt, **greedy))
            lengths = [(6, 6)] + [(1, 6 + step) for step in range(1, 8)]  # (new tokens, mask length) per step
            limit = window or float("inf")
            assert calls == [("unmasked" if free and total < limit else "masked", new, total) for new, total in lengths]
    finally:
        for graph in graphs.values():
            del graph.forward


def test_the_steps_run_compute_the_captured_step():
    """What generate runs are copies of the captured step: with torch's own bindings for the aten calls (the same
    kernels: bit for bit the same outputs), and unmasked (the same outputs where nothing is padded)."""
    model, gm = _windowed("llama", None)
    fl.generate(gm, torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    decoder = decoder_for(gm)
    (name,) = decoder.graphs
    captured, run, unmasked = decoder.graph(name), decoder.runnable[name, False], decoder.runnable[name, True]
    assert "aten.linear" in captured.code and "aten.linear" not in run.code and "aten.linear" not in unmasked.code
    generator = torch.Generator().manual_seed(0)
    past = tuple(
        torch.randn(2, heads, 4, dim, generator=generator) for heads, dim in decoder.layout.self_attention for _ in "kv"
    )
    for length, past_length in ((1, 4), (5, 0)):
        ids = torch.randint(4, 99, (2, length), generator=generator)
        args = (ids, torch.ones(2, past_length + length, dtype=torch.long), *(p[:, :, :past_length] for p in past))
        args += (torch.arange(past_length, past_length + length).expand(2, -1),) if name == "step_positions" else ()
        with torch.no_grad():
            expected = captured(*args)
            for got, want in zip(run(*args), expected, strict=True):
                assert torch.equal(got, want)
            for got, want in zip(unmasked(*args), expected, strict=True):
                torch.testing.assert_close(got, want)
