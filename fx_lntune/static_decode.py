"""Generation with a preallocated KV cache and a compiled decode step (``cache_implementation="static"``).

transformers' ``generate`` loop runs as for the default cache (`fx_lntune.generation`); only the model's forward
differs. The prompt goes through the default step graph once; its keys/values are copied into buffers of a fixed
number of slots, and every next token runs one `static_step` graph: the same step graph called with the whole
buffers as its past and a mask that hides the slots not yet filled, then an in-place write of the token's
keys/values into its slot. Every shape stays the same from token to token, so ``torch.compile`` (Inductor by
default) compiles the step once per batch size and slot count (a power of two: prompts and lengths of the same
bucket share it) and the compiled step is kept with the graph::

    generate(gm, ids, cache_implementation="static")
      -> shell.generate(ids, cache=DynamicCache())        # transformers' loop, as for the default cache
           prompt:  step(ids, mask, past=())              -> buffers[:, :, :S] = present (uncompiled, as by default)
           token t: compiled static_step(ids, mask[B, slots + 1], position_ids, slot, *buffers) -> logits

The norms stay the tuned graph's dispatch modules, whose parameters the compiled code reads as inputs, so
`set_adapter`, `merge_adapter` and `disable_adapters` need no new compile. ``disable_compile=True`` runs the same
step uncompiled; ``compile_config`` (transformers' ``CompileConfig``) sets torch.compile's backend, mode and options.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture.decoder import write_cache
from fx_lntune.errors import LNTuneGenerationError
from fx_lntune.passes.cpu_linear import route_linear_to_onednn

__all__ = ["STATIC", "is_requested", "generate_static", "static_step", "StaticDecoder", "slot_count"]

STATIC = "static"
_MIN_SLOTS = 64
# torch.compile's arguments when no compile_config is given: one graph, fixed shapes (a new batch size or slot
# count compiles once more), Inductor's default mode (CUDA graphs, HF's "reduce-overhead", do not apply on a CPU).
_DEFAULT_COMPILE = {"backend": "inductor", "fullgraph": True, "dynamic": False, "mode": None, "options": None}
# The generate arguments that choose the cache and its compilation: answered here, not passed on to transformers.
_CACHE_ARGUMENTS = ("cache_implementation", "compile_config", "disable_compile")


def _setting(name: str, kwargs: Mapping[str, Any], generation_config: Any) -> Any:
    """A generate argument as transformers reads it: the keyword, else the given ``generation_config``'s field."""
    if name in kwargs:
        return kwargs[name]
    return getattr(generation_config, name, None)


def is_requested(kwargs: Mapping[str, Any], generation_config: Any) -> bool:
    """Whether this generate call asks for the static cache (``cache_implementation="static"`` as a keyword or in
    the ``generation_config`` given)."""
    return _setting("cache_implementation", kwargs, generation_config) == STATIC


def slot_count(length: int) -> int:
    """The buffers' slot count for ``length`` tokens: the next power of two, at least 64, so that most prompt and
    output lengths fall in a few buckets and reuse one compiled step."""
    return max(_MIN_SLOTS, 1 << max(0, length - 1).bit_length())


def static_step(
    step: torch.fx.GraphModule, past_count: int, positions: bool, onednn: bool = False
) -> torch.fx.GraphModule:
    """The decode step on preallocated buffers, as a new ``GraphModule`` calling ``step`` (shared, not copied)::

        forward(input_ids[B, 1], attention_mask[B, slots + 1], position_ids[B, 1], slot[1], past_0, ..., past_{n-1})
            logits, *present = step(input_ids, attention_mask, past_0, ..., past_{n-1}, position_ids)
            past_i.index_copy_(2, slot, present_i[:, :, -1:])     # in place: the token's keys/values into its slot
            attention_mask.index_fill_(1, slot, 1)                # the slot is visible from the next token on
            return logits

    ``step`` is a default step graph (`fx_lntune.capture.decoder.causal_step`); it concatenates the token after the
    buffers, so the mask's last column (the token itself) is 1 and the others say which slots hold a token.
    Without ``positions`` the graph takes no ``position_ids`` (a model that derives positions from the mask).
    ``onednn``: the step's linears run through oneDNN (`passes.cpu_linear`, for CPU weights), in this copy only.
    """
    graph = torch.fx.Graph()
    ids, mask = graph.placeholder("input_ids"), graph.placeholder("attention_mask")
    position_ids = graph.placeholder("position_ids") if positions else None
    slot = graph.placeholder("slot")
    past = tuple(graph.placeholder(f"past_{index}") for index in range(past_count))
    args = (ids, mask, *past, position_ids) if positions else (ids, mask, *past)  # step graphs take tensors flat
    outputs = graph.call_module("step", args)
    for index, buffer in enumerate(past):
        present = graph.call_function(operator.getitem, (outputs, index + 1))
        token = graph.call_function(torch.narrow, (present, 2, -1, 1))
        graph.call_method("index_copy_", (buffer, 2, slot, token))
    graph.call_method("index_fill_", (mask, 1, slot, 1))
    graph.output(graph.call_function(operator.getitem, (outputs, 0)))
    inner = _without_unused_attributes(step)
    if onednn:
        route_linear_to_onednn(inner)
    return torch.fx.GraphModule({"step": inner}, graph, class_name="StaticStep")


