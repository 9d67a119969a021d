"""The functions a tuned graph's first and last nodes call: defaults for inputs left out, and the model's loss.

`passes.keyword_inputs` and `passes.model_loss` insert ``call_function`` nodes targeting these functions. Every
argument is a graph value or a plain constant (a string, an int, a tuple), so the graph's code stays printable,
picklable and traceable by ``torch.export``. The model's own functions (its ``prepare_decoder_input_ids_from_labels``,
transformers' ``LOSS_MAPPING``) are named by import path and resolved on first use.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace
from typing import Any

import torch

from fx_lntune.compat import is_tracing
from fx_lntune.errors import LNTuneTraceError

__all__ = [
    "resolve",
    "default_mask",
    "default_token_type_ids",
    "default_position_ids",
    "default_decoder_input_ids",
    "model_loss",
    "check_labels",
    "model_output",
    "scatter_image_features",
    "image_list",
    "attention_mask",
    "attention",
    "GRAPH_FUNCTIONS",
]


# Resolved once (when the pass inserts the node, or on first call); a plain dict, which torch.compile traces.
_RESOLVED: dict[str, Any] = {}


def resolve(path: str) -> Any:
    """The object at ``"package.module:Qual.name"``."""
    found = _RESOLVED.get(path)
    if found is None:
        module_name, _, qualname = path.partition(":")
        found = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
        _RESOLVED[path] = found
    return found


def _batch_and_length(like: torch.Tensor) -> tuple[int, int]:
    return like.shape[0], like.shape[1]


def default_mask(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``mask``, or all ones (no padding, what the model assumes without a mask) shaped as ``like``'s first two dims."""
    if mask is not None:
        return mask
    return torch.ones(_batch_and_length(like), dtype=torch.long, device=like.device)


def default_token_type_ids(token_type_ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """``token_type_ids``, or zeros (every token in segment 0, BERT's default) shaped as ``like``."""
    if token_type_ids is not None:
        return token_type_ids
    return torch.zeros(_batch_and_length(like), dtype=torch.long, device=like.device)


def default_position_ids(
    position_ids: torch.Tensor | None, like: torch.Tensor, rule: str, padding_idx: int | None = None
) -> torch.Tensor:
    """``position_ids``, or what the model computes without them (the rule `fx_lntune.inputs` checked eagerly):

    - ``"arange"``: ``0 .. n-1`` in every row (llama, gpt2, bert);
    - ``"padding_offset"``: RoBERTa's ids from ``like`` = input_ids, counting non-padding tokens after
      ``padding_idx`` (transformers' own ``create_position_ids_from_input_ids`` formula);
    - ``"mask_cumsum"``: OPT's ids from ``like`` = the attention mask, ``cumsum(mask) * mask - 1``.
    """
    if position_ids is not None:
        return position_ids
    batch, length = _batch_and_length(like)
    if rule == "arange":
        return torch.arange(length, device=like.device).unsqueeze(0).expand(batch, length)
    if rule == "padding_offset":
        mask = like.ne(padding_idx).int()
        return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + padding_idx
    if rule == "mask_cumsum":
        return (torch.cumsum(like, dim=1) * like - 1).long()
    raise ValueError(f"unknown position-id rule {rule!r}")


def default_decoder_input_ids(
    decoder_input_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    shift: str,
    pad_token_id: int | None,
    decoder_start_token_id: int | None,
) -> torch.Tensor:
    """``decoder_input_ids``, or the labels shifted right by the model's own function, as its forward does.

    ``shift`` is ``"module:Class.prepare_decoder_input_ids_from_labels"`` (called on a stand-in holding the two
    token ids as its config) or ``"module:shift_tokens_right"`` (called with them). Neither given: an error, as
    the model raises one.
    """
    if decoder_input_ids is not None:
        return decoder_input_ids
    if labels is None:
        raise LNTuneTraceError(
            "this encoder-decoder graph needs decoder_input_ids, or labels to derive them from (shifted right, as "
            "the model does); pass one of them."
        )
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise LNTuneTraceError(
            f"labels of shape {shape} cannot give decoder_input_ids: pass labels of shape (batch, target length), "
            "token ids with -100 where no loss is wanted."
        )
    if decoder_start_token_id is None:
        raise LNTuneTraceError(
            "labels without decoder_input_ids: the model's config (and generation config) has no "
            "decoder_start_token_id to shift the labels right with, so the model itself cannot derive the decoder "
            "inputs either; pass decoder_input_ids, or set model.config.decoder_start_token_id (usually the pad id) "
            "before lntune_transform."
        )
    function = resolve(shift)
    if shift.endswith(".prepare_decoder_input_ids_from_labels"):
        model_class = resolve(shift.rpartition(".")[0])
        return function(_StandIn(model_class, pad_token_id, decoder_start_token_id), labels)
    return function(labels, pad_token_id, decoder_start_token_id)


class _StandIn:
    """What a model method reading ``self.config`` and the class's other methods (T5's ``_shift_right``) sees."""

    def __init__(self, model_class: type, pad_token_id: int | None, decoder_start_token_id: int | None) -> None:
        self.config = SimpleNamespace(pad_token_id=pad_token_id, decoder_start_token_id=decoder_start_token_id)
        self._model_class = model_class

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model_class, name).__get__(self)


