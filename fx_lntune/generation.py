"""Text generation with a tuned graph: Hugging Face's ``generate`` driving captured decoder steps with a KV cache.

transformers' own ``GenerationMixin.generate`` runs the decoding (strategies, logits processors, stopping criteria,
special tokens, the model's ``generation_config``); only the model's forward is replaced, by one that runs the
step graphs of `fx_lntune.capture.decoder` and keeps their keys/values in the cache object transformers passes
around. The step graphs call the tuned graph's own dispatch modules, so generation follows the active adapter,
a merged adapter and `disable_adapters` with no new capture; they are captured at the first call and kept for
the graph (again after anything that changes its dispatch modules, parameters or buffers, e.g. ``gm.to``)::

    generate(gm, ids)
      -> shell.generate(ids, cache=DynamicCache())             # transformers' loop, on a meta-device shell
           -> forward(input_ids, attention_mask, cache, ...)   # ours: step graph(ids, mask, past) -> logits, present
"""

from __future__ import annotations

import copy
import difflib
import functools
import inspect
import logging
import time
import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture.decoder import (
    GENERATION_KEY,
    CacheLayout,
    cache_name,
    capture_image_step,
    capture_step,
    causal_step,
    encoder_forward,
    image_token,
    model_shell,
    read_cache,
    runnable_step,
    seq2seq_step,
    write_cache,
)
from fx_lntune.dispatch import AdapterDispatch
from fx_lntune.errors import LNTuneGenerationError
from fx_lntune.state import LNTuneState, get_state
from fx_lntune.static_decode import STATIC, generate_static, is_requested

__all__ = ["generate", "generation_state", "decoder_for", "Decoder"]

log = logging.getLogger(__name__)

# `GenerationMixin.generate`'s own arguments that fx_lntune.generate passes through.
_GENERATE_ARGUMENTS = frozenset(
    {
        "logits_processor",
        "stopping_criteria",
        "prefix_allowed_tokens_fn",
        "synced_gpus",
        "streamer",
        "negative_prompt_ids",
        "negative_prompt_attention_mask",
        "use_model_defaults",
        "tokenizer",
        "compile_config",  # GenerationConfig fields that transformers 4.x leaves out of to_dict() when unset
        "disable_compile",
    }
)
# Arguments that would need what a step graph does not compute, or a cache other than ours.
_REFUSED = {
    "output_attentions": "the step graphs return logits and the cache only",
    "output_hidden_states": "the step graphs return logits and the cache only",
    "cache_implementation": "fx_lntune.generate decodes with its own dynamic KV cache, or with a preallocated one "
    "and a compiled step for cache_implementation='static'",
    "cache_config": "fx_lntune.generate always decodes with its own dynamic KV cache",
    "use_cache": "fx_lntune.generate always decodes with its own dynamic KV cache",
    "assistant_model": "assisted generation is not supported",
    "custom_generate": "custom generation code from the Hub is not supported",
}


def generation_state(model: nn.Module) -> dict[str, Any]:
    """What `lntune_transform` keeps in ``LNTuneState.extra`` so that the graph can generate later: the model's
    class and its own ``generation_config`` (a copy). Empty for a model that cannot generate."""
    can_generate = getattr(model, "can_generate", None)
    if not callable(can_generate) or not can_generate() or getattr(model, "generation_config", None) is None:
        return {}
    return {GENERATION_KEY: {"model_class": type(model), "generation_config": copy.deepcopy(model.generation_config)}}


