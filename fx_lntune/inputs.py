"""Capture inputs: which keyword inputs a model takes, small dummy values for them, and their dynamic dims.

Used by the capture front-ends when the user gives no `example_inputs`, and by `plan_inputs`, which decides the
tuned graph's keyword interface (which inputs are optional, what they default to, which loss ``labels`` give).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch.export import Dim

from fx_lntune import graph_inputs
from fx_lntune.capture._build import capture_mode
from fx_lntune.compat import model_token_id
from fx_lntune.errors import LNTuneTraceError
from fx_lntune.graph_inputs import default_decoder_input_ids

__all__ = [
    "default_input_names",
    "make_dummy_inputs",
    "dynamic_shapes_for",
    "check_example_inputs",
    "check_dynamic_sizes",
    "grow_size_one",
    "InputPlan",
    "plan_inputs",
]

# Inputs shaped (batch, sequence, ...): both leading dims vary from call to call. Any name starting with
# "decoder_" is treated the same way (decoder_input_ids, decoder_attention_mask, ...).
SEQUENCE_INPUTS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "position_ids", "labels", "inputs_embeds"}
)

_TOKEN_INPUTS = frozenset({"input_ids", "decoder_input_ids"})
_MASK_INPUTS = frozenset({"attention_mask", "decoder_attention_mask"})
# Config fields holding token ids that must not appear by chance in dummy input_ids.
_SPECIAL_TOKEN_FIELDS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "sep_token_id",
    "cls_token_id",
    "decoder_start_token_id",
    "image_token_id",
    "image_token_index",
    "video_token_id",
    "audio_token_id",
)


def _hf_config(model: torch.nn.Module) -> transformers.PretrainedConfig | None:
    config = getattr(model, "config", None)
    return config if isinstance(config, transformers.PretrainedConfig) else None


def default_input_names(model: torch.nn.Module) -> list[str]:
    """The keyword inputs a user of `model`'s class passes, main input first.

    For a Hugging Face model (one with a `PretrainedConfig` at `.config`) this starts from
    `model.main_input_name` and adds what the forward signature and config call for:

    - `input_ids` models: `attention_mask`; `pixel_values` when the config has a `vision_config`
      (llava-style multimodal models); `decoder_input_ids` when `config.is_encoder_decoder`.
    - `pixel_values` models (ViT): `pixel_values` only.
    - `input_features` models (Whisper): `decoder_input_ids` when `config.is_encoder_decoder`; no
      attention mask, since such features have a fixed, unpadded length.

    An extra input is only added when the forward accepts it by name. For any other module it is the
    forward's required parameters that can be passed by keyword. Reads `model` only.
    """
    parameters = inspect.signature(model.forward).parameters
    config = _hf_config(model)
    if config is None:
        keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [
            name
            for name, parameter in parameters.items()
            if parameter.kind in keyword_kinds and parameter.default is inspect.Parameter.empty
        ]

    main_input = getattr(model, "main_input_name", "input_ids")
    names = [main_input]
    if main_input == "input_ids":
        names.append("attention_mask")
        if getattr(config, "vision_config", None) is not None:
            names.append("pixel_values")
    if getattr(config, "is_encoder_decoder", False):
        names.append("decoder_input_ids")
    return [name for name in names if name in parameters or name == main_input]


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    tensors = [*model.parameters(), *model.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    floating = [tensor.dtype for tensor in tensors if tensor.is_floating_point()]
    return device, floating[0] if floating else torch.get_default_dtype()


def _config_field(config: Any, field: str, input_name: str) -> Any:
    value = getattr(config, field, None)
    if value is None:
        raise LNTuneTraceError(
            f"cannot make a dummy {input_name!r}: the model's config has no {field!r}; "
            f"pass example_inputs={{{input_name!r}: ..., ...}} with a real batch instead"
        )
    return value


def _image_token(config: Any) -> int | None:
    for field in ("image_token_id", "image_token_index"):
        value = getattr(config, field, None)
        if isinstance(value, int):
            return value
    return None


def _token_ids(config: Any, input_name: str, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab_size = _config_field(text_config, "vocab_size", input_name)
    # Special ids are avoided: a stray eos or image token changes control flow in some models
    # (BART's classification head counts eos tokens; llava matches image tokens to image features).
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    for source in {id(config): config, id(text_config): text_config}.values():
        for field in _SPECIAL_TOKEN_FIELDS:
            value = getattr(source, field, None)
            for token in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(token, int) and 0 <= token < vocab_size:
                    allowed[token] = False
    candidates = allowed.nonzero().squeeze(1)
    if candidates.numel() == 0:
        candidates = torch.arange(vocab_size)
    return candidates[torch.randint(candidates.numel(), shape, generator=gen)]


def _padded_mask(batch: int, seq: int) -> torch.Tensor:
    # The last position of row 0 is padding: with an all-ones mask a model may take a "no mask needed"
    # shortcut at capture time (transformers drops all-ones SDPA masks outside tracing), and the graph
    # would then ignore padding in real batches.
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -1] = 0
    return mask


def _image_size(vision_config: Any, input_name: str) -> tuple[int, int]:
    size = _config_field(vision_config, "image_size", input_name)
    if isinstance(size, Mapping):
        return int(size["height"]), int(size["width"])
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def make_dummy_inputs(
    model: torch.nn.Module, input_names: list[str], batch: int = 2, seq: int = 8
) -> dict[str, torch.Tensor]:
    """Small, deterministic dummy values for `input_names`, on the model's device, made from its config.

    Token ids are `torch.long`, below the vocabulary size and clear of special tokens; masks are
    `torch.long` with the last position of row 0 padded; float inputs use the model's floating dtype.
    `pixel_values` are `(batch, num_channels, *image_size)` (of `config.vision_config` when there is one;
    `num_channels` defaults to 3); `input_features` are `(batch, num_mel_bins, 2 * max_source_positions)`,
    Whisper's fixed length. When `pixel_values` go with `input_ids` in a model that has an image token
    (llava), each row starts with `config.image_seq_length` image tokens followed by `seq` text tokens.

    `batch` and `seq` must be at least 2: export specializes a dimension of size 1 to a constant.
    Raises `LNTuneTraceError` for an input it cannot make (unknown name, missing config field).
    Reads `model` only.
    """
    if batch < 2 or seq < 2:
        raise ValueError(f"batch and seq must be at least 2 for dynamic shapes, got {batch} and {seq}")
    device, float_dtype = _device_and_dtype(model)
    config = _hf_config(model)
    generator = torch.Generator().manual_seed(0)

    image_token = _image_token(config) if config is not None and "pixel_values" in input_names else None
    n_image_tokens = 0
    if image_token is not None:
        n_image_tokens = int(_config_field(config, "image_seq_length", "input_ids"))
    token_seq = seq + n_image_tokens

    inputs: dict[str, torch.Tensor] = {}
    for name in input_names:
        # Encoder-side token inputs also hold the image tokens; decoder-side ones are `seq` long.
        length = seq if name.startswith("decoder_") else token_seq
        if name in _MASK_INPUTS:
            value = _padded_mask(batch, length)
        elif name == "token_type_ids":
            value = torch.zeros(batch, length, dtype=torch.long)
        elif name == "position_ids":
            value = torch.arange(length).expand(batch, length).clone()
        elif name in _TOKEN_INPUTS and config is not None:
            value = _token_ids(config, name, (batch, length), generator)
            if name == "input_ids" and image_token is not None:
                value[:, :n_image_tokens] = image_token
        elif name == "pixel_values" and config is not None:
            vision_config = getattr(config, "vision_config", None) or config
            channels = getattr(vision_config, "num_channels", 3)
            height, width = _image_size(vision_config, name)
            value = torch.randn(batch, channels, height, width, generator=generator, dtype=float_dtype)
        elif name == "input_features" and config is not None:
            mel_bins = _config_field(config, "num_mel_bins", name)
            frames = 2 * _config_field(config, "max_source_positions", name)
            value = torch.randn(batch, mel_bins, frames, generator=generator, dtype=float_dtype)
        else:
            raise LNTuneTraceError(
                f"cannot make a dummy value for input {name!r} of {type(model).__name__}; "
                f"pass example_inputs={{{name!r}: ..., ...}} with a real batch instead"
            )
        inputs[name] = value.to(device)
    return inputs


def _dims_for(name: str, value: Any) -> dict[int, Any] | None:
    """The dynamic dims of one input: see `dynamic_shapes_for`."""
    if not isinstance(value, torch.Tensor):
        return None
    if value.ndim == 0:
        return {}
    if (name in SEQUENCE_INPUTS or name.startswith("decoder_")) and value.ndim >= 2:
        return {0: Dim.AUTO, 1: Dim.AUTO}
    return {0: Dim.AUTO}


def dynamic_shapes_for(inputs: Mapping[str, Any]) -> dict[str, dict[int, Any] | None]:
    """The `dynamic_shapes` spec for `torch.export.export(model, (), inputs, dynamic_shapes=...)`.

    Every dynamic dim is `Dim.AUTO`, so export finds the range and relations itself and keeps a dim
    static (instead of failing) where the model forces it:

    - `SEQUENCE_INPUTS` and names starting with `decoder_`: dims 0 (batch) and 1 (sequence), or dim 0
      alone for a 1-D tensor (sequence-classification labels).
    - Any other tensor, `pixel_values` and `input_features` included (their other dims are fixed by the
      config): dim 0 only, the batch. A 0-d tensor: nothing.
    - A value that is not a tensor (`None`, a flag): `None`, as export expects.

    The spec is flat, one entry per input, so every input must be a named parameter of the forward:
    export cannot take dynamic shapes for inputs that only reach the forward through `**kwargs`
    (`use_cache` in a transformers 5 BERT), whether nested or not (pytorch/pytorch#150022, #164313).
    """
    return {name: _dims_for(name, value) for name, value in inputs.items()}


_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def check_example_inputs(model: torch.nn.Module, inputs: Mapping[str, Any], source: str = "example_inputs") -> None:
    """Refuse capture inputs the graph could not be called with by keyword, before any front-end runs.

    Raises `LNTuneTraceError` when the forward takes its inputs only through ``*args``, when an input is not a
    named parameter of the forward (export cannot make a keyword that only reaches ``**kwargs`` dynamic), or
    when a parameter without a default is missing. ``source`` names the argument the names came from, for the
    message. Reads `model` only.
    """
    model_name = type(model).__name__
    parameters = inspect.signature(model.forward).parameters
    named = [name for name, parameter in parameters.items() if parameter.kind in _KEYWORD_KINDS]
    if not named and any(parameter.kind is inspect.Parameter.VAR_POSITIONAL for parameter in parameters.values()):
        raise LNTuneTraceError(
            f"{model_name}.forward takes its inputs only as *args, but fx-lntune captures and calls graphs by "
            "keyword. Wrap the model in a module whose forward names its inputs, e.g. "
            "`def forward(self, x): return model(x)`, and capture that."
        )
    unknown = [name for name in inputs if name not in named]
    if unknown:
        hints = {name: difflib.get_close_matches(name, named, n=3) for name in unknown}
        raise LNTuneTraceError(
            f"{source} {unknown} are not named parameters of {model_name}.forward (close names: {hints}); "
            f"its keyword inputs are {named}. Rename or drop them."
        )
    missing = [
        name
        for name, parameter in parameters.items()
        if parameter.kind in _KEYWORD_KINDS and parameter.default is inspect.Parameter.empty and name not in inputs
    ]
    if missing:
        raise LNTuneTraceError(f"{source} lack {missing}, which {model_name}.forward requires; add a value for each.")


def check_dynamic_sizes(inputs: Mapping[str, Any]) -> None:
    """Refuse a dynamic dimension of size 1 (see `dynamic_shapes_for`): `torch.export` fixes such a dimension
    to 1, and the graph would then fail on any other batch size or sequence length. Raises `LNTuneTraceError`."""
    for name, dims in dynamic_shapes_for(inputs).items():
        for dim in dims or {}:
            if inputs[name].shape[dim] < 2:
                what = "batch size" if dim == 0 else "sequence length"
                raise LNTuneTraceError(
                    f"example_inputs[{name!r}] has {what} 1 (dim {dim}); torch.export would fix that dimension "
                    f"to 1 and the graph would accept no other size. Capture with a {what} of at least 2."
                )


def grow_size_one(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` with every dynamic dimension of size 1 doubled (the slice repeated), so that one example is
    enough to capture a graph for any batch and length: `torch.export` would fix a size-1 dimension to 1.

    A mask that grew and holds no padding gets its last position of the last row padded (see `_padded_mask`).
    Returns new tensors where something grew; the caller's tensors are not changed.
    """
    grown: dict[str, Any] = {}
    for name, dims in dynamic_shapes_for(inputs).items():
        value = inputs[name]
        changed = False
        for dim in dims or {}:
            if value.shape[dim] == 1:
                value = torch.cat([value, value], dim=dim)
                changed = True
        if changed and (name in _MASK_INPUTS) and bool(value.bool().all()):
            value = value.clone()
            value[-1, -1] = 0
        grown[name] = value
    return grown


@dataclass
class InputPlan:
    """The tuned graph's keyword interface, decided before capture (see `plan_inputs`).

    - ``capture_inputs``: the values the front-end captures with (every input of the graph but ``labels``);
    - ``signature``: the forward's parameters in order, those without a default first;
    - ``defaults``: each optional input's default, ``(function in fx_lntune.graph_inputs, extra arguments)``,
      ``"@name"`` naming another input (see `passes.keyword_inputs`);
    - ``loss``: ``LOSS_MAPPING`` key and constants for ``labels``, or ``None`` when the graph takes no labels;
    - ``output_class``: the model's output class, from an eager run (``None`` when unknown).
    """

    capture_inputs: dict[str, Any]
    signature: list[str]
    defaults: dict[str, tuple[str, tuple]] = dataclasses.field(default_factory=dict)
    loss: dict[str, Any] | None = None
    output_class: type | None = None


# Inputs a model computes itself when left out, in the order their defaults are filled (later ones read earlier).
_OPTIONAL_ORDER = ("decoder_input_ids", "attention_mask", "decoder_attention_mask", "token_type_ids", "position_ids")


def plan_inputs(model: torch.nn.Module, example_inputs: Mapping[str, Any]) -> InputPlan:
    """Decide the tuned graph's inputs for ``model`` captured from ``example_inputs`` (reads ``model`` only).

    For a Hugging Face model the graph takes the example's inputs and, by keyword and optional, each of
    ``attention_mask``, ``token_type_ids``, ``position_ids``, ``decoder_attention_mask`` that the forward takes
    and whose default (ones, zeros, the position ids of `fx_lntune.graph_inputs.default_position_ids`) gives what
    the model computes without it. That is checked by running the model eagerly on the example with and without
    the input (two small forwards per input; skipped on the meta device, where only the masks are taken). With a
    loss transformers knows for the class, ``labels`` too, and for encoder-decoders ``decoder_input_ids`` become
    optional (the labels shifted by the model's own function). Example inputs of batch or length 1 are grown to 2
    (`grow_size_one`). Any other module keeps exactly the example's inputs.
    """
    inputs = grow_size_one(example_inputs)
    config = _hf_config(model)
    if config is None:
        return InputPlan(capture_inputs=inputs, signature=list(inputs))
    parameters = list(inspect.signature(model.forward).parameters)
    loss = _loss_spec(model, config) if "labels" in parameters else None
    derive_decoder_inputs = "decoder_input_ids" in parameters and "decoder_input_ids" not in inputs
    if loss is not None and "labels" in inputs and derive_decoder_inputs:
        # An encoder-decoder example with labels only: capture with the decoder inputs the model would derive
        # (the graph derives them again at run time); a missing decoder start id is named here, not at export.
        spec = _shift_spec(model, config) if getattr(config, "is_encoder_decoder", False) else None
        if spec is not None:
            inputs["decoder_input_ids"] = default_decoder_input_ids(None, inputs["labels"], *spec)
    if loss is not None:  # computed after the captured code (`passes.model_loss`), so that labels are optional
        inputs.pop("labels", None)
    on_meta = any(tensor.is_meta for tensor in [*model.parameters(), *model.buffers()])

    candidates: dict[str, list[tuple[str, tuple]]] = {}
    if "input_ids" in inputs:
        candidates["attention_mask"] = [("default_mask", ("@input_ids",))]
        candidates["token_type_ids"] = [("default_token_type_ids", ("@input_ids",))]
        rules = [("default_position_ids", ("@input_ids", "arange"))]
        pad = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "pad_token_id", None)
        if isinstance(pad, int):
            rules.append(("default_position_ids", ("@input_ids", "padding_offset", pad)))
        if "attention_mask" in inputs:
            rules.append(("default_position_ids", ("@attention_mask", "mask_cumsum")))
        candidates["position_ids"] = rules
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in inputs:
        candidates["decoder_attention_mask"] = [("default_mask", ("@decoder_input_ids",))]
    candidates = {name: rules for name, rules in candidates.items() if name in parameters}

    checker = _DefaultChecker(model, inputs) if not on_meta else None
    defaults: dict[str, tuple[str, tuple]] = {}
    shift = _shift_spec(model, config) if loss is not None and "decoder_input_ids" in inputs else None
    if shift is not None:
        defaults["decoder_input_ids"] = ("default_decoder_input_ids", ("@labels", *shift))
    for name, rules in candidates.items():
        if checker is None:
            chosen = rules[0] if name.endswith("attention_mask") else None
        else:
            chosen = next((rule for rule in rules if checker.reproduces(name, rule)), None)
        if chosen is not None:
            defaults[name] = chosen
    defaults = {name: defaults[name] for name in _OPTIONAL_ORDER if name in defaults}

    capture_inputs = dict(inputs)
    for name, (function, extra) in defaults.items():
        if name not in capture_inputs and name != "decoder_input_ids":
            capture_inputs[name] = _capture_value(name, function, extra, capture_inputs)
    names = [*capture_inputs, *(["labels"] if loss is not None else [])]
    ordered = sorted(names, key=lambda name: parameters.index(name) if name in parameters else len(parameters))
    required = [name for name in ordered if name not in defaults and name != "labels"]
    signature = required + [name for name in ordered if name not in required]
    output_class = checker.output_class if checker is not None else None
    return InputPlan(capture_inputs, signature, defaults, loss, output_class)