_LOSS_MAPPING = "transformers.loss.loss_utils:LOSS_MAPPING"


def check_labels(logits: torch.Tensor, labels: torch.Tensor, loss_type: str, num_labels: int | None = None) -> None:
    """Refuse labels whose shape the model's loss cannot take, before anything is computed."""
    if not isinstance(labels, torch.Tensor):
        raise LNTuneTraceError(f"labels must be a tensor, got {type(labels).__name__}.")
    if loss_type == "ForSequenceClassification":
        ok = labels.ndim >= 1 and labels.shape[0] == logits.shape[0] and labels.ndim <= 2
        ok = ok and (labels.ndim == 1 or labels.shape[1] in (1, num_labels))
        expected = f"({logits.shape[0]},) class ids, or ({logits.shape[0]}, {num_labels}) for multi-label/regression"
    else:
        ok = tuple(labels.shape) == tuple(logits.shape[:2])
        expected = f"{tuple(logits.shape[:2])} token ids (batch, sequence), -100 where no loss is wanted"
    if not ok:
        raise LNTuneTraceError(
            f"labels of shape {tuple(labels.shape)} do not fit the model's {loss_type} loss over logits of shape "
            f"{tuple(logits.shape)}: pass labels of shape {expected}."
        )


def model_loss(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    loss_type: str,
    vocab_size: int | None = None,
    num_labels: int | None = None,
    problem_type: str | None = None,
) -> torch.Tensor | None:
    """The model's own loss for ``labels`` (``None`` without labels): transformers' ``LOSS_MAPPING[loss_type]``.

    ``ForCausalLM`` shifts the labels; ``ForMaskedLM`` does not (what T5, BART and Whisper compute in their
    forward); ``ForSequenceClassification`` decides regression / single- / multi-label from ``num_labels``,
    ``problem_type`` and the labels' dtype, as the model does.
    """
    if labels is None:
        return None
    check_labels(logits, labels, loss_type, num_labels)
    function = resolve(_LOSS_MAPPING)[loss_type]
    if loss_type == "ForSequenceClassification":
        # HF's function reads (and on first use sets) config.problem_type: give it a stand-in, per call.
        config = SimpleNamespace(num_labels=num_labels, problem_type=problem_type)
        return function(labels, logits, config)
    return function(logits, labels, vocab_size)


def model_output(output_class: str, **fields: Any) -> Any:
    """The model's output object (``"module:Class"``, a transformers ``ModelOutput``) holding ``fields``; fields
    that are ``None`` (``loss`` without labels) are left out, as the model leaves them out."""
    return resolve(output_class)(**fields)