def generate(
    gm: torch.fx.GraphModule,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    generation_config: Any = None,
    **kwargs: Any,
) -> torch.LongTensor:
    """Generate token ids with what ``gm`` computes now (active adapter, merged adapter, or the base model inside
    `disable_adapters`), as the Hugging Face model's ``generate`` would: prompt plus new tokens, batches
    left-padded with ``attention_mask``, ``kwargs`` as ``GenerationConfig`` takes them (``max_new_tokens``,
    ``do_sample``, ``top_p``, ``eos_token_id``, ...) over the model's own ``generation_config``.

    Decoding runs transformers' ``generate`` with a KV cache: the prompt is computed once, then one token per
    step. The step graphs are captured at the first call (a few seconds: three layers traced, the rest copied;
    logged at INFO level) and kept. For an encoder-decoder,
    ``input_ids`` go to the encoder (once) and ``decoder_input_ids`` may start the decoder. ``gm`` is not changed.
    ``cache_implementation="static"`` (decoder-only models) decodes with preallocated buffers and a step compiled by
    ``torch.compile`` (`fx_lntune.static_decode`; ``disable_compile``, ``compile_config`` as transformers takes them).
    A tokenizer's output (a ``BatchEncoding`` or dict) may come as ``input_ids``: it is read as ``**enc``.

    Raises:
        LNTuneGenerationError: the model cannot generate (an encoder-only or classification model), or an
            argument is unknown or not supported.
    """
    state = get_state(gm)
    _check_can_generate(gm, state)
    if isinstance(input_ids, Mapping):  # a tokenizer's output passed positionally: read as model.generate(**enc)
        encoded = dict(input_ids)
        if attention_mask is not None:
            encoded.setdefault("attention_mask", attention_mask)
        input_ids, attention_mask = encoded.pop("input_ids", None), encoded.pop("attention_mask", None)
        kwargs = {**encoded, **kwargs}
    _check_arguments(kwargs, encoder_decoder=bool(gm.config.is_encoder_decoder), images=_takes_images(gm.config))
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise LNTuneGenerationError(
            f"generate needs input_ids, a 2-D tensor of token ids (batch, sequence); got "
            f"{type(input_ids).__name__ if not isinstance(input_ids, torch.Tensor) else tuple(input_ids.shape)}."
        )
    decoder = decoder_for(gm, state)
    if is_requested(kwargs, generation_config):
        return generate_static(decoder, input_ids, attention_mask, generation_config, kwargs)
    return decoder.generate(input_ids, attention_mask, generation_config, kwargs)


# One Decoder per tuned graph, dropped with the graph; a copy of the graph captures its own.
_DECODERS: weakref.WeakKeyDictionary[torch.fx.GraphModule, Decoder] = weakref.WeakKeyDictionary()


def decoder_for(gm: torch.fx.GraphModule, state: LNTuneState | None = None) -> Decoder:
    """The `Decoder` of ``gm``: made at the first call and kept while ``gm``'s dispatch modules, parameters and
    buffers stay the same objects (with the same dtype and device)."""
    state = get_state(gm) if state is None else state
    _check_can_generate(gm, state)
    signature = _signature(gm)
    decoder = _DECODERS.get(gm)
    if decoder is None or decoder.signature != signature:
        decoder = Decoder(gm, state, signature)
        _DECODERS[gm] = decoder
    return decoder


def _check_can_generate(gm: torch.fx.GraphModule, state: LNTuneState) -> None:
    what = f"{state.model_class or 'this model'} ({state.model_type or 'unknown type'})"
    if GENERATION_KEY not in state.extra or getattr(gm, "config", None) is None:
        raise LNTuneGenerationError(
            f"{what} cannot generate text: it has no language-model head (transformers' can_generate() is False). "
            "Capture a model that can, e.g. *ForCausalLM or *ForConditionalGeneration."
        )
    config = gm.config
    if config.is_encoder_decoder and state.extra[GENERATION_KEY]["model_class"].main_input_name != "input_ids":
        raise LNTuneGenerationError(
            f"{what} generates from {state.extra[GENERATION_KEY]['model_class'].main_input_name!r}; fx_lntune.generate "
            "supports decoder-only and text encoder-decoder models (input_ids). Use apply_to_model and the model's "
            "own generate."
        )
    if getattr(config, "vision_config", None) is not None and not _takes_images(config):
        raise LNTuneGenerationError(
            f"{what} is a multimodal model without an image token; fx_lntune.generate supports text models and "
            "llava-style models (image tokens in input_ids, pixel_values). Use apply_to_model and the model's own "
            "generate."
        )


def _takes_images(config: Any) -> bool:
    """A llava-style model: image features replace image tokens of ``input_ids`` in the prompt."""
    return getattr(config, "vision_config", None) is not None and image_token(config) is not None


def _without_image_features(signature: inspect.Signature) -> inspect.Signature:
    """``signature`` without ``mm_encoder_outputs``: transformers >= 5 then hands the prefill ``pixel_values`` to
    the forward (for the image step graph) instead of encoding the images eagerly with the model's own code."""
    parameters = [p for name, p in signature.parameters.items() if name != "mm_encoder_outputs"]
    return signature.replace(parameters=parameters)