def _capture_value(name: str, function: str, extra: tuple, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The value an optional input is captured with: a padded mask (see `_padded_mask`), else its default."""
    like = inputs[extra[0][1:]]
    if function == "default_mask":
        return _padded_mask(like.shape[0], like.shape[1]).to(like.device)
    return _call_default(function, None, extra, inputs)


def _call_default(function: str, value: Any, extra: tuple, inputs: Mapping[str, Any]) -> torch.Tensor:
    args = [inputs[arg[1:]] if isinstance(arg, str) and arg.startswith("@") else arg for arg in extra]
    return getattr(graph_inputs, function)(value, *args)


class _DefaultChecker:
    """Runs ``model`` eagerly (evaluation mode, no cache, no grad) to check that a default reproduces what the
    model computes when the input is left out."""

    def __init__(self, model: torch.nn.Module, inputs: Mapping[str, Any]) -> None:
        self.model = model
        self.inputs = dict(inputs)
        self._references: dict[str, Any] = {}
        self.output_class: type | None = None
        try:
            outputs = self._run(self.inputs)
        except Exception:  # noqa: BLE001 - the front-end reports capture problems with the model's own error
            self.model = None
            return
        if isinstance(outputs, transformers.utils.ModelOutput):
            self.output_class = type(outputs)

    def _run(self, inputs: Mapping[str, Any]) -> Any:
        with capture_mode(self.model, training=False), torch.no_grad():
            return self.model(**inputs)

    def reproduces(self, name: str, rule: tuple[str, tuple]) -> bool:
        if self.model is None:
            return False
        without = {key: value for key, value in self.inputs.items() if key != name}
        function, extra = rule
        if any(isinstance(arg, str) and arg.startswith("@") and arg[1:] not in without for arg in extra):
            return False
        try:
            if name not in self._references:
                self._references[name] = self._run(without)
            value = _call_default(function, None, extra, without)
            candidate = self._run({**without, name: value})
        except Exception:  # noqa: BLE001 - a default the model cannot take is no default
            return False
        return _same_outputs(self._references[name], candidate)


def _same_outputs(first: Any, second: Any) -> bool:
    import torch.utils._pytree as pytree

    a, b = pytree.tree_leaves(first), pytree.tree_leaves(second)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or not torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5):
                return False
    return True


_CLASSIFICATION = ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")


def _loss_spec(model: torch.nn.Module, config: Any) -> dict[str, Any] | None:
    """The ``LOSS_MAPPING`` key and constants of the loss ``model``'s forward computes from ``labels``.

    The key follows transformers' own rule (the class name's task suffix, `PreTrainedModel.loss_function`), except
    for encoder-decoder generation heads: T5, BART and Whisper compute an unshifted cross-entropy (the
    ``ForMaskedLM`` loss) in their forward, not the causal one their suffix maps to. ``None`` for other heads.
    """
    name = type(model).__name__
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    if name.endswith(_CLASSIFICATION):
        return {
            "loss_type": "ForSequenceClassification",
            "num_labels": config.num_labels,
            "problem_type": config.problem_type,
        }
    if name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) and not encoder_decoder:
        return {"loss_type": "ForCausalLM", "vocab_size": text.vocab_size}
    if name.endswith("ForConditionalGeneration") or name.endswith("ForMaskedLM"):
        return {"loss_type": "ForMaskedLM", "vocab_size": text.vocab_size}
    return None


def _shift_spec(model: torch.nn.Module, config: Any) -> tuple[str, Any, Any] | None:
    """How the model derives ``decoder_input_ids`` from ``labels``: its ``prepare_decoder_input_ids_from_labels``
    (T5, BART), else its module's ``shift_tokens_right`` (Whisper), with the pad and decoder-start ids."""
    import sys

    cls = type(model)
    ids = (model_token_id(model, "pad_token_id"), model_token_id(model, "decoder_start_token_id"))
    if hasattr(cls, "prepare_decoder_input_ids_from_labels"):
        return (f"{cls.__module__}:{cls.__qualname__}.prepare_decoder_input_ids_from_labels", *ids)
    if hasattr(sys.modules.get(cls.__module__), "shift_tokens_right"):
        return (f"{cls.__module__}:shift_tokens_right", *ids)
    return None