def scatter_image_features(
    inputs_embeds: torch.Tensor, image_mask: torch.Tensor, image_features: torch.Tensor
) -> torch.Tensor:
    """``inputs_embeds`` with the rows of ``image_features`` (all images' tokens, one per row) written where
    ``image_mask`` (the image-token positions, broadcast over the hidden dim) is set, in order: the merge of a
    llava-style model, checked for a feature count that fits the tokens at run time (the model's own check is
    dropped from the graph because export fixed it to the capture's image count).

    Raises:
        LNTuneTraceError: the number of image tokens in ``input_ids`` does not match the images' features.
    """
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        # A count read from the data cannot be traced; the traced program then checks nothing, as masked_scatter.
        return inputs_embeds.masked_scatter(image_mask, image_features.to(inputs_embeds.dtype))
    hidden = inputs_embeds.shape[-1]
    needed = int(image_mask.sum()) * hidden // image_mask.shape[-1]  # the mask may be (..., 1) or (..., hidden)
    if needed != image_features.numel():
        raise LNTuneTraceError(
            f"input_ids hold {needed // hidden} image tokens but pixel_values give {image_features.numel() // hidden} "
            "image feature vectors; put each image's tokens in the prompt (the processor does) or pass the "
            "images that go with them."
        )
    return inputs_embeds.masked_scatter(image_mask, image_features.to(inputs_embeds.dtype))


def image_list(image_features: torch.Tensor) -> list[torch.Tensor]:
    """Each image's features, ``list(image_features)`` over dim 0: the per-image list a llava model returns, as
    long as the image count at run time (a graph's own ``list`` call cannot be traced again)."""
    return list(image_features.unbind(0))


def attention_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
    """The mask the layers' attention takes, made once for all of them (`passes.attention.share_attention_mask`).

    A boolean mask (True: attend) that is exactly causal (no padding, query and key lengths equal) is ``None``:
    attention then runs with ``is_causal``, keeps no mask and may take a faster kernel, as the eager model decides
    outside tracing (transformers' ``_ignore_causal_mask_sdpa``). Any other boolean mask becomes the additive one
    ``scaled_dot_product_attention`` would make of it on every call (0 where True, -inf where False, in ``like``'s
    floating dtype), so that the layers share one instead of each keeping its own for backward. A float mask is
    returned as it is.
    """
    if mask.dtype != torch.bool or not like.is_floating_point():
        return mask
    length = mask.shape[-1]
    # Values are read only where there are any (not on the meta device) and no tracer sees them.
    if mask.device.type != "meta" and not is_tracing(mask) and mask.shape[-2] == length:
        causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
        if bool((mask == causal).all()):
            return None
    zero = torch.zeros((), dtype=like.dtype, device=mask.device)
    return zero.masked_fill(mask.logical_not(), float("-inf"))


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    unmasked_is_causal: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention``, also where the key and value have fewer heads than the query
    (grouped-query attention: key / value head ``j`` serves the ``query heads / key heads`` consecutive query heads
    from ``j * groups``, as the model's ``repeat_kv`` arranges them). With ``unmasked_is_causal``, a ``None`` mask
    means a causal one (`attention_mask`).

    Where the kernel takes the groups as they are (CPU with any mask; elsewhere without a mask: transformers'
    ``use_gqa_in_sdpa`` rule) the repeated key and value are never materialized (kept for backward, they cost two
    query-sized tensors per layer); elsewhere (CUDA with a mask would fall back to the math kernel) they are
    repeated as the model repeats them.
    """
    if attn_mask is None and unmasked_is_causal:
        is_causal = True
    # Head counts are constants of the model: plain bools also where a TorchScript trace reads sizes as tensors.
    grouped = bool(query.shape[1] != key.shape[1])
    if grouped and query.device.type != "cpu" and (attn_mask is not None or bool(key.shape[-1] > 256)):
        groups = int(query.shape[1] // key.shape[1])
        key, value = (_repeat_heads(tensor, groups) for tensor in (key, value))
        grouped = False
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=grouped
    )


def _repeat_heads(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    batch, heads, length, size = tensor.shape
    return tensor[:, :, None].expand(batch, heads, groups, length, size).reshape(batch, heads * groups, length, size)


# Re-tracing a pickled graph (`fx_lntune.capture._build.ReloadTracer`) must record these as nodes, not run them.
GRAPH_FUNCTIONS = (
    default_mask,
    default_token_type_ids,
    default_position_ids,
    default_decoder_input_ids,
    model_loss,
    model_output,
    scatter_image_features,
    image_list,
    attention_mask,
    attention,
)
