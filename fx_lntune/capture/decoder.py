"""Capture what text generation needs from a tuned graph: an encoder and a decoder step whose KV cache is explicit
tensors in and out, over the tuned graph's own dispatch modules and parameters (nothing copied).

The Hugging Face model is rebuilt from ``gm.config`` on the meta device (a "shell"), and every parameter, buffer
and dispatch module of ``gm`` is put at its own path in it: the same objects, so an adapter switch, a merge or
`disable_adapters` on ``gm`` reaches the step graphs with no new capture. A step is captured with
``torch.export`` (batch, sequence and past length dynamic; past length 0 is the prefill) and its norms are folded
back into ``call_module`` nodes of those dispatch modules (`passes.fold.fold_module_calls`)::

    step(input_ids, attention_mask, past=(k0, v0, k1, v1, ...), position_ids=None)
        -> (logits, present_k0, present_v0, present_k1, present_v1, ...)

    seq2seq: decoder_step(decoder_input_ids, encoder_hidden_states, attention_mask, past, cross=None)
        -> (logits, *present, *cross)   # cross (encoder keys/values) only while cross=None: the first step

For export, `decoder_with_past` (a causal LM) and `seq2seq_with_past` (an encoder-decoder's three steps) give the
same step functions over a shell whose dispatch modules are replaced by their current route, with optimum's names.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture._build import _lookup, build_graph_module
from fx_lntune.capture.export import _shortened
from fx_lntune.capture.layers import layer_runs
from fx_lntune.errors import LNTuneGenerationError
from fx_lntune.inputs import _image_size, _image_token
from fx_lntune.passes._graphs import graph_modules
from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.attention import unmasked_attention
from fx_lntune.passes.device import follow_input_device
from fx_lntune.passes.fold import fold_module_calls
from fx_lntune.passes.image_count import free_image_count
from fx_lntune.passes.repeat_layers import CannotRepeat, LayerRun, repeat_layers
from fx_lntune.passes.torch_calls import call_torch_functions
from fx_lntune.state import LNTuneState, dispatch_modules

__all__ = [
    "GENERATION_KEY",
    "CacheLayout",
    "cache_name",
    "capture_step",
    "model_shell",
    "read_cache",
    "write_cache",
    "causal_step",
    "runnable_step",
    "image_token",
    "capture_image_step",
    "encoder_forward",
    "seq2seq_step",
    "DecoderWithPast",
    "decoder_with_past",
    "seq2seq_with_past",
]

log = logging.getLogger(__name__)

# The key of `LNTuneState.extra` that lntune_transform fills for a model that can generate.
GENERATION_KEY = "generation"
_CHECK_OPS = {torch.ops.aten._assert_tensor_metadata.default}


def model_shell(gm: torch.fx.GraphModule, state: LNTuneState) -> nn.Module:
    """The Hugging Face model ``gm`` was captured from, rebuilt on the meta device from ``gm.config``, holding
    ``gm``'s own parameters, buffers and dispatch modules at their paths (shared objects: nothing is copied and
    ``gm`` is not changed). In evaluation mode, except for the shared dispatch modules, whose mode is ``gm``'s."""
    model_class = state.extra[GENERATION_KEY]["model_class"]
    with torch.device("meta"), _quiet():
        shell = model_class(copy.deepcopy(gm.config))
    shell.eval()
    dispatch = dispatch_modules(gm)
    for path, module in dispatch.items():
        parent, _, name = path.rpartition(".")
        shell.get_submodule(parent)._modules[name] = module
    inside = tuple(f"{path}." for path in dispatch)
    missing = []
    for owner_path, owner in shell.named_modules(remove_duplicate=False):
        if owner_path in dispatch or owner_path.startswith(inside):
            continue
        for table, lookup in ((owner._parameters, gm.get_parameter), (owner._buffers, gm.get_buffer)):
            for name, value in table.items():
                if value is None:
                    continue
                path = f"{owner_path}.{name}" if owner_path else name
                try:
                    table[name] = lookup(path)
                except AttributeError:
                    missing.append(path)
    if missing:
        raise LNTuneGenerationError(
            f"the tuned graph has no tensor at {missing[:3]} (and {max(0, len(missing) - 3)} more), which "
            f"{model_class.__name__} needs to generate; generate from the graph lntune_transform returned."
        )
    shell.generation_config = copy.deepcopy(state.extra[GENERATION_KEY]["generation_config"])
    return shell


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def cache_name(shell: nn.Module) -> str:
    """The keyword the model's forward takes its cache by: ``cache`` (transformers >= 5.2x) or
    ``past_key_values``."""
    parameters = inspect.signature(type(shell).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@dataclass(frozen=True)
class CacheLayout:
    """Per decoder layer, the (kv_heads, head_dim) of its self-attention cache, and of its cross-attention
    cache for an encoder-decoder; the dtype of both."""

    self_attention: tuple[tuple[int, int], ...]
    cross_attention: tuple[tuple[int, int], ...] | None
    dtype: torch.dtype

    def empty_past(self, batch: int, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Past tensors of length 0 (the prefill's), two per layer (key, value)."""
        return tuple(
            torch.zeros(batch, heads, 0, dim, dtype=self.dtype, device=device)
            for heads, dim in self.self_attention
            for _ in range(2)
        )


def read_cache(cache: Any) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...] | None]:
    """The (self-attention, cross-attention or None) tensors of a transformers cache object, key and value per
    filled layer; empty tuples when nothing is cached yet."""
    cross = None
    if hasattr(cache, "self_attention_cache"):
        cross = _layer_tensors(cache.cross_attention_cache)
        cache = cache.self_attention_cache
    return _layer_tensors(cache), cross


def _layer_tensors(cache: Any) -> tuple[torch.Tensor, ...]:
    tensors: list[torch.Tensor] = []
    for layer in getattr(cache, "layers", ()):
        if not _filled(layer):
            return ()
        tensors += [layer.keys, layer.values]
    return tuple(tensors)


def _filled(layer: Any) -> bool:
    # transformers 5 initializes a layer lazily (`is_initialized`); 4.57 leaves `keys` None until the first update.
    return getattr(layer, "keys", None) is not None and getattr(layer, "is_initialized", True)


def write_cache(cache: Any, present: Sequence[torch.Tensor], cross: Sequence[torch.Tensor] | None = None) -> None:
    """Make ``cache`` (a ``DynamicCache`` or ``EncoderDecoderCache``) hold ``present`` (and ``cross``), in place:
    the full keys/values per layer, as the step graph returns them."""
    if hasattr(cache, "self_attention_cache"):
        if cross is not None:
            _fill(cache.cross_attention_cache, cross)
            for index in range(len(cross) // 2):
                cache.is_updated[index] = True
        cache = cache.self_attention_cache
    _fill(cache, present)


def _fill(cache: Any, tensors: Sequence[torch.Tensor]) -> None:
    for index in range(len(tensors) // 2):
        key, value = tensors[2 * index], tensors[2 * index + 1]
        layers = getattr(cache, "layers", [])
        if index < len(layers) and _filled(layers[index]):
            # Already filled: the step graph returns past + new, so the layer takes it as it is (no second concat).
            layers[index].keys, layers[index].values = key, value
        else:
            cache.update(key, value, index)


def _new_cache(past: Sequence[torch.Tensor], cross: Sequence[torch.Tensor] | None, encoder_decoder: bool) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    cache = _hold(DynamicCache(), past)
    if not encoder_decoder:
        return cache
    return EncoderDecoderCache(cache, _hold(DynamicCache(), cross or ()))


def _hold(cache: Any, tensors: Sequence[torch.Tensor]) -> Any:
    """``cache`` holding ``tensors`` (key, value per layer) as they are: a layer is started with a length-0 update
    (which every transformers version accepts) and then given the tensors, rather than updated with them, which
    would copy the whole past once more at every step. The layer number a model's attention passes to ``update``
    is read as a plain ``int`` (a shortened capture watches what else reads it, `capture.export._shortened`)."""
    for index in range(len(tensors) // 2):
        key, value = tensors[2 * index], tensors[2 * index + 1]
        cache.update(key[:, :, :0], value[:, :, :0], index)
        layer = cache.layers[index]
        layer.keys, layer.values = key, value
    update = type(cache).update

    def update_layer(key_states: Any, value_states: Any, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        return update(cache, key_states, value_states, int(layer_idx), *args, **kwargs)

    cache.update = update_layer
    return cache


def _logits_kwargs(shell: nn.Module, last_only: bool) -> dict[str, Any]:
    parameters = inspect.signature(type(shell).forward).parameters
    return {"logits_to_keep": 1} if last_only and "logits_to_keep" in parameters else {}


def causal_step(shell: nn.Module, *, last_only: bool) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The decoder step of a causal LM as a function of a model shell and tensors (see the module docstring);
    ``last_only``: logits of the last position only (what generation reads), where the model can skip the others."""
    forward = type(shell).forward
    name = cache_name(shell)
    extra = _logits_kwargs(shell, last_only)

    def step(model, input_ids, attention_mask, past, position_ids=None, **model_inputs):
        cache = _new_cache(past, None, encoder_decoder=False)
        inputs = {"position_ids": position_ids} if position_ids is not None else {}
        inputs.update(model_inputs)  # the prefill's images (`capture_image_step`)
        out = forward(
            model, input_ids=input_ids, attention_mask=attention_mask, use_cache=True, return_dict=True,
            **{name: cache}, **inputs, **extra,
        )  # fmt: skip
        present, _ = read_cache(out[name] if name in out else cache)
        return (out["logits"], *present)

    return step


def runnable_step(step: torch.fx.GraphModule, *, unmasked: bool = False) -> torch.fx.GraphModule | None:
    """A copy of the step graph ``step`` (sharing its modules and tensors) to run as Python code: its common aten
    calls made through torch's own bindings (`passes.torch_calls`, the same kernels with less Python per op), and
    what it reads held at flat names. Made again when ``step``'s modules or tensors change (`generation.Decoder`).

    ``unmasked``: a causal step whose attention takes no mask (`passes.attention.unmasked_attention`), what the
    eager model runs where nothing is padded, without the mask's two dozen ops per call; for inputs without padding
    whose new positions are all of the sequence or one token. ``None`` where the model's attention does not allow
    it. ``step`` is not changed (it stays in aten form for `torch.compile` and the exporters)."""
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(step.graph, {}))
    graph._codegen = copy.deepcopy(step.graph._codegen)
    runnable = torch.fx.GraphModule(step, graph, class_name=type(step).__name__)
    if unmasked and not unmasked_attention(runnable).modified:
        return None
    _drop_dead_code(runnable.graph)
    call_torch_functions(runnable)
    runnable = torch.fx.GraphModule(_flat_attributes(runnable), runnable.graph, class_name=type(step).__name__)
    runnable.graph.lint()
    runnable.recompile()
    return runnable


def _flat_attributes(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """What ``gm``'s nodes read and call, each at one flat name (``model_model_layers_0_self_attn_q_proj_weight``),
    the nodes renamed to match: the same objects, reached with one attribute lookup instead of a walk of seven
    modules per weight and step."""
    objects: dict[str, Any] = {}
    names: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("get_attr", "call_module"):
            continue
        target = str(node.target)
        if target not in names:
            name = target.replace(".", "_")
            while name in objects or hasattr(torch.fx.GraphModule, name):
                name = f"_{name}"
            names[target] = name
            objects[name] = _lookup(gm, target)
        node.target = names[target]
    return objects


def image_token(config: Any) -> int | None:
    """The token id a llava-style model replaces by image features (``config.image_token_id`` or
    ``image_token_index``), or None for a model without one."""
    return _image_token(config)


def capture_image_step(
    shell: nn.Module, layout: CacheLayout, *, positions: bool, class_name: str
) -> torch.fx.GraphModule:
    """The prefill step of a llava-style model, which also takes the images::

        step(input_ids, attention_mask, past, pixel_values, position_ids=None) -> (logits, *present)

    ``input_ids`` hold one run of image tokens per image (``config.image_seq_length`` each); the batch, sequence,
    past length and image count are dynamic (captured with three images over two rows, so that the image count
    is not tied to the batch), and the merge of image features into the embeddings is freed from the capture's
    image count by `passes.image_count.free_image_count`. Later steps are text only (`causal_step`).
    """
    config, device, dyn = shell.config, shell.device, torch.export.Dim.DYNAMIC
    token, per_image = image_token(config), int(config.image_seq_length)
    vision = config.vision_config
    height, width = _image_size(vision, "pixel_values")
    batch, past_length, text = 2, 4, 2
    ids = torch.full((batch, 2 * per_image + text), 3, dtype=torch.long, device=device)
    ids[0, : 2 * per_image] = token  # row 0: two images, row 1: one image
    ids[1, :per_image] = token
    mask = torch.ones(batch, past_length + ids.shape[1], dtype=torch.long, device=device)
    past = tuple(
        torch.zeros(batch, heads, past_length, dim, dtype=layout.dtype, device=device)
        for heads, dim in layout.self_attention
        for _ in range(2)
    )
    pixels = torch.zeros(3, getattr(vision, "num_channels", 3), height, width, dtype=layout.dtype, device=device)
    step = causal_step(shell, last_only=True)

    def image_step(model, input_ids, attention_mask, past, pixel_values, position_ids=None):
        return step(model, input_ids, attention_mask, past, position_ids, pixel_values=pixel_values)

    args = (ids, mask, past, pixels)
    dynamic = {
        "input_ids": {0: dyn, 1: dyn},
        "attention_mask": {0: dyn, 1: dyn},
        "past": tuple({0: dyn, 2: dyn} for _ in past),
        # AUTO: export unrolls `list(image_features)` at the example's count (free_image_count undoes it) and would
        # refuse a DYNAMIC dim for that; the dim stays symbolic everywhere else.
        "pixel_values": {0: torch.export.Dim.AUTO},
        "position_ids": {0: dyn, 1: dyn},
    }
    if positions:
        args += (torch.arange(past_length, mask.shape[1], device=device).expand(batch, -1),)
    gm = capture_step(shell, image_step, args, dynamic, class_name)
    return run_pass(free_image_count, gm, cleanup=True)


def encoder_forward(shell: nn.Module) -> Callable[..., torch.Tensor]:
    """An encoder-decoder's encoder: ``(shell, input_ids, attention_mask) -> last_hidden_state``."""

    def encode(model, input_ids, attention_mask):
        outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return outputs["last_hidden_state"]

    return encode


def seq2seq_step(shell: nn.Module) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The decoder step of an encoder-decoder (see the module docstring)."""
    from transformers.modeling_outputs import BaseModelOutput

    forward = type(shell).forward
    name = cache_name(shell)

    def step(model, decoder_input_ids, encoder_hidden_states, attention_mask, past, cross=None):
        cache = _new_cache(past, cross, encoder_decoder=True)
        out = forward(
            model, decoder_input_ids=decoder_input_ids, attention_mask=attention_mask, use_cache=True,
            encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden_states), return_dict=True,
            **{name: cache},
        )  # fmt: skip
        present, cross_present = read_cache(out[name] if name in out else cache)
        return (out["logits"], *present, *(cross_present if cross is None else ()))

    return step


class _Traced(nn.Module):
    """``function(model, *args, **kwargs)`` as a module holding ``model`` at ``model``: export then reaches every
    submodule through attribute access from the root and records its full path (a module captured by a closure
    gets paths relative to itself)."""

    def __init__(self, model: nn.Module, function: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "function", function)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(self.model, *args, **kwargs)


def capture_step(
    shell: nn.Module,
    function: Callable[..., Any],
    args: tuple[Any, ...],
    dynamic_shapes: Mapping[str, Any],
    class_name: str,
    *,
    shorten: bool = False,
) -> torch.fx.GraphModule:
    """``function(shell, *args)`` captured with ``torch.export`` as a plain ``GraphModule`` whose
    ``model`` submodule is ``shell``'s state (shared), with every dispatch module a ``call_module`` node again.
    ``dynamic_shapes`` maps each of ``function``'s tensor arguments by name to its dynamic dims. The graph takes
    and returns its tensors flat, tuples unpacked: ``function(shell, ids, mask, (k0, v0, ...))`` becomes
    ``graph(ids, mask, k0, v0, ...)``; no pytree flattening per call.

    ``shorten``: where the model's layers are alike (`capture.layers.layer_runs`) and the tuple arguments hold
    two tensors per layer (a causal step's past), trace three layers and copy the last for the others
    (`passes.repeat_layers`), as the main capture does: a fraction of the capture time, the same graph. Falls back
    to tracing every layer (with a log line) where that cannot be done.

    Shape guards are dropped (like the main capture does), so the graph also runs where a dynamic size is 0 or 1
    (a prefill's empty past, a one-token step). ``shell``'s modules keep their train/eval modes.

    Raises:
        LNTuneGenerationError: a dispatch module's call could not be folded back into one node (the step would
            then not follow adapter switches).
    """
    root = _Traced(shell, function)
    paths = [f"model.{path}" for path in dispatch_modules(shell)]
    runs = _step_runs(shell, args) if shorten else []
    if runs:
        try:
            return _capture_step(root, args, dynamic_shapes, class_name, paths, runs)
        except CannotRepeat as why:
            log.info("capturing every layer of the %s step: %s", class_name, why)
    return _capture_step(root, args, dynamic_shapes, class_name, paths, [])


def _step_runs(shell: nn.Module, args: tuple[Any, ...]) -> list[LayerRun]:
    """The one layer list a step can be captured shortened over: the model's only alike run, with one cache layer
    (two tensors of each tuple argument) per layer of it."""
    opaque = tuple({type(module) for module in dispatch_modules(shell).values()})
    runs = layer_runs(shell, opaque=opaque)
    per_layer = {len(arg) // 2 for arg in args if isinstance(arg, tuple)}
    if len(runs) != 1 or per_layer != {runs[0].total}:
        return []
    return runs


def _capture_step(
    root: _Traced,
    args: tuple[Any, ...],
    dynamic_shapes: Mapping[str, Any],
    class_name: str,
    paths: list[str],
    runs: list[LayerRun],
) -> torch.fx.GraphModule:
    shell, function = root.model, root.function
    names = list(inspect.signature(function).parameters)[1 : 1 + len(args)]
    dynamic = [dynamic_shapes[name] for name in names]
    if runs:  # the layers traced get their cache layers; repeat_layers adds the others' as new placeholders
        keep = 2 * runs[0].captured
        args = tuple(arg[:keep] if isinstance(arg, tuple) else arg for arg in args)
        dynamic = [dims[:keep] if isinstance(dims, tuple) else dims for dims in dynamic]
    modes = [(module, module.training) for module in shell.modules()]
    try:
        for module, _ in modes:
            module.training = False
        with _shortened(shell, runs) as read:
            program = torch.export.export(root, args, dynamic_shapes={"args": tuple(dynamic)}, strict=False)
    finally:
        for module, mode in modes:
            module.training = mode
    if read:
        raise CannotRepeat(f"its forward computes with a layer number ({read[0]})")
    unlifted = program.module()
    for _, module in graph_modules(unlifted):
        for node in list(module.graph.nodes):
            if node.target in _CHECK_OPS or (node.op == "call_module" and node.target == "_guards_fn"):
                module.graph.erase_node(node)
        module.recompile()
    if unlifted._out_spec.is_leaf():  # one tensor out: returned as it is, not in a list
        output = next(iter(unlifted.graph.find_nodes(op="output")))
        output.args = (output.args[0][0],)
    unlifted.graph._codegen = torch.fx.graph.CodeGen()  # flat in, flat out
    _drop_dead_code(unlifted.graph)
    _sizes_from_first_inputs(unlifted.graph)
    if runs:
        shifted = [LayerRun(f"model.{run.path}", run.first, run.captured, run.total) for run in runs]
        run_pass(repeat_layers, unlifted, runs=shifted, layer_module=root.get_submodule)
    gm = build_graph_module(root, unlifted.graph, leaves=paths, fallback=unlifted, class_name=class_name)
    gm = run_pass(fold_module_calls, gm, paths=paths)
    _drop_unused_reads(gm.graph)
    inside = tuple(f"{path}." for path in paths)
    unfolded = sorted(
        str(node.target)
        for node in gm.graph.nodes
        if node.op == "get_attr" and node.users and str(node.target).startswith(inside)
    )
    if unfolded:
        raise LNTuneGenerationError(
            f"capturing the {class_name} step left {unfolded[:3]} outside their module's call, so the step would "
            "not follow adapter switches; generate with the model's own generate after apply_to_model instead."
        )
    return run_pass(follow_input_device, gm)


def _sizes_from_first_inputs(graph: torch.fx.Graph) -> None:
    """Read each dynamic size from the first input that has it (export reads it from any, often the last past
    tensor): then a layer's own past is read by that layer only, as `passes.repeat_layers` needs."""
    first: dict[Any, tuple[torch.fx.Node, int]] = {}
    for placeholder in graph.find_nodes(op="placeholder"):
        value = placeholder.meta.get("val")
        for dim, size in enumerate(getattr(value, "shape", ())):
            if isinstance(size, torch.SymInt):
                first.setdefault(size.node.expr, (placeholder, dim))
    for node in graph.find_nodes(op="call_function", target=torch.ops.aten.sym_size.int):
        size = node.meta.get("val")
        if isinstance(size, torch.SymInt) and size.node.expr in first and node.args[0].op == "placeholder":
            node.args = first[size.node.expr]


def _drop_unused_reads(graph: torch.fx.Graph) -> None:
    """Remove the attribute reads nothing uses: export reads every parameter, and once a norm's nodes are folded into
    its dispatch module's call, the reads of its weights (every adapter's copy) are left over; each would still
    cost a walk down the module tree at every step."""
    for node in list(graph.find_nodes(op="get_attr")):
        if not node.users:
            graph.erase_node(node)


def _drop_dead_code(graph: torch.fx.Graph) -> None:
    """Remove the aten ops no output needs, including the in-place ``detach_`` export puts on a fresh copy of a
    constant (the empty tensor a cache layer starts from, replaced by `_hold`): it changes nothing anyone reads.
    Other calls stay (transformers 4.57's vmapped mask enters and leaves vmap levels through calls with no users)."""

    def impure(node: torch.fx.Node) -> bool:
        return node.is_impure() or not isinstance(node.target, torch._ops.OpOverload)

    graph.eliminate_dead_code(is_impure_node=impure)
    for node in reversed(graph.nodes):
        if node.target is torch.ops.aten.detach_.default and not node.users:
            source = node.args[0]
            if source.target is torch.ops.aten.lift_fresh_copy.default and len(source.users) == 1:
                graph.erase_node(node)
    graph.eliminate_dead_code(is_impure_node=impure)


@dataclass
class DecoderWithPast:
    """A step in optimum's layout, ready for an exporter: ``module(*args)`` returns its outputs flat (a causal LM's
    decoder: ``(logits, present.0.key, present.0.value, ...)``); names and dynamic axes per flat input and output."""

    module: nn.Module
    args: tuple[Any, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple[Any, ...]


def decoder_with_past(
    gm: torch.fx.GraphModule, state: LNTuneState, example_inputs: Mapping[str, torch.Tensor], layout: CacheLayout
) -> DecoderWithPast:
    """What ``gm`` computes now (each dispatch module's current route: the active, merged or base module) as one
    decoder step with the cache as tensors: inputs ``input_ids``, ``attention_mask`` (past + new positions),
    ``position_ids`` where the model takes them, ``past_key_values.{i}.key/value`` (batch, kv_heads,
    past_length, head_dim); outputs ``logits`` and ``present.{i}.key/value``. Example past has length 2.
    Shares ``gm``'s tensors; ``gm`` is not changed."""
    shell = _routed_shell(gm, state)
    positions = "position_ids" in inspect.signature(type(shell).forward).parameters
    step = causal_step(shell, last_only=False)
    ids, mask = example_inputs["input_ids"], example_inputs.get("attention_mask")
    batch, past_length = ids.shape[0], 2
    mask = torch.ones_like(ids) if mask is None else mask
    mask = torch.cat([torch.ones(batch, past_length, dtype=mask.dtype, device=mask.device), mask], dim=1)
    past = _zeros(batch, layout.self_attention, past_length, layout.dtype, ids.device)
    layers = len(layout.self_attention)
    past_names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    past_axes = tuple({0: "batch_size", 2: "past_sequence_length"} for _ in past)
    token_axes = {0: "batch_size", 1: "sequence_length"}
    mask_axes = {0: "batch_size", 1: "total_sequence_length"}
    if positions:
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_length:]

        def function(model, input_ids, attention_mask, position_ids, past):
            return step(model, input_ids, attention_mask, past, position_ids)

        args = (ids, mask, position_ids, past)
        names = ["input_ids", "attention_mask", "position_ids"]
        dynamic = (token_axes, mask_axes, token_axes, past_axes)
    else:

        def function(model, input_ids, attention_mask, past):
            return step(model, input_ids, attention_mask, past)

        args, names, dynamic = (ids, mask, past), ["input_ids", "attention_mask"], (token_axes, mask_axes, past_axes)
    outputs = ["logits", *(f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value"))]
    module = _Traced(shell, function)  # shell is in eval mode; the shared norms keep gm's mode
    return DecoderWithPast(module, args, [*names, *past_names], outputs, dynamic)


def _routed_shell(gm: torch.fx.GraphModule, state: LNTuneState) -> nn.Module:
    """`model_shell` with each dispatch module replaced by the module it routes to now (active, merged or base):
    what ``gm`` computes now, with no dispatch module left for an exporter to trace through."""
    shell = model_shell(gm, state)
    for path, module in dispatch_modules(shell).items():
        parent, _, name = path.rpartition(".")
        shell.get_submodule(parent)._modules[name] = module._route
    return shell


def seq2seq_with_past(
    gm: torch.fx.GraphModule, state: LNTuneState, example_inputs: Mapping[str, torch.Tensor], layout: CacheLayout
) -> dict[str, DecoderWithPast]:
    """What an encoder-decoder ``gm`` computes now (each dispatch module's current route) as optimum's three steps,
    keyed by their file stems, the caches ordered layer by layer as optimum orders them:

    - ``encoder_model``: ``input_ids``, ``attention_mask`` -> ``last_hidden_state``;
    - ``decoder_model``, the first step: ``input_ids``, ``encoder_attention_mask``, ``encoder_hidden_states``
      -> ``logits``, ``present.{i}.decoder.key/value`` (self-attention), ``present.{i}.encoder.key/value``
      (cross-attention, computed once from the encoder's output);
    - ``decoder_with_past_model``: ``input_ids``, ``encoder_attention_mask``, ``past_key_values.{i}.decoder.key/
      value`` (batch, heads, past_length, head_dim), ``past_key_values.{i}.encoder.key/value`` (batch, heads,
      encoder_length, head_dim) -> ``logits``, ``present.{i}.decoder.key/value`` (past and new).

    They run `encoder_forward` and `seq2seq_step`, as `fl.generate` does. ``example_inputs``: the encoder's example
    (``input_ids``, ``attention_mask``; batch and length at least 2); the decoder's examples are made here. Shares
    ``gm``'s tensors; ``gm`` is not changed."""
    shell = _routed_shell(gm, state)
    ids = example_inputs["input_ids"]
    mask = example_inputs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    encode, step = encoder_forward(shell), seq2seq_step(shell)
    with torch.no_grad():
        hidden = encode(shell, ids, mask)
    kinds, layers = ("key", "value"), len(layout.self_attention)
    count = 2 * layers

    def by_layer(own: Sequence[torch.Tensor], cross: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """All layers' self-attention tensors, then all cross-attention ones -> per layer: self, then cross."""
        return tuple(tensor for i in range(layers) for tensor in (*own[2 * i : 2 * i + 2], *cross[2 * i : 2 * i + 2]))

    def first(model, input_ids, encoder_attention_mask, encoder_hidden_states):
        empty = layout.empty_past(input_ids.shape[0], input_ids.device)
        logits, *rest = step(model, input_ids, encoder_hidden_states, encoder_attention_mask, empty)
        return (logits, *by_layer(rest[:count], rest[count:]))

    def with_past(model, input_ids, encoder_attention_mask, past):
        own = tuple(tensor for index, tensor in enumerate(past) if index % 4 < 2)
        cross = tuple(tensor for index, tensor in enumerate(past) if index % 4 >= 2)
        # With the cross-attention cache given, the model reads only the encoder output's shape (for its masks).
        shape = (input_ids.shape[0], encoder_attention_mask.shape[1], hidden.shape[-1])
        return step(model, input_ids, cross[0].new_zeros(shape), encoder_attention_mask, own, cross)

    # Example lengths of the decoder's axes: any of at least 2 (export would fix a size 0 or 1).
    batch, first_length, past_length, new_length = ids.shape[0], 3, 4, 2
    past = by_layer(
        _zeros(batch, layout.self_attention, past_length, layout.dtype, ids.device),
        _zeros(batch, layout.cross_attention, ids.shape[1], layout.dtype, ids.device),
    )
    cache = [f"{i}.{part}.{kind}" for i in range(layers) for part in ("decoder", "encoder") for kind in kinds]
    encoder_axes = {0: "batch_size", 1: "encoder_sequence_length"}
    decoder_axes = {0: "batch_size", 1: "decoder_sequence_length"}
    past_axes = tuple(
        {0: "batch_size", 2: "past_decoder_sequence_length" if ".decoder." in name else "encoder_sequence_length"}
        for name in cache
    )
    return {
        "encoder_model": DecoderWithPast(
            _Traced(shell, encode),
            (ids, mask),
            ["input_ids", "attention_mask"],
            ["last_hidden_state"],
            (encoder_axes, encoder_axes),
        ),
        "decoder_model": DecoderWithPast(
            _Traced(shell, first),
            (torch.zeros(batch, first_length, dtype=torch.long, device=ids.device), mask, hidden),
            ["input_ids", "encoder_attention_mask", "encoder_hidden_states"],
            ["logits", *(f"present.{name}" for name in cache)],
            (decoder_axes, encoder_axes, encoder_axes),
        ),
        "decoder_with_past_model": DecoderWithPast(
            _Traced(shell, with_past),
            (torch.zeros(batch, new_length, dtype=torch.long, device=ids.device), mask, past),
            ["input_ids", "encoder_attention_mask", *(f"past_key_values.{name}" for name in cache)],
            ["logits", *(f"present.{name}" for name in cache if ".decoder." in name)],
            (decoder_axes, encoder_axes, past_axes),
        ),
    }


def _zeros(
    batch: int, shapes: Sequence[tuple[int, int]], length: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Cache tensors of ``length`` positions, key and value per layer of ``shapes`` ((heads, head_dim) each)."""
    return tuple(
        torch.zeros(batch, heads, length, dim, dtype=dtype, device=device) for heads, dim in shapes for _ in "kv"
    )