def _without_unused_attributes(step: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``step``'s graph without the attribute reads nothing uses (export leaves one per parameter, every adapter's
    copy included), in a new ``GraphModule`` sharing ``step``'s modules: torch.compile guards on what the code
    reads, and a read of an adapter's copy beside the dispatch module's route to it would make the guards depend on
    which adapter is active."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(step.graph, {}))
    graph._codegen = copy.deepcopy(step.graph._codegen)
    for node in list(graph.nodes):  # only these reads: other unused nodes may be state changes (vmap levels)
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    return torch.fx.GraphModule(step, graph, class_name=type(step).__name__)


@dataclass
class _Run:
    """One generate call's buffers: ``past`` (key, value per layer; ``slots`` positions each), ``mask`` (batch,
    slots + 1; the last column is the token being computed), and how many slots are filled."""

    past: tuple[torch.Tensor, ...] = ()
    mask: torch.Tensor | None = None
    filled: int = 0

    @property
    def slots(self) -> int:
        return self.past[0].shape[2] if self.past else 0

    def start(self, present: tuple[torch.Tensor, ...], mask: torch.Tensor, slots: int) -> None:
        batch, length = mask.shape
        self.past = tuple(
            torch.zeros(batch, key.shape[1], slots, key.shape[3], dtype=key.dtype, device=key.device) for key in present
        )
        for buffer, key in zip(self.past, present, strict=True):
            buffer[:, :, :length] = key
        self.mask = torch.zeros(batch, slots + 1, dtype=mask.dtype, device=mask.device)
        self.mask[:, :length] = mask
        self.mask[:, -1] = 1
        self.filled = length

    def grow(self, slots: int) -> None:
        """More slots (a longer generation than foreseen): the filled ones are copied into new buffers."""
        present = tuple(buffer[:, :, : self.filled] for buffer in self.past)
        mask = self.mask[:, : self.filled]
        self.start(present, mask, slots)

    def filled_past(self) -> tuple[torch.Tensor, ...]:
        return tuple(buffer[:, :, : self.filled] for buffer in self.past)


class StaticDecoder:
    """The static-cache machinery of one `fx_lntune.generation.Decoder` (its shell and step graphs): the
    `static_step` graphs and their compiled forms, made at first use and kept.

    ``compiled`` maps (step name, torch.compile arguments) to the compiled step; torch.compile itself keeps one
    compiled graph per batch size and slot count under it (see `torch._dynamo.utils.counters`).
    """

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.graphs: dict[str, torch.fx.GraphModule] = {}
        self.compiled: dict[tuple, Any] = {}

    def step(self, name: str, compile_options: dict[str, Any] | None) -> Any:
        """The static step over the default step graph ``name``, compiled with ``compile_options`` (or not, for
        ``None``)."""
        if name not in self.graphs:
            layers = self.decoder.layout.self_attention
            on_cpu = self.decoder.shell.device.type == "cpu"
            self.graphs[name] = static_step(self.decoder.graph(name), 2 * len(layers), name == "step_positions", on_cpu)
        graph = self.graphs[name]
        if compile_options is None:
            return graph
        key = (name, tuple(sorted((option, repr(value)) for option, value in compile_options.items())))
        if key not in self.compiled:
            self.compiled[key] = torch.compile(graph, **compile_options)
        return self.compiled[key]


_STATIC: weakref.WeakKeyDictionary[Any, StaticDecoder] = weakref.WeakKeyDictionary()


def _static_decoder(decoder: Any) -> StaticDecoder:
    static = _STATIC.get(decoder)
    if static is None:
        static = _STATIC[decoder] = StaticDecoder(decoder)
    return static


def _compile_options(kwargs: Mapping[str, Any], generation_config: Any) -> dict[str, Any] | None:
    """torch.compile's arguments for this call, or None for ``disable_compile=True``."""
    if _setting("disable_compile", kwargs, generation_config):
        return None
    config = _setting("compile_config", kwargs, generation_config)
    if config is None:
        return dict(_DEFAULT_COMPILE)
    fields = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(fields) - set(_DEFAULT_COMPILE))
    if unknown:
        raise LNTuneGenerationError(
            f"compile_config has fields {unknown} that torch.compile does not take; give a transformers "
            "CompileConfig (fullgraph, dynamic, backend, mode, options)."
        )
    return {**_DEFAULT_COMPILE, **fields}