def _signature(gm: torch.fx.GraphModule) -> tuple:
    """What the shell and step graphs hold of ``gm``: its dispatch modules (which route to adapters themselves,
    so switching or merging inside them changes nothing here) and every other tensor, by object, dtype and device.

    Computed at every `generate` call, so one walk over the modules (named_parameters would walk them twice)."""
    modules, tensors, stack = [], [], [("", gm)]
    while stack:
        path, module = stack.pop()
        if isinstance(module, AdapterDispatch):
            modules.append((path, id(module)))
            continue
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is not None:
                    tensors.append((path, name, id(tensor), tensor.dtype, tensor.device))
        stack += [(f"{path}.{name}" if path else name, child) for name, child in module._modules.items() if child]
    return tuple(modules), tuple(tensors)


def _attention_window(config: Any) -> float:
    """The sequence length from which the model's attention masks keys even where nothing is padded: its sliding
    window or attention chunk (transformers' ``local_attention_size``), the smallest where it has several; infinite
    for full attention."""
    configs = (config, getattr(config, "text_config", None))  # a llava-style model's language model has its own
    sizes = [getattr(part, name, None) for part in configs for name in ("sliding_window", "attention_chunk_size")]
    return min((size for size in sizes if isinstance(size, int) and not isinstance(size, bool)), default=float("inf"))


@functools.cache
def _generation_config_fields() -> frozenset[str]:
    """The fields of transformers' ``GenerationConfig`` (made once: a config's ``to_dict`` deep-copies it, a fraction
    of a millisecond that every `generate` call would pay)."""
    from transformers import GenerationConfig

    return frozenset(GenerationConfig().to_dict())


def _check_arguments(kwargs: Mapping[str, Any], *, encoder_decoder: bool, images: bool = False) -> None:
    for name, reason in _REFUSED.items():
        allowed = {"use_cache": (None, False, True), "cache_implementation": (None, STATIC)}.get(name, (None, False))
        if name in kwargs and kwargs[name] not in allowed:
            raise LNTuneGenerationError(f"generate argument {name}={kwargs[name]!r} is not supported: {reason}.")
    known = set(_generation_config_fields()) | _GENERATE_ARGUMENTS | set(_REFUSED)
    if encoder_decoder:
        known.add("decoder_input_ids")
    if images:
        known.add("pixel_values")
    unknown = [name for name in kwargs if name not in known]
    if unknown:
        hints = {name: difflib.get_close_matches(name, sorted(known), n=1) for name in unknown}
        hint = "; ".join(f"{name!r}: did you mean {close[0]!r}?" for name, close in hints.items() if close)
        raise LNTuneGenerationError(
            f"unknown generate argument(s) {unknown}{' (' + hint + ')' if hint else ''}. generate takes input_ids, "
            "attention_mask, generation_config and what GenerationConfig takes (max_new_tokens, do_sample, "
            "temperature, top_k, top_p, repetition_penalty, eos_token_id, pad_token_id, ...)."
        )


