"""Tiny Hugging Face models built from configs: the one shared fixture module of the test suite.

Every model is built offline (no hub access), is deterministic for a seed, has non-zero dropout, and has
every parameter perturbed away from its initial value so that norms and their copies can be told apart.
Config arguments are limited to ones that exist in both transformers 4.57 and 5.x.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

__all__ = [
    "ARCHITECTURES",
    "EXTRA_ARCHITECTURES",
    "ALL_ARCHITECTURES",
    "VOCAB_SIZE",
    "NUM_LABELS",
    "make_config",
    "make_model",
    "make_inputs",
    "make_labels",
    "task_of",
]

ARCHITECTURES: list[str] = [
    "bert",
    "roberta",
    "distilbert",
    "gpt2",
    "llama",
    "mistral",
    "qwen2",
    "gemma2",
    "opt",
    "bloom",
    "t5",
    "bart",
    "vit",
    "whisper",
]
# albert shares one layer across depth (the same modules are called once per layer); llava is multimodal
# (a CLIP vision tower + a llama text model) and its PEFT default targets embed_tokens and lm_head too.
EXTRA_ARCHITECTURES: list[str] = ["albert", "llava"]
ALL_ARCHITECTURES: list[str] = ARCHITECTURES + EXTRA_ARCHITECTURES

VOCAB_SIZE = 100
NUM_LABELS = 3
DROPOUT = 0.1
PERTURBATION = 0.02
# Token ids below this are left to special tokens (pad / bos / eos / decoder start) in every config.
_FIRST_PLAIN_TOKEN = 4
LLAVA_IMAGE_TOKEN_ID = VOCAB_SIZE - 1

_BERT_LIKE: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    hidden_dropout_prob=DROPOUT,
    attention_probs_dropout_prob=DROPOUT,
    num_labels=NUM_LABELS,
)
_LLAMA_LIKE: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    attention_dropout=DROPOUT,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_ENC_DEC: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=64,
    decoder_ffn_dim=64,
    dropout=DROPOUT,
    attention_dropout=DROPOUT,
    activation_dropout=DROPOUT,
)

# arch -> (config class, model class, config kwargs); class names are looked up on `transformers`.
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", dict(_BERT_LIKE, pad_token_id=0)),
    "roberta": (
        "RobertaConfig",
        "RobertaForSequenceClassification",
        dict(_BERT_LIKE, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    ),
    "albert": (
        "AlbertConfig",
        "AlbertForSequenceClassification",
        dict(
            _BERT_LIKE,
            embedding_size=16,
            num_hidden_groups=1,
            classifier_dropout_prob=DROPOUT,
            pad_token_id=0,
        ),
    ),
    "distilbert": (
        "DistilBertConfig",
        "DistilBertForSequenceClassification",
        dict(
            vocab_size=VOCAB_SIZE,
            dim=32,
            hidden_dim=64,
            n_layers=2,
            n_heads=4,
            max_position_embeddings=64,
            dropout=DROPOUT,
            attention_dropout=DROPOUT,
            seq_classif_dropout=DROPOUT,
            num_labels=NUM_LABELS,
            pad_token_id=0,
        ),
    ),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(
            vocab_size=VOCAB_SIZE,
            n_positions=64,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_inner=64,
            resid_pdrop=DROPOUT,
            embd_pdrop=DROPOUT,
            attn_pdrop=DROPOUT,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA_LIKE)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA_LIKE)),
    # head_dim and query_pre_attn_scalar default to 256 whatever hidden_size is.
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            word_embed_proj_dim=32,  # defaults to 768 whatever hidden_size is
            max_position_embeddings=64,
            dropout=DROPOUT,
            attention_dropout=DROPOUT,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        ),
    ),
    "bloom": (
        "BloomConfig",
        "BloomForCausalLM",
        dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            n_layer=2,
            n_head=4,
            hidden_dropout=DROPOUT,
            attention_dropout=DROPOUT,
            pad_token_id=3,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        dict(
            vocab_size=VOCAB_SIZE,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            dropout_rate=DROPOUT,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ),
    ),
    "bart": (
        "BartConfig",
        "BartForConditionalGeneration",
        dict(
            _ENC_DEC,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=2,
        ),
    ),
    "vit": (
        "ViTConfig",
        "ViTForImageClassification",
        dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=DROPOUT,
            attention_probs_dropout_prob=DROPOUT,
            image_size=16,
            patch_size=4,
            num_channels=3,
            num_labels=NUM_LABELS,
        ),
    ),
    "whisper": (
        "WhisperConfig",
        "WhisperForConditionalGeneration",
        dict(
            _ENC_DEC,
            num_mel_bins=8,
            max_source_positions=16,  # input_features are then 8 x 32, fixed by the config
            max_target_positions=64,
            # the defaults are GPT-2 sized token ids (50256, 50257), out of range for a tiny vocab
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
            decoder_start_token_id=3,
            suppress_tokens=[],
            begin_suppress_tokens=[],
        ),
    ),
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", {}),  # nested: built by _llava_config
}


def _llava_config() -> transformers.PretrainedConfig:
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=8,
        patch_size=4,
        attention_dropout=DROPOUT,
    )
    text = transformers.LlamaConfig(**_LLAMA_LIKE)
    # "default" drops CLS: (8 / 4) ** 2 = 4 image tokens per image.
    return transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=LLAVA_IMAGE_TOKEN_ID,
        image_seq_length=4,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _check_arch(arch: str) -> None:
    if arch not in _SPECS:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ALL_ARCHITECTURES)}")


def task_of(arch: str) -> str:
    """The kind of head `make_model(arch)` has: "classification", "causal-lm" or "seq2seq"."""
    _check_arch(arch)
    head = _SPECS[arch][1]
    if head.endswith("Classification"):
        return "classification"
    if arch in ("t5", "bart", "whisper"):
        return "seq2seq"
    return "causal-lm"


_DEPTH_KEYS = (
    "num_hidden_layers",
    "n_layers",
    "n_layer",
    "num_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
)


def make_config(arch: str, depth: int | None = None) -> transformers.PretrainedConfig:
    """A fresh tiny config for `arch` (hidden 32, 2 layers, 4 heads, vocab 100, dropout 0.1); ``depth`` layers
    instead (in each stack of an encoder-decoder) where given."""
    _check_arch(arch)
    if arch == "llava":
        if depth is not None:
            raise ValueError("make_config('llava') has no depth option")
        return _llava_config()
    config_class, _, kwargs = _SPECS[arch]
    if depth is not None:
        kwargs = {key: depth if key in _DEPTH_KEYS else value for key, value in kwargs.items()}
    return getattr(transformers, config_class)(**kwargs)


def make_model(arch: str, seed: int = 0, depth: int | None = None) -> torch.nn.Module:
    """A tiny model with the head a user would fine-tune, in eval mode, with perturbed weights (``depth``: as in
    `make_config`).

    The same `seed` gives the same weights; the global RNG state is left as it was.
    """
    _check_arch(arch)
    config = make_config(arch, depth)
    model_class = getattr(transformers, _SPECS[arch][1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    # Freshly initialised norms are exactly 1 / 0 (and some biases 0): perturb everything so that a base
    # norm, its adapter copy and a merged weight are all different numbers.
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(PERTURBATION * noise.to(param.dtype))
    return model.eval()


def _token_ids(config: Any, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    vocab = config.get_text_config().vocab_size if hasattr(config, "text_config") else config.vocab_size
    # Stay clear of special ids and of llava's image token, which must appear exactly where it is placed.
    return torch.randint(_FIRST_PLAIN_TOKEN, vocab - 1, (batch, seq), generator=generator)


def _padding_mask(batch: int, seq: int) -> torch.Tensor:
    """All ones except the last quarter (at least one position) of row 0: right padding."""
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - max(1, seq // 4) :] = 0
    return mask


def make_inputs(arch: str, batch: int = 2, seq: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """The keyword inputs a user passes to `make_model(arch)`.

    Dynamic dims: batch everywhere; `seq` for every token-id input (input_ids, attention_mask,
    decoder_input_ids). Fixed by the config: pixel_values' channels / height / width and whisper's
    input_features (num_mel_bins x 2 * max_source_positions = 8 x 32); llava's 4 image tokens, which
    come first in every row, so its input_ids are `4 + seq` long.
    Row 0 of attention_mask is right-padded; padded positions still hold ordinary token ids.
    """
    _check_arch(arch)
    config = make_config(arch)
    generator = torch.Generator().manual_seed(seed)
    if arch == "vit":
        size = config.image_size
        return {"pixel_values": torch.randn(batch, config.num_channels, size, size, generator=generator)}
    if arch == "whisper":
        frames = 2 * config.max_source_positions
        return {
            "input_features": torch.randn(batch, config.num_mel_bins, frames, generator=generator),
            "decoder_input_ids": _token_ids(config, batch, seq, generator),
        }
    # llava: each row starts with its image tokens, then `seq` text tokens (as fx_lntune's dummy inputs).
    n_image = config.image_seq_length if arch == "llava" else 0
    inputs = {
        "input_ids": _token_ids(config, batch, n_image + seq, generator),
        "attention_mask": _padding_mask(batch, n_image + seq),
    }
    if config.is_encoder_decoder:
        inputs["decoder_input_ids"] = _token_ids(config, batch, seq, generator)
    if arch == "llava":
        inputs["input_ids"][:, :n_image] = config.image_token_index
        vision = config.vision_config
        inputs["pixel_values"] = torch.randn(
            batch, vision.num_channels, vision.image_size, vision.image_size, generator=generator
        )
    return inputs


def make_labels(arch: str, inputs: dict[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
    """Labels for the model's own loss: class ids, or token ids with -100 where no loss is wanted."""
    task = task_of(arch)
    generator = torch.Generator().manual_seed(seed + 2)
    batch = next(iter(inputs.values())).shape[0]
    if task == "classification":
        return torch.randint(0, NUM_LABELS, (batch,), generator=generator)
    if task == "seq2seq":
        seq = inputs["decoder_input_ids"].shape[1]
        return torch.randint(_FIRST_PLAIN_TOKEN, VOCAB_SIZE - 1, (batch, seq), generator=generator)
    labels = inputs["input_ids"].clone()
    labels[inputs["attention_mask"] == 0] = -100
    if arch == "llava":
        labels[inputs["input_ids"] == LLAVA_IMAGE_TOKEN_ID] = -100
    return labels


def perturb_adapter(gm: torch.nn.Module, adapter: str, seed: int, scale: float = 0.5) -> None:
    """Move ``adapter``'s LN-tuning copies in ``gm`` far enough from the base that greedy tokens change (in place)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if f"ln_tuning_layers.{adapter}." in name:
                param.add_(scale * torch.randn(param.shape, generator=generator))
