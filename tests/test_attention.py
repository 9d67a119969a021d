"""`passes.attention`: grouped key/value heads and one shared float mask; outputs, gradients and memory as PEFT's."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from models import make_config, make_inputs, make_labels

import fx_lntune as fl
from fx_lntune.graph_inputs import _repeat_heads, attention, attention_mask

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from run_all import PeakTensorMemory  # noqa: E402 - the benchmark's own counter of live tensor storage

GQA_ARCHITECTURES = ["llama", "mistral", "qwen2"]  # 4 query heads, 2 key/value heads
# transformers 4.57's sdpa attention slices the mask to the key length in every layer (`mask[:, :, :, :s]`), so the
# mask does not go straight to attention and `share_attention_mask` leaves it: one float mask per layer there.
MASK_SHARED = int(transformers.__version__.split(".")[0]) >= 5


def _models(arch: str, batch: int = 2, seq: int = 8, padded: bool = True):
    config = make_config(arch)
    config.attention_dropout = 0.0  # the same computation on both sides, not the same random stream
    torch.manual_seed(0)
    model = getattr(transformers, type(make_config(arch)).__name__.replace("Config", "ForCausalLM"))(config).eval()
    inputs = make_inputs(arch, batch=batch, seq=seq)
    if not padded:
        inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    gm = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=make_inputs(arch))
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(task_type="CAUSAL_LM"))
    return gm, theirs, inputs


@pytest.mark.parametrize("arch", GQA_ARCHITECTURES)
def test_grouped_heads_and_one_mask_give_peft_outputs_and_gradients(arch):
    gm, theirs, inputs = _models(arch)
    layers = fl.layer_modules(gm)
    targets = [node.target for layer in layers for node in layer.graph.nodes]
    assert targets.count(attention) == len(layers)
    assert torch.ops.aten.expand.default not in targets  # no repeat_kv left
    assert [node.target for node in gm.graph.nodes].count(attention_mask) == (1 if MASK_SHARED else 0)
    labels = make_labels(arch, inputs)
    results = []
    for model in (gm, theirs):
        model.train()
        output = model(**inputs, labels=labels)
        output.loss.backward()
        grads = {
            name.replace("base_model.model.", "").replace(".default", ""): param.grad
            for name, param in model.named_parameters()
            if param.requires_grad
        }
        results.append((output, grads))
    (ours, our_grads), (peft_output, peft_grads) = results
    torch.testing.assert_close(ours.logits, peft_output.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.loss, peft_output.loss, rtol=1e-6, atol=0)
    assert our_grads.keys() == peft_grads.keys()
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not MASK_SHARED, reason="transformers 4.57 slices the mask in every layer: not shared there")
@pytest.mark.parametrize("padded", [False, True], ids=["all-ones mask", "padded"])
def test_a_training_step_keeps_no_more_than_peft(padded):
    gm, theirs, inputs = _models("llama", batch=2, seq=64, padded=padded)
    labels = inputs["input_ids"].clone()

    def peak(model, kwargs) -> int:
        model.train()
        existing = [*model.parameters(), *model.buffers(), *kwargs.values(), labels]
        with PeakTensorMemory([t for t in existing if isinstance(t, torch.Tensor)]) as tracker:
            model(**kwargs, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)
        return tracker.peak

    ours, reference = peak(gm, inputs), peak(theirs, dict(inputs, use_cache=False))
    # Known and small: the graph's default position ids have the batch's rows (the graph reads the batch size from
    # them), so its rotary cos and sin, kept for backward, do too, where the eager model's have one row.
    config = gm.config
    head_dim = config.hidden_size // config.num_attention_heads
    rotary_rows = 2 * (inputs["input_ids"].shape[0] - 1) * inputs["input_ids"].shape[1] * head_dim * 4
    assert ours <= reference + rotary_rows, (ours, reference)


def test_attention_takes_grouped_heads_and_the_shared_mask():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 5, 4, generator=generator)
    key, value = torch.randn(2, 2, 5, 4, generator=generator), torch.randn(2, 2, 5, 4, generator=generator)
    causal = torch.ones(2, 1, 5, 5, dtype=torch.bool).tril()
    assert attention_mask(causal, query) is None
    padded = causal.clone()
    padded[0, :, :, -1] = False
    float_mask = attention_mask(padded, query)
    assert float_mask.dtype == query.dtype and float_mask[0, 0, 4, 4] == float("-inf") and float_mask[0, 0, 4, 3] == 0
    assert attention_mask(float_mask, query) is float_mask
    repeated = [_repeat_heads(tensor, 3) for tensor in (key, value)]
    torch.testing.assert_close(repeated[0], key.repeat_interleave(3, dim=1), rtol=0, atol=0)
    for mask, shared in ((padded, float_mask), (causal, None)):
        expected = torch.nn.functional.scaled_dot_product_attention(query, *repeated, mask)
        torch.testing.assert_close(attention(query, key, value, shared, unmasked_is_causal=True), expected)