class Decoder:
    """A tuned graph's generation machinery: the meta-device model shell transformers' ``generate`` runs on, its
    step graphs (captured on first use), and the forward that runs them.

    ``graphs`` maps a step's name (``"step"``/``"step_positions"``, or ``"encoder"``, ``"decoder_first"``,
    ``"decoder_next"``) to its ``GraphModule``.
    """

    def __init__(self, gm: torch.fx.GraphModule, state: LNTuneState, signature: tuple) -> None:
        self.signature = signature
        self.shell = model_shell(gm, state)
        self.encoder_decoder = bool(getattr(gm.config, "is_encoder_decoder", False))
        self.cache_name = cache_name(self.shell)
        self.graphs: dict[str, torch.fx.GraphModule] = {}
        # What runs, per step graph and whether its attention is unmasked: its copy to run as Python code (None
        # where the model's attention cannot be unmasked); and the length from which a sliding window or attention
        # chunk would mask keys even without padding.
        self.runnable: dict[tuple[str, bool], torch.fx.GraphModule | None] = {}
        self.window = _attention_window(gm.config)
        self.layout = self._probe_layout()
        self._forward_signature = _without_image_features(inspect.signature(self.shell.forward))

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, generation_config: Any, kwargs: dict
    ) -> torch.LongTensor:
        model_kwargs: dict[str, Any] = dict(kwargs)
        # The step graphs always extend a KV cache; without it transformers would feed the whole sequence at every
        # step (a model config saved with use_cache=False, as after gradient checkpointing, asks for that).
        model_kwargs["use_cache"] = True
        if attention_mask is not None:
            model_kwargs["attention_mask"] = attention_mask
        if generation_config is not None:
            model_kwargs["generation_config"] = generation_config
        model_kwargs[self.cache_name] = self._new_cache()
        shell = self.shell
        with torch.no_grad():
            if self.encoder_decoder:
                model_kwargs["encoder_outputs"] = self._encode(input_ids, attention_mask, generation_config)
                if attention_mask is None:
                    model_kwargs["attention_mask"] = model_kwargs["encoder_outputs"].attention_mask

            def forward(**inputs: Any) -> Any:
                return self._forward(**inputs)

            forward.__signature__ = self._forward_signature  # transformers reads the forward's parameters
            shell.forward = forward
            try:
                return shell.generate(input_ids, **model_kwargs)
            finally:
                del shell.forward

    def graph(self, name: str) -> torch.fx.GraphModule:
        """The step graph ``name``, captured now if it was not yet (logged: the first call waits seconds for it)."""
        if name not in self.graphs:
            what = f"the {name} graph of {type(self.shell).__name__}"
            log.info("fx_lntune.generate: capturing %s (once per tuned graph) ...", what)
            start = time.perf_counter()
            self.graphs[name] = self._capture(name)
            log.info("fx_lntune.generate: captured %s in %.1f s", what, time.perf_counter() - start)
        return self.graphs[name]

    def _run(self, name: str, unmasked: bool = False) -> torch.fx.GraphModule | None:
        """The step graph ``name`` as it is run (`capture.decoder.runnable_step`), made at first use and kept."""
        if (name, unmasked) not in self.runnable:
            self.runnable[name, unmasked] = runnable_step(self.graph(name), unmasked=unmasked)
        return self.runnable[name, unmasked]

    def _step(self, name: str, mask: torch.Tensor, length: int, past_length: int) -> torch.fx.GraphModule:
        """The causal step graph ``name`` to run, unmasked where the mask masks nothing (no padding, and the
        prompt's first step or one new token: transformers' own rule for dropping the mask, the eager model's
        ``_ignore_causal_mask_sdpa``)."""
        if (past_length == 0 or length == 1) and mask.shape[1] == past_length + length < self.window:
            unmasked = self._run(name, unmasked=True)
            if unmasked is not None and bool(mask.all()):
                return unmasked
        return self._run(name)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache, EncoderDecoderCache

        # A full (unwindowed) dynamic cache: the step graphs were captured with one, whatever the model's default.
        return EncoderDecoderCache(DynamicCache(), DynamicCache()) if self.encoder_decoder else DynamicCache()

    def _probe_layout(self) -> CacheLayout:
        """The cache's per-layer shapes, from one eager forward of two tokens through the shell."""
        shell, ids = self.shell, torch.full((1, 2), 3, dtype=torch.long, device=self.shell.device)
        inputs = {"input_ids": ids, "use_cache": True, "return_dict": True, self.cache_name: self._new_cache()}
        if self.encoder_decoder:
            inputs["decoder_input_ids"] = ids[:, :1]
        with torch.no_grad():
            out = type(shell).forward(shell, **inputs)
        present, cross = read_cache(out[self.cache_name])
        shapes = tuple((key.shape[1], key.shape[3]) for key in present[::2])
        cross_shapes = tuple((key.shape[1], key.shape[3]) for key in cross[::2]) if cross else None
        return CacheLayout(shapes, cross_shapes, present[0].dtype)

    def _capture(self, name: str) -> torch.fx.GraphModule:
        shell, layout, dyn = self.shell, self.layout, torch.export.Dim.DYNAMIC
        device = shell.device
        class_name = type(shell).__name__ + "".join(part.title() for part in name.split("_"))
        if name in ("step_images", "step_images_positions"):
            return capture_image_step(shell, layout, positions=name.endswith("positions"), class_name=class_name)
        batch, sequence, past_length = 2, 3, 4
        ids = torch.full((batch, sequence), 3, dtype=torch.long, device=device)
        past = tuple(
            torch.zeros(batch, heads, past_length, dim, dtype=layout.dtype, device=device)
            for heads, dim in layout.self_attention
            for _ in range(2)
        )
        # One past length for every layer: one size in the graph, read by no layer of its own (so that a shortened
        # capture finds each layer's past read by that layer only).
        past_length_dim = torch.export.Dim("past_length")
        past_dims = tuple({0: dyn, 2: past_length_dim} for _ in past)
        if name in ("step", "step_positions"):
            mask = torch.ones(batch, past_length + sequence, dtype=torch.long, device=device)
            args = (ids, mask, past)
            if name == "step_positions":
                args += (torch.arange(past_length, past_length + sequence, device=device).expand(batch, -1),)
            dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}, "past": past_dims}
            dynamic["position_ids"] = {0: dyn, 1: dyn}
            return capture_step(shell, causal_step(shell, last_only=True), args, dynamic, class_name, shorten=True)
        mask = torch.ones(batch, sequence + 1, dtype=torch.long, device=device)
        if name == "encoder":
            ids = torch.full((batch, sequence + 1), 3, dtype=torch.long, device=device)
            dynamic = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}}
            return capture_step(shell, encoder_forward(shell), (ids, mask), dynamic, class_name)
        hidden = torch.zeros(batch, sequence + 1, shell.config.d_model, dtype=layout.dtype, device=device)
        dynamic = {
            "decoder_input_ids": {0: dyn, 1: dyn},
            "encoder_hidden_states": {0: dyn, 1: dyn},
            "attention_mask": {0: dyn, 1: dyn},
            "past": past_dims,
        }
        args = (ids, hidden, mask, past)
        if name == "decoder_next":
            cross = tuple(
                torch.zeros(batch, heads, sequence + 1, dim, dtype=layout.dtype, device=device)
                for heads, dim in layout.cross_attention
                for _ in range(2)
            )
            args += (cross,)
            dynamic["cross"] = tuple({0: dyn, 2: dyn} for _ in cross)
        return capture_step(shell, seq2seq_step(shell), args, dynamic, class_name)

    def _encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, generation_config: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        if attention_mask is None:
            attention_mask = self._default_mask(input_ids, generation_config)
        hidden = self._run("encoder")(input_ids, attention_mask)
        outputs = BaseModelOutput(last_hidden_state=hidden)
        outputs.attention_mask = attention_mask
        return outputs

    def _default_mask(self, input_ids: torch.Tensor, generation_config: Any) -> torch.Tensor:
        """transformers' rule: padding tokens are masked when the pad token is not also the eos token."""
        config = generation_config if generation_config is not None else self.shell.generation_config
        pad, eos = getattr(config, "pad_token_id", None), getattr(config, "eos_token_id", None)
        eos = eos if isinstance(eos, list) else [eos]
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            return input_ids.ne(pad).long()
        return torch.ones_like(input_ids)

    def _forward(self, **kwargs: Any) -> Any:
        """The model's forward for transformers' ``generate``: one step graph call; the cache object is updated
        in place with the graph's present keys/values."""
        from transformers.modeling_outputs import CausalLMOutputWithPast, Seq2SeqLMOutput

        cache = kwargs[self.cache_name]
        past, cross = read_cache(cache)
        if self.encoder_decoder:
            ids = kwargs["decoder_input_ids"]
            hidden = kwargs["encoder_outputs"][0]
            mask = kwargs.get("attention_mask")
            if mask is None:
                mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
            past = past or self.layout.empty_past(ids.shape[0], ids.device)
            if cross:
                outputs = self._run("decoder_next")(ids, hidden, mask, *past, *cross)
            else:
                outputs = self._run("decoder_first")(ids, hidden, mask, *past)
            count = len(past)
            write_cache(cache, outputs[1 : 1 + count], None if cross else outputs[1 + count :])
            return Seq2SeqLMOutput(logits=outputs[0], **{self.cache_name: cache})
        ids = kwargs["input_ids"]
        positions = kwargs.get("position_ids")
        mask = kwargs.get("attention_mask")
        past_length = past[0].shape[2] if past else 0
        if mask is None:
            mask = torch.ones(ids.shape[0], past_length + ids.shape[1], dtype=torch.long, device=ids.device)
        past = past or self.layout.empty_past(ids.shape[0], ids.device)
        pixels = kwargs.get("pixel_values")  # the prefill's images; transformers drops them from later steps
        if pixels is not None:
            step = self._run("step_images" if positions is None else "step_images_positions")
            outputs = step(ids, mask, *past, pixels, *(() if positions is None else (positions,)))
        elif positions is None:
            outputs = self._step("step", mask, ids.shape[1], past_length)(ids, mask, *past)
        else:
            outputs = self._step("step_positions", mask, ids.shape[1], past_length)(ids, mask, *past, positions)
        write_cache(cache, outputs[1:])
        return CausalLMOutputWithPast(logits=outputs[0], **{self.cache_name: cache})
