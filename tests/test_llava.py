"""The llava graph, PEFT's LN-tuning paper setting: any number of images, training on images, generation."""

from __future__ import annotations

import copy
import functools
import pickle

import peft
import pytest
import torch
import transformers
from conftest import captured
from models import LLAVA_IMAGE_TOKEN_ID, make_config, perturb_adapter

import fx_lntune as fl
from fx_lntune.generation import decoder_for

pytestmark = pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) < 5,
    reason="torch.export cannot capture llava under transformers 4.x: its LlavaModel.get_placeholder_mask checks "
    "`inputs_embeds[special_image_mask].numel() != image_features.numel()` in a Python `if`, a size that depends "
    "on the data, which export refuses (README coverage table)",
)

_CONFIG = make_config("llava")
_PER_IMAGE = _CONFIG.image_seq_length  # image tokens per image
_SIZE = _CONFIG.vision_config.image_size
NEW_TOKENS = 5


def _prompts(images_per_row: list[int], text: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded rows (the longest unpadded), each with its images' tokens after the padding, then text."""
    generator = torch.Generator().manual_seed(seed)
    length = max(images_per_row) * _PER_IMAGE + text
    ids = torch.randint(4, LLAVA_IMAGE_TOKEN_ID - 1, (len(images_per_row), length), generator=generator)
    mask = torch.ones_like(ids)
    for row, images in enumerate(images_per_row):
        start = length - images * _PER_IMAGE - text
        mask[row, :start] = 0
        ids[row, start : start + images * _PER_IMAGE] = LLAVA_IMAGE_TOKEN_ID
    pixels = torch.randn(sum(images_per_row), 3, _SIZE, _SIZE, generator=generator)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _peft_twin(model: torch.nn.Module, gm: torch.fx.GraphModule) -> peft.PeftModel:
    """A PEFT model with the same adapters and weights as ``gm``."""
    twin = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig())
    for name in fl.list_adapters(gm)[1:]:
        twin.add_adapter(name, peft.LNTuningConfig())
    weights = {key: value for key, value in gm.state_dict().items() if ".ln_tuning_layers." in key}
    assert not twin.base_model.model.load_state_dict(weights, strict=False).unexpected_keys
    return twin.eval()


@functools.cache
def _tuned() -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """Captured with 2 images (make_inputs: batch 2, one image per row); two perturbed adapters."""
    model, gm = captured("llava")
    fl.add_adapter(gm, "other")
    perturb_adapter(gm, "default", seed=1)
    perturb_adapter(gm, "other", seed=2)
    return model, gm.eval()


def tuned() -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    model, gm = _tuned()
    fl.set_adapter(gm, "default")
    return model, gm


@pytest.mark.parametrize("images_per_row", [[1], [2, 1], [1, 1, 1], [0, 2]], ids=str)
def test_graph_takes_any_number_of_images(images_per_row):
    """The capture saw 2 images; the graph's logits and per-image features equal the model's for other counts."""
    model, gm = captured("llava")
    inputs = _prompts(images_per_row)
    with torch.no_grad():
        ours, expected = gm(**inputs), model(**inputs)
    torch.testing.assert_close(ours.logits, expected.logits)
    features = ours.image_outputs.pooler_output
    assert len(features) == sum(images_per_row) == len(expected.image_outputs.pooler_output)
    torch.testing.assert_close(torch.stack(features), torch.stack(expected.image_outputs.pooler_output))


def test_pickled_graph_takes_any_number_of_images():
    """Unpickling traces the graph's code again: the merge and the per-image list stay run-time counts."""
    model, gm = captured("llava")
    inputs = _prompts([2, 1])
    with torch.no_grad():
        torch.testing.assert_close(pickle.loads(pickle.dumps(gm))(**inputs).logits, model(**inputs).logits)


