"""`fl.chunked_loss`: the causal / masked LM loss from the head's input, chunk by chunk, equal to the plain graph."""

from __future__ import annotations

import pytest
import torch
import transformers
from models import make_config, make_inputs, make_labels, make_model

import fx_lntune as fl


def _tuned(arch: str, dtype: torch.dtype = torch.float32, config=None):
    if arch == "bert-mlm":
        model = transformers.BertForMaskedLM(make_config("bert")).eval()
        inputs = make_inputs("bert")
        labels = inputs["input_ids"].clone()
        labels[inputs["attention_mask"] == 0] = -100
        labels[:, ::3] = -100
    else:
        if arch == "t5":
            cfg = make_config("t5")
            cfg.decoder_start_token_id = 0
            torch.manual_seed(0)
            model = transformers.T5ForConditionalGeneration(cfg).eval()
        else:
            model = make_model(arch)
        inputs = make_inputs(arch)
        labels = make_labels(arch, inputs)
        labels[0, :2] = -100
    gm = fl.lntune_transform(model.to(dtype), config or fl.LNTuningConfig(), example_inputs=inputs)
    return gm.train(), inputs, labels


def _loss_and_grads(gm, inputs, labels):
    torch.manual_seed(1)
    output = gm(**inputs, labels=labels)
    output.loss.backward()
    grads = {name: param.grad.clone() for name, param in gm.named_parameters() if param.requires_grad}
    gm.zero_grad(set_to_none=True)
    return output, grads


@pytest.mark.parametrize("arch", ["llama", "gpt2", "t5", "bart", "bert-mlm"])
def test_chunked_loss_equals_the_plain_loss_and_gradients(arch):
    gm, inputs, labels = _tuned(arch)
    code = gm.code
    plain, plain_grads = _loss_and_grads(gm, inputs, labels)
    fl.chunked_loss(gm)
    assert gm.code != code
    chunked, grads = _loss_and_grads(gm, inputs, labels)
    assert chunked.logits is None
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=0)
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    gm.eval()
    with torch.no_grad():
        evaluated = gm(**inputs, labels=labels)
    assert evaluated.logits is not None
    fl.chunked_loss(gm, enabled=False)
    assert gm.code == code


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_chunked_loss_in_half_precision_accumulates_in_fp32(dtype):
    gm, inputs, labels = _tuned("llama", dtype)
    plain, plain_grads = _loss_and_grads(gm, inputs, labels)
    fl.chunked_loss(gm)
    chunked, grads = _loss_and_grads(gm, inputs, labels)
    assert chunked.loss.dtype == torch.float32
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-3, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.float(), plain_grads[name].float(), rtol=2e-2, atol=1e-2, msg=name)


@pytest.mark.parametrize(
    "config",
    [
        fl.LNTuningConfig(modules_to_save=["lm_head"]),
        fl.LNTuningConfig(target_modules=["input_layernorm", "post_attention_layernorm", "norm", "lm_head"]),
    ],
    ids=["modules_to_save", "targeted"],
)
def test_a_trained_head_keeps_its_loss_and_gradients(config):
    gm, inputs, labels = _tuned("llama", config=config)
    plain, plain_grads = _loss_and_grads(gm, inputs, labels)
    assert any("lm_head" in name for name in plain_grads)
    fl.chunked_loss(gm)
    chunked, grads = _loss_and_grads(gm, inputs, labels)
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


TF4_VMAP_MASK = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="transformers 4.x builds causal decoders' masks with vmap, which dynamo cannot trace (see test_compile)",
)


@pytest.mark.parametrize("arch", [pytest.param("llama", marks=TF4_VMAP_MASK), "bart"])
def test_chunked_loss_under_torch_compile(arch):
    gm, inputs, labels = _tuned(arch)
    fl.chunked_loss(gm)
    for module in gm.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()  # no dropout: the same computation eager and compiled
    eager, eager_grads = _loss_and_grads(gm, inputs, labels)
    torch._dynamo.reset()
    try:
        compiled, grads = _loss_and_grads(torch.compile(gm, backend="aot_eager"), inputs, labels)
    finally:
        torch._dynamo.reset()
    assert compiled.logits is None
    torch.testing.assert_close(compiled.loss, eager.loss, rtol=1e-5, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name.removeprefix("_orig_mod.")], rtol=1e-4, atol=1e-6)


def test_the_chunked_peak_is_below_the_plain_peak_by_the_logits():
    import sys

    sys.path.insert(0, "benchmarks")
    from run_all import PeakTensorMemory

    config = make_config("llama")
    config.vocab_size = 4096
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(3, 4096, (2, 64)), "attention_mask": torch.ones(2, 64, dtype=torch.long)}
    labels = inputs["input_ids"].clone()
    gm = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=inputs).train()
    existing = [*gm.parameters(), *gm.buffers(), *inputs.values(), labels]

    def peak() -> int:
        with PeakTensorMemory(existing) as tracker:
            gm(**inputs, labels=labels).loss.backward()
        gm.zero_grad(set_to_none=True)
        return tracker.peak

    plain = peak()
    fl.chunked_loss(gm)
    chunked = peak()
    logits = 2 * 64 * 4096 * 4
    assert chunked <= plain - logits, (plain, chunked)