def _planned_length(
    input_ids: torch.Tensor, kwargs: Mapping[str, Any], generation_config: Any, shell: nn.Module
) -> int:
    """The longest sequence this call can produce, as transformers will work it out (``max_new_tokens`` over
    ``max_length``, the keyword over the given config over the model's); the buffers then never need to grow."""
    configs = [config for config in (generation_config, shell.generation_config) if config is not None]
    for name, offset in (("max_new_tokens", input_ids.shape[1]), ("max_length", 0)):
        value = kwargs.get(name)
        for config in configs:
            value = getattr(config, name, None) if value is None else value
        if value is not None:
            return int(value) + offset
    return input_ids.shape[1] + 20


@contextlib.contextmanager
def _parameters_frozen(module: nn.Module) -> Iterator[None]:
    """No parameter of ``module`` requires grad inside (restored after): torch.compile guards on ``requires_grad``,
    which `set_adapter` changes, and generation computes no gradient."""
    trainable = [param for param in module.parameters() if param.requires_grad]
    try:
        for param in trainable:
            param.requires_grad_(False)
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)


def _check_supported(decoder: Any, slots: int) -> None:
    config = decoder.shell.config
    if decoder.encoder_decoder:
        raise LNTuneGenerationError(
            "cache_implementation='static' supports decoder-only models; an encoder-decoder "
            f"({config.model_type}) generates with the default cache: leave cache_implementation unset."
        )
    window = getattr(config.get_text_config(decoder=True), "sliding_window", None)
    if window is not None and slots + 1 > window:
        raise LNTuneGenerationError(
            f"cache_implementation='static' needs {slots + 1} cache slots, more than the model's sliding window "
            f"({window}), which the static layout does not apply; generate with the default cache (leave "
            "cache_implementation unset) or fewer tokens."
        )


def generate_static(
    decoder: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    generation_config: Any,
    kwargs: dict[str, Any],
) -> torch.LongTensor:
    """`fx_lntune.generate` with ``cache_implementation="static"`` (see the module docstring) for ``decoder`` (a
    `fx_lntune.generation.Decoder`); the arguments as `fx_lntune.generation.Decoder.generate` takes them. The
    tokens are the default cache's (the prompt step is the same graph; each next token attends to the same keys,
    summed in another order, so logits may differ in the last bits).

    Raises:
        LNTuneGenerationError: an encoder-decoder model, a sliding window shorter than the buffers, or a
            ``compile_config`` torch.compile cannot take.
    """
    from transformers import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast

    compile_options = _compile_options(kwargs, generation_config)
    shell, name = decoder.shell, decoder.cache_name
    planned = slot_count(_planned_length(input_ids, kwargs, generation_config, shell) - 1)
    _check_supported(decoder, planned)
    static = _static_decoder(decoder)
    model_kwargs = {key: value for key, value in kwargs.items() if key not in _CACHE_ARGUMENTS}
    if generation_config is not None and any(getattr(generation_config, key, None) for key in _CACHE_ARGUMENTS):
        generation_config = copy.deepcopy(generation_config)
        for key in _CACHE_ARGUMENTS:
            setattr(generation_config, key, None)
    if generation_config is not None:
        model_kwargs["generation_config"] = generation_config
    if attention_mask is not None:
        model_kwargs["attention_mask"] = attention_mask
    model_kwargs["use_cache"] = True  # as for the default cache: the steps always extend a cache
    cache = model_kwargs[name] = DynamicCache()
    run = _Run()

    def forward(**inputs: Any) -> Any:
        ids, positions = inputs["input_ids"], inputs.get("position_ids")
        graph_name = "step" if positions is None else "step_positions"
        if not run.past:  # the prompt: the default step graph, uncompiled
            mask = inputs.get("attention_mask")
            mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device) if mask is None else mask
            empty = decoder.layout.empty_past(ids.shape[0], ids.device)
            args = (ids, mask, *empty) if positions is None else (ids, mask, *empty, positions)
            outputs = decoder.graph(graph_name)(*args)
            run.start(tuple(outputs[1:]), mask, max(planned, slot_count(ids.shape[1])))
            return CausalLMOutputWithPast(logits=outputs[0], **{name: cache})
        if run.filled + ids.shape[1] > run.slots:
            run.grow(slot_count(run.filled + ids.shape[1]))
        slot = torch.tensor([run.filled], device=ids.device)
        step = static.step(graph_name, compile_options)
        args = (ids, run.mask, slot) if positions is None else (ids, run.mask, positions, slot)
        logits = step(*args, *run.past)
        run.filled += 1
        return CausalLMOutputWithPast(logits=logits, **{name: cache})

    forward.__signature__ = inspect.signature(shell.forward)  # transformers reads the forward's parameters
    frozen = _parameters_frozen(decoder.shell) if compile_options is not None else contextlib.nullcontext()
    with torch.no_grad(), frozen:
        shell.forward = forward
        try:
            output = shell.generate(input_ids, **model_kwargs)
        finally:
            del shell.forward
    if run.past:  # a cache returned to the caller (return_dict_in_generate) holds what was computed
        write_cache(cache, run.filled_past())
    return output