def test_image_tokens_and_images_that_do_not_match_are_refused():
    _, gm = captured("llava")
    inputs = _prompts([2, 1])
    with pytest.raises(fl.LNTuneTraceError, match="12 image tokens but pixel_values give 8"):
        gm(**{**inputs, "pixel_values": inputs["pixel_values"][:2]})


def test_training_on_images_gives_peft_loss_and_adapter_gradients():
    """The paper's setting: labels and pixel_values (3 images, the capture had 2); loss and every adapter
    gradient equal PEFT's (eval mode: no dropout, so both compute the same numbers)."""
    model, gm = tuned()
    twin = _peft_twin(model, gm)
    inputs = _prompts([2, 1], seed=1)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == LLAVA_IMAGE_TOKEN_ID, -100)
    labels[inputs["attention_mask"] == 0] = -100
    ours = gm(**inputs, labels=labels).loss
    theirs = twin(**inputs, labels=labels).loss
    torch.testing.assert_close(ours, theirs)
    ours.backward()
    theirs.backward()
    grads = {name: param.grad for name, param in gm.named_parameters() if param.requires_grad}
    twin_grads = {
        name.removeprefix("base_model.model."): param.grad
        for name, param in twin.named_parameters()
        if param.requires_grad
    }
    gm.zero_grad()
    assert grads.keys() == twin_grads.keys() and any(".multi_modal_projector." in name for name in grads)
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, twin_grads[name], msg=name)


@pytest.mark.parametrize("images_per_row", [[1], [2, 1]], ids=str)
def test_generate_equals_peft_for_adapters_merged_and_disabled(images_per_row):
    """Greedy tokens with images (batch 1 and a left-padded batch 2 with 3 images; the capture had 2) equal
    PEFT's generate for each adapter, merged, and the model's own with adapters disabled."""
    model, gm = tuned()
    twin = _peft_twin(model, gm)
    prompt = _prompts(images_per_row, seed=2)
    greedy = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)

    ours = fl.generate(gm, **prompt, **greedy)
    assert ours.shape == (len(images_per_row), prompt["input_ids"].shape[1] + NEW_TOKENS)
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
    # The adapters and the images change the text; switching adapters needed no new capture.
    assert not torch.equal(ours, base) and not torch.equal(other, base)
    other_images = {**prompt, "pixel_values": torch.randn_like(prompt["pixel_values"])}
    with fl.disable_adapters(gm):
        assert not torch.equal(fl.generate(gm, **other_images, **greedy), base)
    assert decoder_for(gm).graphs.keys() == graphs.keys()
    assert all(decoder_for(gm).graphs[name] is graph for name, graph in graphs.items())


def test_generate_reads_the_images_in_the_prefill_only():
    """The images go through the prefill step graph once; the following steps are the text-only step."""
    _, gm = tuned()
    prompt = _prompts([1, 1], seed=3)
    fl.generate(gm, **prompt, max_new_tokens=2, min_new_tokens=2)
    decoder = decoder_for(gm)
    image_steps = [name for name in decoder.graphs if name.startswith("step_images")]
    text_steps = [name for name in decoder.graphs if name in ("step", "step_positions")]
    assert len(image_steps) == 1 and len(text_steps) == 1
    calls = []
    run = {key: graph for key, graph in decoder.runnable.items() if graph is not None}  # the copies that run
    for (name, _), graph in run.items():
        graph.forward = functools.partial(_counting, graph.forward, name, calls)
    try:
        fl.generate(gm, **prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    finally:
        for graph in run.values():
            del graph.forward
    assert calls == [image_steps[0]] + [text_steps[0]] * (NEW_TOKENS - 1)


def _counting(forward, name, calls, *args):
    calls.append(name)
    return forward(*args)


def test_image_count_pass_rewrites_the_merge_only():
    """`free_image_count` finds nothing to change in a text model's graph, nor in a llava graph it already freed."""
    from fx_lntune.passes import free_image_count

    for arch in ("llama", "llava"):
        _, gm = captured(arch)
        code = gm.code
        assert not free_image_count(gm).modified and gm.code == code
