"""Export a tuned graph for deployment: TorchScript, ONNX or a `torch.export` program of the merged adapter.

Each exporter works on a copy: a tuned graph is merged with its active adapter (`merge_and_unload`) and left
exactly as it was; a plain ``GraphModule`` (what `merge_and_unload` returns) is exported as it is. The file
appears at ``path`` only once it is complete and checked.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from fx_lntune.adapters import merge_and_unload
from fx_lntune.capture.decoder import GENERATION_KEY, DecoderWithPast, decoder_with_past, seq2seq_with_past
from fx_lntune.capture.fx import hf_attention_mask
from fx_lntune.dispatch import AdapterDispatch
from fx_lntune.errors import LNTuneExportError
from fx_lntune.files import file_in_the_way, staged_files
from fx_lntune.generation import decoder_for
from fx_lntune.inputs import dynamic_shapes_for, grow_size_one
from fx_lntune.passes._graphs import graph_modules
from fx_lntune.passes._runner import run_pass
from fx_lntune.passes.split_layers import inline_layers, layer_calls
from fx_lntune.passes.trace_sizes import frozen_size_users, trace_sizes
from fx_lntune.state import META_KEY, LNTuneState

__all__ = ["export_torchscript", "export_onnx", "export_program"]

ONNX_EXTRA = "pip install fx-lntune[onnx]"
# transformers 4.x builds attention masks with torch.vmap; export records it as these calls, and the hf_fx
# front-end keeps each mask builder as a call of `hf_attention_mask`, which runs one when exported.
_VMAP_OPS = frozenset(
    {
        torch._functorch.predispatch._vmap_increment_nesting,
        torch._functorch.predispatch._add_batch_dim,
        hf_attention_mask,
    }
)


def export_torchscript(
    gm: torch.fx.GraphModule, path: str | os.PathLike, example_inputs: Mapping[str, torch.Tensor]
) -> Path:
    """Write a TorchScript module of ``gm``'s merged active adapter to ``path``; return the path.

    The module is traced (``torch.jit.trace``; the captured graphs are aten-level code that scripting cannot
    compile) with the graph's sizes kept as traced values (`passes.trace_sizes`), and the trace is checked at
    batch and sequence one longer, so a size the trace froze fails here and not in production. Graphs that
    build masks with ``torch.vmap`` (transformers 4.x) are re-exported with ``torch.export`` first, which
    writes the vmap out as plain ops. ``torch.jit.load(path)`` gives a module that takes the graph's inputs by
    keyword, or positionally in input-name order, and returns a dict of tensors keyed by the model's output names
    (``logits``, ...). Like any trace, it keeps the device of ``example_inputs`` where the graph creates tensors.
    Works on a copy: ``gm`` is not changed. Runs in evaluation mode (no dropout).
    """
    deployable = _prepare(gm, example_inputs)
    names = deployable.input_names
    args = tuple(deployable.inputs[name] for name in names)
    check = tuple(_grown(deployable.inputs, deployable.dynamic_axes)[name] for name in names)
    with _staged(path) as staging, torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings flag values the trace may freeze; the check at a second size is what tells.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with _as_export_error("TorchScript export"):
            module = _traceable(deployable)
        with _as_export_error("TorchScript export", culprits=frozen_size_users(module)):
            traced = torch.jit.trace(module, args, strict=False, check_inputs=[check])
            torch.jit.save(traced, str(staging))
    return Path(path)


def export_onnx(
    gm: torch.fx.GraphModule,
    path: str | os.PathLike,
    example_inputs: Mapping[str, torch.Tensor],
    kv_cache: bool = False,
) -> Path:
    """Write an ONNX model of ``gm``'s merged active adapter to ``path``; return the path.

    With ``kv_cache=True`` (a causal LM's tuned graph) the file is a decoder with past in optimum's layout, for
    a generation loop: inputs ``input_ids``, ``attention_mask`` (past and new positions), ``position_ids`` where
    the model takes them, ``past_key_values.{i}.key/value`` (batch, kv_heads, past_length, head_dim; length 0
    on the first call); outputs ``logits`` and ``present.{i}.key/value`` (past and new). It computes what the
    graph computes now (the merged adapter, else the active one; the base inside `disable_adapters`).

    For an encoder-decoder (t5, bart) ``path`` is a directory, and ``kv_cache=True`` writes optimum's three files
    into it (made if it does not exist; other files in it are left alone): ``encoder_model.onnx`` (``input_ids``,
    ``attention_mask`` -> ``last_hidden_state``), ``decoder_model.onnx``, the first decoder step (``input_ids``,
    ``encoder_attention_mask``, ``encoder_hidden_states`` -> ``logits``, ``present.{i}.decoder.key/value``,
    ``present.{i}.encoder.key/value``) and ``decoder_with_past_model.onnx``, each later step (``input_ids``,
    ``encoder_attention_mask``, ``past_key_values.{i}.decoder.key/value``, ``past_key_values.{i}.encoder.key/value``
    -> ``logits``, ``present.{i}.decoder.key/value``). ``example_inputs``: one batch of the encoder's
    ``input_ids`` and ``attention_mask`` (other inputs are not used). The files appear only once all three are
    written and checked.

    Uses the exporter PyTorch recommends (``torch.onnx.export(..., dynamo=True)``, built on `torch.export`).
    The model's inputs carry the graph's input names and its outputs the model's output names; the batch
    (``batch``) and sequence (``sequence``, ``decoder_sequence``) axes are dynamic. The file is checked with
    ``onnx.checker`` before it is moved to ``path``. Needs the ``onnx`` extra (``pip install fx-lntune[onnx]``).
    Works on a copy: ``gm`` is not changed. Runs in evaluation mode (no dropout).
    """
    onnx = _import_onnx()
    if kv_cache and getattr(getattr(gm, "config", None), "is_encoder_decoder", False):
        return _export_onnx_seq2seq(gm, path, example_inputs, onnx)
    if kv_cache:
        return _export_onnx_decoder(gm, path, example_inputs, onnx)
    deployable = _prepare(gm, example_inputs)
    with _staged(path) as staging, _as_export_error("ONNX export"), warnings.catch_warnings():
        # Inputs sharing an axis (input_ids and attention_mask) name it once; torch.onnx warns about the other.
        warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")
        program = torch.onnx.export(
            deployable.module,
            (),
            kwargs=deployable.inputs,
            dynamo=True,
            input_names=deployable.input_names,
            output_names=deployable.output_names,
            dynamic_shapes=deployable.dynamic_axes,
            verbose=False,
        )
        # Weights go into the file itself unless they cannot (the 2 GB protobuf limit): then into `<name>.data`.
        program.save(str(staging), external_data=_initializer_bytes(program) >= 2**31 - 2**26)
        onnx.checker.check_model(str(staging))
    return Path(path)


def export_program(
    gm: torch.fx.GraphModule,
    path: str | os.PathLike,
    example_inputs: Mapping[str, torch.Tensor],
    kv_cache: bool = False,
) -> Path:
    """Write a ``torch.export`` program (``.pt2``) of ``gm``'s merged active adapter to ``path``; return the path.

    ``torch.export.load(path).module()(**inputs)`` runs it at any batch and sequence length, with the same
    keyword inputs as ``gm``, and returns a dict of tensors keyed by the model's output names. The program is
    the training IR ``torch.export.export`` gives, except for graphs with ``torch.vmap`` (transformers 4.x
    masks), which are decomposed to the inference IR because the serializer cannot hold vmap. Works on a copy:
    ``gm`` is not changed. Runs in evaluation mode (no dropout).

    With ``kv_cache=True`` (a causal LM's tuned graph) the program is the decoder with past that
    ``export_onnx(..., kv_cache=True)`` writes, in PyTorch's form: its module takes by keyword ``input_ids``,
    ``attention_mask`` (past and new positions), ``position_ids`` where the model takes them, and
    ``past_key_values``, a tuple of per-layer ``(key, value)`` tensors (batch, kv_heads, past_length, head_dim;
    length 0 on the first call), and returns ``(logits, present)`` with ``present`` in the same form (past and
    new). ``torch._inductor.aoti_compile_and_package(torch.export.load(path))`` compiles it ahead of time.
    """
    if kv_cache:
        return _export_program_decoder(gm, path, example_inputs)
    deployable = _prepare(gm, example_inputs)
    with _staged(path) as staging, _as_export_error("torch.export"):
        torch.export.save(_exported(deployable), str(staging))
    return Path(path)


def _export_onnx_decoder(
    gm: torch.fx.GraphModule, path: str | os.PathLike, example_inputs: Mapping[str, torch.Tensor], onnx: Any
) -> Path:
    decoder = _decoder_with_past(gm, example_inputs)
    with (
        _staged(path) as staging,
        _as_export_error("ONNX export of the decoder with past"),
        _evaluation_mode(decoder.module),
    ):
        _write_onnx_step(decoder, staging, onnx)
    return Path(path)


def _export_onnx_seq2seq(
    gm: torch.fx.GraphModule, path: str | os.PathLike, example_inputs: Mapping[str, torch.Tensor], onnx: Any
) -> Path:
    state = _seq2seq_state(gm, example_inputs)
    with _staged_directory(path) as staging:  # the path is checked before the steps are built
        with _as_export_error("running the encoder on example_inputs"):
            steps = _seq2seq_with_past(gm, state, example_inputs)
        with _evaluation_mode(nn.ModuleList(step.module for step in steps.values())):
            for stem, step in steps.items():
                with _as_export_error(f"ONNX export of {stem}.onnx"):
                    _write_onnx_step(step, staging / f"{stem}.onnx", onnx)
    return Path(path)


def _write_onnx_step(step: DecoderWithPast, path: Path, onnx: Any) -> None:
    """Export ``step`` (flat tensors in and out, optimum's names) to ``path`` and check the file."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="# The axis name: .* will not be used")
        program = torch.onnx.export(
            step.module,
            step.args,
            dynamo=True,
            input_names=step.input_names,
            output_names=step.output_names,
            dynamic_shapes={"args": step.dynamic_shapes},
            verbose=False,
        )
    program.save(str(path), external_data=_initializer_bytes(program) >= 2**31 - 2**26)
    onnx.checker.check_model(str(path))


def _export_program_decoder(
    gm: torch.fx.GraphModule, path: str | os.PathLike, example_inputs: Mapping[str, torch.Tensor]
) -> Path:
    decoder = _decoder_with_past(gm, example_inputs)
    module = _PastAsPairs(decoder.module, decoder.input_names[: len(decoder.args) - 1])
    inputs, dims = module.example(decoder.args)
    with _staged(path) as staging, _as_export_error("torch.export of the decoder with past"), torch.no_grad():
        program = torch.export.export(module, (), inputs, dynamic_shapes=dims, strict=False)
        if _has_vmap(program.graph_module):
            program = program.run_decompositions({})
        _widen_total_length(program)
        torch.export.save(program, str(staging))
        _check_least_sizes(torch.export.load(str(staging)).module(), module, inputs)
    return Path(path)


class _PastAsPairs(nn.Module):
    """The decoder with past of `capture.decoder.decoder_with_past` (flat tensors in, flat out) taking its inputs
    by keyword and its cache as per-layer ``(key, value)`` pairs, as Hugging Face's legacy cache tuple::

        forward(input_ids, attention_mask, position_ids, past_key_values=((k0, v0), ...)) -> (logits, ((k0, v0), ...))
    """

    def __init__(self, step: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.step = step
        self.names = names

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...],
        position_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        past = tuple(tensor for pair in past_key_values for tensor in pair)
        logits, *present = self.step(*(given[name] for name in self.names), past)
        return logits, tuple((present[index], present[index + 1]) for index in range(0, len(present), 2))

    def example(self, args: tuple[Any, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Keyword example inputs from the decoder's flat example ``args``, and their dynamic shapes.

        Export traces each dynamic size as at least 2 (sizes 0 and 1 are specialized while tracing), then widens
        to the declared ranges: batch and sequence from 1, the past from 0 (the prompt's call). Token tensors are
        copied: a view (the example ``position_ids`` is a slice) would add a guard on its base's size.
        """
        *tokens, past = args
        inputs: dict[str, Any] = {name: value.clone() for name, value in zip(self.names, tokens, strict=True)}
        inputs["past_key_values"] = tuple((past[index], past[index + 1]) for index in range(0, len(past), 2))
        batch = torch.export.Dim("batch", min=1)
        sequence = torch.export.Dim("sequence_length", min=1)
        past_length = torch.export.Dim("past_sequence_length", min=0)
        # The mask's length is past + sequence, which no declared range can say: export infers it (its least
        # value as traced, 4) and `_widen_total_length` declares the true least, 1.
        total = torch.export.Dim.AUTO
        dims: dict[str, Any] = {name: {0: batch, 1: sequence} for name in self.names}
        dims["attention_mask"] = {0: batch, 1: total}
        dims["past_key_values"] = tuple(({0: batch, 2: past_length}, {0: batch, 2: past_length}) for _ in past[::2])
        return inputs, dims


def _widen_total_length(program: torch.export.ExportedProgram) -> None:
    """Let the mask's length (past + new) start at 1, in place.

    Export infers its least value, 4, from the past and sequence lengths as traced (each at least 2; see
    `_PastAsPairs.example`), as a range over two dims' sum cannot be declared; the lengths the program is
    declared for (past from 0, sequence from 1) give 1, which `_check_least_sizes` then runs.
    """
    from torch.utils._sympy.value_ranges import ValueRanges

    mask = next(node for node in program.graph.nodes if node.op == "placeholder" and node.name == "attention_mask")
    length = mask.meta["val"].shape[1]
    if isinstance(length, torch.SymInt) and length.node.expr in program.range_constraints:
        upper = program.range_constraints[length.node.expr].upper
        program.range_constraints[length.node.expr] = ValueRanges(1, upper)


def _check_least_sizes(loaded: nn.Module, module: _PastAsPairs, inputs: Mapping[str, Any]) -> None:
    """The written program, called as a user would, gives the decoder's logits and cache at the sizes export
    never traced (see `_PastAsPairs.example`): a one-token prompt with an empty past, then one token on a past of
    one, batch 1. Catches a size the export fixed that the declared ranges do not show."""
    first = {name: value[:1, :1] for name, value in inputs.items() if name != "past_key_values"}
    first["attention_mask"] = torch.ones_like(first["attention_mask"])
    first["past_key_values"] = tuple((key[:1, :, :0], value[:1, :, :0]) for key, value in inputs["past_key_values"])
    _, present = module(**first)
    second = {
        **first,
        "attention_mask": torch.ones_like(first["attention_mask"]).repeat(1, 2),
        "past_key_values": present,
    }
    if "position_ids" in second:
        second["position_ids"] = first["position_ids"] + 1
    for call in (first, second):
        expected, got = module(**call), loaded(**call)
        for want, have in zip(tree_leaves(expected), tree_leaves(got), strict=True):
            torch.testing.assert_close(have, want, atol=1e-4, rtol=0.0)


def _decoder_with_past(gm: torch.fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> DecoderWithPast:
    """The decoder step of `capture.decoder.decoder_with_past` for a tuned causal LM; clear errors otherwise."""
    state = _generating_state(gm, example_inputs)
    if gm.config.is_encoder_decoder:
        raise LNTuneExportError(
            f"export_program(kv_cache=True) writes a causal LM's decoder with past, but {state.model_class} is an "
            "encoder-decoder; export_onnx(gm, directory, example_inputs, kv_cache=True) writes its encoder and "
            "decoders in optimum's layout, or export it without kv_cache."
        )
    return decoder_with_past(gm, state, example_inputs, decoder_for(gm, state).layout)


def _seq2seq_state(gm: torch.fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> LNTuneState:
    """The state of a tuned text encoder-decoder that can generate; clear errors otherwise."""
    state = _generating_state(gm, example_inputs)
    main_input = state.extra[GENERATION_KEY]["model_class"].main_input_name
    if main_input != "input_ids":
        raise LNTuneExportError(
            f"kv_cache=True writes a text encoder-decoder's files (input_ids in), but {state.model_class} takes "
            f"{main_input!r}; export it without kv_cache, or use apply_to_model and optimum's own exporter."
        )
    return state


def _seq2seq_with_past(
    gm: torch.fx.GraphModule, state: LNTuneState, example_inputs: Mapping[str, torch.Tensor]
) -> dict[str, DecoderWithPast]:
    """The three steps of `capture.decoder.seq2seq_with_past` of ``gm`` (checked by `_seq2seq_state`)."""
    names = [name for name in ("input_ids", "attention_mask") if isinstance(example_inputs.get(name), torch.Tensor)]
    # One example of batch or length 1 is enough, as for lntune_transform: export would fix such an axis to 1.
    inputs = grow_size_one({name: example_inputs[name] for name in names})
    return seq2seq_with_past(gm, state, inputs, decoder_for(gm, state).layout)


def _generating_state(gm: torch.fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> LNTuneState:
    """The state of a tuned graph that can generate, with ``input_ids`` in ``example_inputs``; clear errors
    otherwise."""
    state = gm.meta.get(META_KEY) if isinstance(gm, torch.fx.GraphModule) else None
    if not isinstance(state, LNTuneState):
        raise LNTuneExportError(
            "kv_cache=True needs the tuned graph lntune_transform returned (it rebuilds the decoder step from the "
            "model's config); merge in place with merge_adapter instead of merge_and_unload."
        )
    if GENERATION_KEY not in state.extra or getattr(gm, "config", None) is None:
        raise LNTuneExportError(
            "kv_cache=True writes a decoder with past for a causal LM (an encoder-decoder's encoder and decoders), "
            f"but {state.model_class or 'this model'} is not a language model that generates; export it without "
            "kv_cache."
        )
    if not isinstance(example_inputs, Mapping) or not isinstance(example_inputs.get("input_ids"), torch.Tensor):
        raise LNTuneExportError(
            "kv_cache=True needs example_inputs with 'input_ids' (and 'attention_mask'): one batch of prompts."
        )
    return state


@contextlib.contextmanager
def _evaluation_mode(module: nn.Module) -> Iterator[None]:
    """``module`` and every submodule in evaluation mode inside the block, each given back its own mode after it (the
    decoder step shares the tuned graph's dispatch modules)."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training


@dataclass
class _Deployable:
    """What every exporter needs: a plain module with named tensor inputs and a dict of named tensor outputs."""

    module: torch.fx.GraphModule
    inputs: dict[str, torch.Tensor]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str] | None]


def _prepare(gm: torch.fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> _Deployable:
    plain, input_names = _merged_copy(gm, example_inputs)
    # One example of batch or length 1 is enough, as for lntune_transform: export would fix such an axis to 1.
    inputs = grow_size_one({name: example_inputs[name] for name in input_names})
    dynamic_axes = _dynamic_axes(inputs)
    plain.eval()
    with torch.no_grad(), _as_export_error("running the graph on example_inputs"):
        outputs = plain(**inputs)
    keys = _output_keys(outputs)
    module = _named_io_module(plain, input_names, keys)
    return _Deployable(module, inputs, input_names, [str(key) for key in keys], dynamic_axes)


def _traceable(deployable: _Deployable) -> torch.fx.GraphModule:
    """``deployable``'s module ready for `torch.jit.trace`: layers inlined, vmap written out, sizes traced
    (`trace_sizes`)."""
    module = deployable.module
    if layer_calls(module.model):
        # A traced submodule is a method of its own, and the sizes the graph passes between layers would be
        # frozen at its boundary: trace the graph flat, as captured.
        module = torch.fx.GraphModule(
            {"model": inline_layers(module.model)}, copy.deepcopy(module.graph), class_name=type(module).__name__
        ).eval()
    if _has_vmap(module):
        module = _exported(deployable, positional=True).module()
        for node in list(module.graph.nodes):
            if node.op == "call_module" and node.target == "_guards_fn":
                module.graph.erase_node(node)
    return run_pass(trace_sizes, module)


def _exported(deployable: _Deployable, *, positional: bool = False) -> torch.export.ExportedProgram:
    """``torch.export`` of ``deployable`` with dynamic batch/sequence axes, taking its inputs by keyword (or in
    input-name order). A graph with vmap is decomposed to the inference IR, which writes the vmap out as plain
    ops: neither TorchScript nor the program serializer can hold it."""
    dims = _export_dims(deployable.dynamic_axes)
    if positional:
        args, kwargs, dims = tuple(deployable.inputs.values()), {}, tuple(dims.values())
    else:
        args, kwargs = (), deployable.inputs
    program = torch.export.export(deployable.module, args, kwargs, dynamic_shapes=dims, strict=False)
    return program.run_decompositions({}) if _has_vmap(deployable.module) else program


def _has_vmap(module: nn.Module) -> bool:
    return any(node.target in _VMAP_OPS for graph in _graphs(module) for node in graph.nodes)


def _graphs(module: nn.Module) -> list[torch.fx.Graph]:
    return [child.graph for _, child in graph_modules(module)]


def _export_dims(dynamic_axes: Mapping[str, dict[int, str] | None]) -> dict[str, dict[int, Any] | None]:
    return {
        name: {axis: torch.export.Dim.DYNAMIC for axis in axes} if axes is not None else None
        for name, axes in dynamic_axes.items()
    }


def _merged_copy(
    gm: torch.fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]
) -> tuple[torch.fx.GraphModule, list[str]]:
    """A plain copy of ``gm`` (when tuned: merged with its merged adapter, else its active one) and its input names
    in order."""
    if not isinstance(gm, torch.fx.GraphModule):
        raise LNTuneExportError(
            f"export needs a torch.fx.GraphModule from lntune_transform or merge_and_unload, got "
            f"{type(gm).__name__}; capture the model with fx_lntune.lntune_transform first."
        )
    if not isinstance(example_inputs, Mapping) or not all(isinstance(key, str) for key in example_inputs):
        raise LNTuneExportError(
            "example_inputs must be a dict of keyword inputs, e.g. {'input_ids': ids, 'attention_mask': mask}; "
            f"got {type(example_inputs).__name__}."
        )
    state = gm.meta.get(META_KEY)
    if isinstance(state, LNTuneState):
        taken = list(state.input_names)
        _check_names(example_inputs, taken, required=_required_names(gm))
        input_names = [name for name in taken if name in example_inputs]
        # What the graph computes: the merged adapter when one is merged in place, else the active one.
        plain = merge_and_unload(_alias_copy(gm), state.merged_adapter)
    else:
        if any(isinstance(module, AdapterDispatch) for module in gm.modules()):
            raise LNTuneExportError(
                "this graph holds adapter-dispatch modules but no fx_lntune state; export the tuned graph that "
                "lntune_transform returned, or the plain graph merge_and_unload returns."
            )
        forward_names = _forward_names(gm)
        if forward_names:
            _check_names(example_inputs, forward_names, required=_required_names(gm))
            input_names = [name for name in forward_names if name in example_inputs]
        else:
            input_names = list(example_inputs)
        plain = _alias_copy(gm)
    for name in input_names:
        if not isinstance(example_inputs[name], torch.Tensor):
            raise LNTuneExportError(
                f"example_inputs[{name!r}] is a {type(example_inputs[name]).__name__}; every input must be a tensor."
            )
    return plain, input_names


def _check_names(example_inputs: Mapping[str, Any], expected: list[str], required: list[str] | None = None) -> None:
    """``example_inputs`` must hold every required input (all of ``expected`` unless ``required`` is given) and
    nothing else; the optional inputs given are the ones the exported file takes."""
    required = expected if required is None else required
    missing = [name for name in required if name not in example_inputs]
    unknown = [name for name in example_inputs if name not in expected]
    if missing or unknown:
        what = "exactly the graph's inputs" if required == expected else f"the graph's inputs {required}, and of"
        raise LNTuneExportError(
            f"example_inputs must hold {what} {expected}; missing {missing}, unknown {unknown}. "
            "Pass one batch of the inputs the graph was captured with."
        )


def _required_names(gm: torch.fx.GraphModule) -> list[str]:
    """The graph's inputs without a default (a placeholder's default is its first argument)."""
    return [str(node.target) for node in gm.graph.nodes if node.op == "placeholder" and not node.args]


def _forward_names(gm: torch.fx.GraphModule) -> list[str]:
    return [str(node.target) for node in gm.graph.nodes if node.op == "placeholder"]


def _alias_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy of ``gm`` whose parameters are new ``Parameter`` objects over the same storage and whose
    buffers are ``gm``'s own: nothing is copied, and freezing or swapping in the copy never reaches ``gm``."""
    memo: dict[int, Any] = {id(buffer): buffer for buffer in gm.buffers()}
    for param in gm.parameters():
        memo[id(param)] = nn.Parameter(param.detach(), requires_grad=param.requires_grad)
    return copy.deepcopy(gm, memo)


def _dynamic_axes(inputs: Mapping[str, torch.Tensor]) -> dict[str, dict[int, str] | None]:
    """Each input's dynamic axes by name (the capture's rule: batch, and sequence for token inputs).

    A dynamic axis of size 1 is refused: export would make it a constant, and the file would only run at 1.
    """
    axes: dict[str, dict[int, str] | None] = {}
    for name, dims in dynamic_shapes_for(inputs).items():
        if dims is None:
            axes[name] = None
            continue
        sequence = "decoder_sequence" if name.startswith("decoder_") else "sequence"
        axes[name] = {axis: "batch" if axis == 0 else sequence for axis in dims}
        for axis, label in axes[name].items():
            if inputs[name].shape[axis] < 2:
                raise LNTuneExportError(
                    f"example_inputs[{name!r}] has size 1 in its {label} axis (dim {axis}); export would fix that "
                    "axis to 1. Pass example inputs with batch and sequence length of at least 2."
                )
    return axes


def _output_keys(outputs: Any) -> list[Any]:
    """The keys of the tensors in ``outputs`` (a ModelOutput or dict, a tuple, or one tensor)."""
    if isinstance(outputs, torch.Tensor):
        return [None]
    if isinstance(outputs, Mapping):
        keys = [key for key, value in outputs.items() if isinstance(value, torch.Tensor)]
    elif isinstance(outputs, (tuple, list)):
        keys = [index for index, value in enumerate(outputs) if isinstance(value, torch.Tensor)]
    else:
        keys = []
    if not keys:
        raise LNTuneExportError(
            f"the graph returns {type(outputs).__name__} with no tensors in it; export needs tensor outputs."
        )
    return keys


def _named_io_module(plain: torch.fx.GraphModule, input_names: list[str], keys: list[Any]) -> torch.fx.GraphModule:
    """A plain GraphModule around ``plain`` taking its inputs by name and returning ``{name: tensor}``.

    The model's output object (a transformers ``ModelOutput``) becomes a dict, which every format can carry
    and which needs no transformers class to load::

        def forward(self, input_ids, attention_mask):
            model = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return {'logits': model['logits']}
    """
    graph = torch.fx.Graph()
    placeholders = {name: graph.placeholder(name) for name in input_names}
    result = graph.call_module("model", (), placeholders)
    if keys == [None]:
        graph.output({"output": result})
    else:
        graph.output({_output_name(key): graph.call_function(operator.getitem, (result, key)) for key in keys})
    return torch.fx.GraphModule({"model": plain}, graph, class_name="Exported" + type(plain).__name__).eval()


def _output_name(key: Any) -> str:
    return key if isinstance(key, str) else f"output_{key}"


def _grown(inputs: Mapping[str, torch.Tensor], axes: Mapping[str, dict[int, str] | None]) -> dict[str, torch.Tensor]:
    """``inputs`` one longer in every dynamic axis (the first slice repeated at the end), for a second trace."""
    grown = {}
    for name, value in inputs.items():
        for axis in axes[name] or ():
            value = torch.cat([value, value.narrow(axis, 0, 1)], dim=axis)
        grown[name] = value
    return grown


def _import_onnx() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401 - torch.onnx's dynamo exporter needs it
    except ImportError as error:
        raise LNTuneExportError(
            f"ONNX export needs the onnx extra, which is not installed ({error}); run `{ONNX_EXTRA}`."
        ) from error
    return onnx


def _initializer_bytes(program: Any) -> int:
    values = [value.const_value for value in program.model.graph.initializers.values()]
    return sum(value.nbytes for value in values if value is not None)


@contextlib.contextmanager
def _staged(path: str | os.PathLike) -> Iterator[Path]:
    """A path to write to in a new directory beside ``path``; its files move to ``path``'s directory once the
    block succeeds (``path`` itself last), and nothing of them is left when it fails."""
    target = Path(path)
    if target.is_dir():
        raise LNTuneExportError(f"{str(target)!r} is a directory; give the path of the file to write.")
    if not target.parent.is_dir():
        blocking = file_in_the_way(target)
        if blocking is not None:
            raise LNTuneExportError(
                f"cannot write {str(target)!r}: {str(blocking)!r} is a file, not a directory; choose a path in a "
                "directory."
            )
        raise LNTuneExportError(f"directory {str(target.parent)!r} does not exist; create it first.")
    with staged_files(target.parent, last=target.name) as staging:
        yield staging / target.name


@contextlib.contextmanager
def _staged_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A directory to write files into (`files.staged_files` in ``path``, made if missing); once the block
    succeeds its files replace their namesakes in ``path`` (other files stay). When it fails, ``path`` is as it
    was (removed again if it was made here)."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LNTuneExportError(
            f"{str(target)!r} is a file; an encoder-decoder's kv_cache=True export writes three files "
            "(encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx) into a directory: pass a "
            "directory path."
        )
    if target.suffix == ".onnx" and not target.exists():
        raise LNTuneExportError(
            f"{str(target)!r} names a file, but an encoder-decoder's kv_cache=True export writes three files "
            "(encoder_model.onnx, decoder_model.onnx, decoder_with_past_model.onnx) into a directory: pass a "
            "directory path, e.g. 'onnx/'."
        )
    if not target.parent.is_dir():
        blocking = file_in_the_way(target)
        if blocking is not None:
            raise LNTuneExportError(
                f"cannot write into {str(target)!r}: {str(blocking)!r} is a file, not a directory; choose a path in a "
                "directory."
            )
        raise LNTuneExportError(f"directory {str(target.parent)!r} does not exist; create it first.")
    made = not target.exists()
    target.mkdir(exist_ok=True)
    try:
        with staged_files(target) as staging:
            yield staging
    except BaseException:
        if made:  # made for these files, and empty again (staged_files leaves nothing): take it away
            with contextlib.suppress(OSError):
                target.rmdir()
        raise


@contextlib.contextmanager
def _as_export_error(step: str, culprits: list[str] = ()) -> Iterator[None]:
    """Turn any exception in the block into an `LNTuneExportError` naming the failing operator, and undo the
    vmap levels a graph that failed inside ``torch.vmap`` leaves behind (they would break every later random
    op in the process)."""
    level = torch._C._functorch.maybe_current_level()
    try:
        yield
    except Exception as error:
        while (current := torch._C._functorch.maybe_current_level()) is not None and (level is None or current > level):
            torch._C._functorch._vmap_decrement_nesting()
        if isinstance(error, LNTuneExportError):
            raise
        raise LNTuneExportError(_error_line(step, error, culprits)) from error


def _error_line(step: str, error: BaseException, culprits: list[str] = ()) -> str:
    """One line: the step, the operator (from ``culprits`` or the messages), and the innermost cause's message
    (exporters wrap the real error, e.g. torch.onnx's "step 1/3" around torch.export's)."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    texts = [_ANSI.sub("", str(link)) for link in chain]
    operator_name = culprits[0] if culprits else next(filter(None, map(_operator_in, texts)), None)
    culprit = f" at operator {operator_name}" if operator_name else ""
    lines = [line.strip() for line in texts[-1].strip().splitlines() if line.strip()] or ["(no message)"]
    first = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    shapes = any(_SHAPE_FAILURE.search(text) for text in texts)
    advice = _SHAPE_ADVICE if shapes else "try another export format, or a graph without that operator"
    return (
        f"{step} failed{culprit}: {type(chain[-1]).__name__}: {first[:300].rstrip('.')}. The graph is unchanged and "
        f"nothing was written; {advice}."
    )


# Failures of a size check: the graph holds a size fixed at capture, so the file cannot have dynamic axes there.
_SHAPE_FAILURE = re.compile(r"Constraints violated|conflicts between user-specified ranges|Runtime assertion failed")
_SHAPE_ADVICE = (
    "the graph only runs at some sizes of the batch or sequence axes (a size was fixed at capture, e.g. llava's "
    "image count), so these axes cannot be dynamic in a file: check that the graph runs at other sizes"
)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _operator_in(text: str) -> str | None:
    """The first registered operator named in ``text`` (``ns::op``, ``ns.op.overload`` or ``torch.ops.ns.op``)."""
    for match in re.finditer(r"(?:torch\.ops\.)?\b(\w+)(?:::|\.)(\w+)(?:\.\w+)?", text):
        try:
            found = isinstance(getattr(getattr(torch.ops, match.group(1)), match.group(2)), torch._ops.OpOverloadPacket)
        except (AttributeError, RuntimeError):
            found = False
        if found:
            return match.group(0).removeprefix("torch.ops.")
    return None
