"""Resource use: a transform shares the model's frozen weights instead of copying them."""

from __future__ import annotations

import torch
import transformers
from models import make_inputs

import fx_lntune as fl

# ~117M parameters (two untied 32.8M embeddings, four 12.9M layers): big enough that a copy would show.
BIG = dict(
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=16,
    tie_word_embeddings=False,
)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def test_transform_shares_frozen_weights_of_a_100m_model():
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BIG))
    model.to_empty(device="cpu").eval()  # real storage without spending time on initialisation
    n_model = sum(p.numel() for p in model.parameters())
    assert n_model > 100_000_000
    model_storage = {name: _storage(p) for name, p in model.named_parameters()}
    inputs = make_inputs("llama")

    gm = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=inputs)

    copies, frozen = {}, {}
    for name, param in gm.named_parameters():
        (copies if ".ln_tuning_layers." in name else frozen)[name] = param
    assert all(not p.requires_grad for p in frozen.values())
    for name, param in frozen.items():
        assert _storage(param) == model_storage[name.replace(".base_layer.", ".")], name
    # The only new storage is the adapter's copies of the norms: 2 per layer and the final norm.
    assert len(copies) == 2 * BIG["num_hidden_layers"] + 1
    assert not {_storage(p) for p in copies.values()} & set(model_storage.values())
    assert sum(p.numel() for p in copies.values()) == (2 * BIG["num_hidden_layers"] + 1) * BIG["hidden_size"]
    assert all(p.requires_grad for p in model.parameters())  # the model is not modified
