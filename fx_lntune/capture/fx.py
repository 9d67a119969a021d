"""The `torch.fx.symbolic_trace` front-end, for plain PyTorch modules, and its Hugging Face variant."""

from __future__ import annotations

import contextlib
import keyword
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture._build import alias_model, build_graph_module, capture_mode, trace_error
from fx_lntune.compat import hf_fx_available
from fx_lntune.errors import LNTuneTraceError

__all__ = ["capture_fx", "capture_hf_fx", "hf_fx_available", "hf_attention_mask"]

# transformers.masking_utils' mask builders (transformers >= 4.53) that the hf_fx front-end keeps as leaves.
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")
# The attention implementations whose masks a leaf reproduces exactly (both give a 4D tensor, see below).
_LEAF_MASK_IMPLEMENTATIONS = ("sdpa", "eager")


class _LeafTracer(torch.fx.Tracer):
    """torch.fx's tracer, keeping the targeted modules as leaves on top of its own rule."""

    def __init__(self, leaves: Sequence[str]) -> None:
        super().__init__()
        self.leaves = frozenset(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


def capture_fx(
    model: nn.Module,
    leaves: Sequence[str],
    example_inputs: Mapping[str, torch.Tensor],
    spare: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """Capture ``model`` with plain ``torch.fx`` symbolic tracing (shape-agnostic: any batch or length).

    Inputs not in ``example_inputs`` are bound to their defaults. Works on a copy: ``model`` is unchanged.
    """
    concrete = _defaults_outside(model, example_inputs)
    with capture_mode(model, training=False):
        try:
            graph = _LeafTracer([*leaves, *spare]).trace(model, concrete_args=concrete)
        except Exception as error:  # noqa: BLE001 - reported with the front-end's name
            raise trace_error("fx", model, error, "tracer='export'") from error
    return _finish(model, graph, leaves, spare)


def capture_hf_fx(
    model: nn.Module,
    leaves: Sequence[str],
    example_inputs: Mapping[str, torch.Tensor],
    spare: Sequence[str] = (),
) -> torch.fx.GraphModule:
    """Capture a Hugging Face model with ``transformers.utils.fx``'s tracer, targeted modules kept as leaves.

    Works on a copy: ``model`` (including its ``config.use_cache``) is unchanged.
    """
    if not hf_fx_available():
        raise LNTuneTraceError(
            "tracer='hf_fx' needs transformers.utils.fx, which transformers 5 removed; use tracer='export' "
            "(or 'auto'), or install transformers<5."
        )
    from transformers.utils.fx import HFTracer

    class LeafHFTracer(HFTracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return module_qualified_name in leaf_set or super().is_leaf_module(m, module_qualified_name)

        def create_proxy(self, kind: str, target: Any, args: Any, kwargs: Any, *rest: Any, **options: Any) -> Any:
            proxy = super().create_proxy(kind, target, args, kwargs, *rest, **options)
            if kind == "call_module" and target in leaf_set and getattr(proxy, "_metadata", None) is None:
                # HFTracer runs a leaf on meta inputs, which fails where its weights are real (only
                # nn.LayerNorm has an override); run it on zeros of the input's shapes instead.
                self._disable_module_getattr = self._disable_call_module = True
                try:
                    proxy.install_metadata(_leaf_metadata(self.root.get_submodule(target), args, kwargs))
                except Exception:  # noqa: BLE001, S110 - no metadata, as HFTracer itself leaves it
                    pass
                finally:
                    self._disable_module_getattr = self._disable_call_module = False
            return proxy

        def iter(self, obj: torch.fx.Proxy) -> Iterator[Any]:
            # `(*x.shape[:-1], -1, d)`: a size has a fixed number of entries, each one stays a traced value.
            metadata = getattr(obj, "_metadata", None)
            if isinstance(metadata, (torch.Size, tuple, list)):
                return iter([obj[index] for index in range(len(metadata))])
            return super().iter(obj)

    leaf_set = frozenset([*leaves, *spare])
    with capture_mode(model, training=False):
        try:
            root = _explicit_root(model, example_inputs)
            with _mask_builders_as_leaves():
                graph = LeafHFTracer().trace(root, dummy_inputs=dict(example_inputs))
        except Exception as error:  # noqa: BLE001 - reported with the front-end's name
            raise trace_error("hf_fx", model, error, "tracer='export'") from error
    return _finish(model, graph, leaves, spare, fallback=root)


def _leaf_metadata(module: nn.Module, args: Any, kwargs: Any) -> Any:
    """What ``module`` returns, on ``meta``, for the traced ``args``/``kwargs`` (proxies with metadata)."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))

    def concrete(value: Any) -> Any:
        if isinstance(value, torch.fx.Proxy):
            value = getattr(value, "_metadata", None)
            if not isinstance(value, torch.Tensor):
                raise TypeError("a leaf's input has no shape to propagate")
            return value if device.type == "meta" else torch.zeros(value.shape, dtype=value.dtype, device=device)
        return value

    with torch.no_grad():
        out = type(module).forward(
            module, *torch.fx.node.map_aggregate(args, concrete), **torch.fx.node.map_aggregate(kwargs, concrete)
        )
    return torch.fx.node.map_aggregate(out, lambda v: v.to("meta") if isinstance(v, torch.Tensor) else v)


def _explicit_root(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> nn.Module:
    """A stand-in for ``model`` to trace: the same modules, parameters and buffers at the same paths, whose
    ``forward`` takes exactly the ``example_inputs`` names and calls the model's own ``forward`` with them.

    torch.fx reads the traced forward's code object, so a forward behind a ``functools.wraps`` decorator or
    with ``**kwargs`` (every recent decoder in transformers 4.5x) cannot be traced directly. The stand-in is a
    subclass instance with shallow copies of the model's attribute dicts: modules the tracer adds land on it,
    never on ``model``. Inputs not named are left to the model's defaults.
    """
    names = list(example_inputs)
    bad = [name for name in names if not name.isidentifier() or keyword.iskeyword(name)]
    if bad:
        raise LNTuneTraceError(f"example_inputs names {bad} are not Python identifiers; tracer='hf_fx' needs them.")
    cls = type(model)
    namespace: dict = {"_model_forward": cls.forward}
    exec(  # noqa: S102 - a fixed template over validated identifiers
        f"def forward(self, {', '.join(names)}):\n"
        f"    return _model_forward(self, {', '.join(f'{name}={name}' for name in names)})\n",
        namespace,
    )
    stand_in = type(cls.__name__, (cls,), {"forward": namespace["forward"], "__module__": cls.__module__})
    root = stand_in.__new__(stand_in)
    root.__dict__.update(model.__dict__)
    for attr in ("_modules", "_parameters", "_buffers"):
        setattr(root, attr, dict(getattr(model, attr)))
    return root


@contextlib.contextmanager
def _mask_builders_as_leaves() -> Iterator[None]:
    """While tracing, make every call of a `transformers.masking_utils` mask builder one graph node.

    The builders compute the mask with ``torch.vmap`` over index tensors (which cannot take a proxy) and branch
    on the mask's values (is it all ones?); neither traces. Each module of transformers that imported a builder
    gets a stand-in for the trace's duration that records ``hf_attention_mask(...)`` with the builder's name,
    the tensors and the few config fields it reads, and calls the real builder for anything else (a cache, an
    extra mask function, an attention implementation whose mask is not a plain tensor). Restored afterwards.
    """
    from transformers import masking_utils

    originals = {name: getattr(masking_utils, name) for name in _MASK_BUILDERS if hasattr(masking_utils, name)}
    patched = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("transformers") or module is masking_utils:
            continue
        for attr, value in list(vars(module).items()):
            for name, builder in originals.items():
                if value is builder:
                    patched.append((module, attr, value))
                    setattr(module, attr, _mask_leaf_recorder(name, builder))
    try:
        yield
    finally:
        for module, attr, value in patched:
            setattr(module, attr, value)


def _mask_leaf_recorder(name: str, builder: Callable[..., Any]) -> Callable[..., Any]:
    def record(
        config: Any,
        input_embeds: Any,
        attention_mask: Any,
        cache_position: Any,
        past_key_values: Any,
        position_ids: Any = None,
        or_mask_function: Any = None,
        and_mask_function: Any = None,
    ) -> Any:
        tensors = (input_embeds, attention_mask, cache_position, position_ids)
        proxies = [value for value in tensors if isinstance(value, torch.fx.Proxy)]
        implementation = getattr(config, "_attn_implementation", None)
        if (
            not proxies
            or past_key_values is not None
            or or_mask_function is not None
            or and_mask_function is not None
            or implementation not in _LEAF_MASK_IMPLEMENTATIONS
        ):
            return builder(
                config, input_embeds, attention_mask, cache_position, past_key_values, position_ids,
                or_mask_function, and_mask_function,
            )  # fmt: skip
        window = getattr(config, "attention_chunk_size" if "chunked" in name else "sliding_window", None)
        return proxies[0].tracer.create_proxy(
            "call_function", hf_attention_mask, (name, implementation, window, *tensors), {}
        )

    return record


def hf_attention_mask(
    builder: str,
    attn_implementation: str,
    window: int | None,
    input_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache_position: torch.Tensor,
    position_ids: torch.Tensor | None,
) -> torch.Tensor:
    """The 4D attention mask ``transformers.masking_utils.<builder>`` makes without a KV cache, as one graph node.

    ``window`` is the config's sliding window (or attention chunk size for the chunked builder). Where the
    builder returns ``None`` for sdpa (no padding: the attention then runs with ``is_causal=True``), this
    returns the boolean causal mask that means the same, so the graph always passes a tensor on. On meta
    tensors (the tracer's shape propagation) it returns the mask's shape and dtype on ``meta``.
    """
    if input_embeds.device.type == "meta":
        values = [None if t is None else torch.zeros(t.shape, dtype=t.dtype) for t in (input_embeds, attention_mask)]
        indices = [
            None if t is None else torch.zeros(t.shape, dtype=torch.long) for t in (cache_position, position_ids)
        ]
        return hf_attention_mask(builder, attn_implementation, window, *values, *indices).to("meta")
    from transformers import masking_utils

    config = _MaskConfig(attn_implementation, window)
    mask = getattr(masking_utils, builder)(config, input_embeds, attention_mask, cache_position, None, position_ids)
    if mask is None:
        keys = torch.arange(input_embeds.shape[1], device=cache_position.device)
        mask = (keys[None, :] <= cache_position[:, None]).expand(input_embeds.shape[0], 1, -1, -1)
    return mask


class _MaskConfig:
    """The config fields transformers' mask builders read."""

    def __init__(self, attn_implementation: str, window: int | None) -> None:
        self._attn_implementation = attn_implementation
        self.sliding_window = window
        self.attention_chunk_size = window


def _finish(
    model: nn.Module,
    graph: torch.fx.Graph,
    leaves: Sequence[str],
    spare: Sequence[str],
    fallback: nn.Module | None = None,
) -> torch.fx.GraphModule:
    called = {str(node.target) for node in graph.nodes if node.op == "call_module"}
    missing = [path for path in leaves if path not in called]
    if missing:
        raise LNTuneTraceError(
            f"the captured graph of {type(model).__name__} never calls {missing[:5]} as a module, so they cannot "
            "be tuned; exclude them or use tracer='export'."
        )
    gm = build_graph_module(
        alias_model(model), graph, leaves=[*leaves, *spare], fallback=fallback, class_name=type(model).__name__
    )
    gm.train(model.training)
    return gm


def _defaults_outside(model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> dict:
    import inspect

    concrete = {}
    for name, parameter in inspect.signature(model.forward).parameters.items():
        if name in example_inputs or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is not parameter.empty:
            concrete[name] = parameter.default
    return concrete
