"""An on-disk cache of raw `torch.export` captures, so that a process pays the capture of an architecture once.

What is cached is the graph `torch.export.export(...).module()` gives (with export's shape guards removed), before
`fold_module_calls` and every later pass: every pass runs again on a hit, so the result is the result of a cold
capture. Weights are never stored: parameters and buffers are named by their paths and bound to the new model's
own tensors (storage shared, as on a cold capture). Stored are only the graphs (nodes, targets, arguments and the
node metadata passes read: ``val`` fake tensors with their symbolic shapes, ``tensor_meta``, ``nn_module_stack``,
``torch_fn``, ``custom``, ``stack_trace``), the graph's input/output tree spec, and the bytes of tensor constants
the model made in its forward (export lifts them; they are no state of the model). ``node.meta["from_node"]``
(provenance records of export's own passes) is dropped.

Format and safety. An entry is one file: a magic line, a JSON header (format version, the full key, a SHA-256 of
the payload, the payload's length) and the payload: our own JSON description of the graphs followed by the raw
bytes of the constants. Loading parses JSON and copies bytes into tensors (`torch.frombuffer`); nothing is
unpickled, no Python expression is evaluated: nodes are only placeholders, attribute reads (no ``__`` names),
module calls, outputs and function calls; call targets resolve only to ``torch.ops`` operators or to a fixed list
of pure functions (`_FUNCTIONS`: arithmetic, indexing, torch's symbolic-size helpers), symbolic sizes are rebuilt from
an expression tree of allowlisted sympy classes, and tree specs are read by `torch.utils._pytree.treespec_loads`
(which only accepts registered types). A corrupt, truncated or foreign entry (another key inside, a bad checksum,
a node that does not rebuild) is ignored with a warning, and the fresh capture overwrites it. Entries are written
to a temporary file in the same directory and moved into place with `os.replace`, so readers see a whole old
entry or a whole new one, and two writers of one key both leave a valid entry.

Key: everything that decides the raw graph (`capture_key`): the model's classes and the source files defining
them, every module's plain attributes and parameter/buffer names, shapes, dtypes and devices (device type only),
the config(s) (JSON, sorted), the input signature (names, dtypes, static sizes, which dims are dynamic), global
torch state that export records (default dtype, grad mode), the versions of Python, torch and transformers, and
a hash of fx-lntune's own source files. The example sizes of dynamic dims are not in the key: a hit is used only
if the new example inputs satisfy the cached graph's shape constraints (`torch.export`'s own guarantee that the
program is valid for every input within them), and misses otherwise. Not cacheable (captured normally, nothing
written): models with forward hooks, classes without readable source, and graphs holding values this format does
not describe (script objects, quantized tensors, unbacked symbols, ...).

Location: ``$FX_LNTUNE_CACHE_DIR``, default ``$XDG_CACHE_HOME/fx-lntune`` (``~/.cache/fx-lntune``); an empty
``FX_LNTUNE_CACHE_DIR`` or ``lntune_transform(..., cache=False)`` turns the cache off.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import hashlib
import inspect
import json
import logging
import math
import os
import struct
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import sympy
import torch
import torch.fx
import torch.nn as nn

from fx_lntune.capture._build import _configs, _has_path, _lookup
from fx_lntune.modules import ensure_module

__all__ = [
    "FORMAT",
    "CacheWarning",
    "STATS",
    "cache_dir",
    "caching",
    "capture_key",
    "clear",
    "entries",
    "load",
    "store",
]

FORMAT = 1
_MAGIC = b"FXLNTUNE-CAPTURE\n"
_SUFFIX = ".fxcap"
_ENV = "FX_LNTUNE_CACHE_DIR"
log = logging.getLogger(__name__)

# What the cache did in this process (tests read it to tell a hit from a miss without timing anything).
STATS: collections.Counter[str] = collections.Counter()

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("fx_lntune_capture_cache", default=True)


class CacheWarning(UserWarning):
    """A cache entry could not be used or written; the capture ran (or was kept) without it."""


class _Unsupported(Exception):
    """The capture holds something this format does not describe: it is not cached."""


@contextlib.contextmanager
def caching(enabled: bool) -> Iterator[None]:
    """Turn the capture cache off for the captures inside the block when ``enabled`` is false
    (``lntune_transform``'s ``cache=``); ``True`` leaves it as the enclosing block set it."""
    token = _enabled.set(_enabled.get() and bool(enabled))
    try:
        yield
    finally:
        _enabled.reset(token)


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off (``cache=False``, or ``FX_LNTUNE_CACHE_DIR=""``)."""
    if not _enabled.get():
        return None
    value = os.environ.get(_ENV)
    if value is not None:
        return Path(value).expanduser() if value else None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fx-lntune"


# --------------------------------------------------------------------------------------------------- the key


def capture_key(model: nn.Module, example_inputs: Mapping[str, Any], dynamic_shapes: Mapping[str, Any]) -> str | None:
    """The hex key of ``model``'s raw export capture with these inputs, or None when it cannot be cached (or the
    cache is off)."""
    if cache_dir() is None:
        return None
    try:
        parts = {
            "format": FORMAT,
            "frontend": "export",
            "versions": _versions(),
            "fx_lntune": _own_source_hash(),
            "classes": _class_sources(model),
            "modules": _module_tree(model),
            "configs": _configs_of(model),
            "inputs": _input_signature(example_inputs, dynamic_shapes),
            "torch_state": [str(torch.get_default_dtype()), torch.is_grad_enabled(), _autocast_state()],
        }
    except _Unsupported as why:
        log.info("capture cache: not cacheable: %s", why)
        STATS["uncacheable"] += 1
        return None
    except Exception as error:  # noqa: BLE001 - a cache must never break a capture
        warnings.warn(f"fx-lntune could not key this capture for its cache: {error!r}", CacheWarning, 2)
        STATS["uncacheable"] += 1
        return None
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _versions() -> dict[str, str | None]:
    try:
        import transformers

        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers_version}


@functools.cache
def _own_source_hash() -> str:
    """A hash of every source file of fx_lntune (its passes included): an edit changes it, whatever the version says."""
    digest = hashlib.sha256()
    root = Path(sys.modules["fx_lntune"].__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _class_sources(model: nn.Module) -> dict[str, str]:
    """For every class in the MRO of every submodule: a hash of the file defining it (or of its source)."""
    classes: dict[str, type] = {}
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls is not object:
                classes.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
    sources = {}
    for name, cls in classes.items():
        source_module = sys.modules.get(cls.__module__)
        file = getattr(source_module, "__file__", None)
        if file and os.path.exists(file):
            stat = os.stat(file)
            sources[name] = _file_hash(file, stat.st_mtime_ns, stat.st_size)
            continue
        try:
            sources[name] = hashlib.sha256(inspect.getsource(cls).encode()).hexdigest()
        except (OSError, TypeError) as error:
            raise _Unsupported(f"no source for class {name}") from error
    return sources


_PRIMITIVES = (bool, int, float, str, type(None))
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", "training"})


def _module_tree(model: nn.Module) -> list[Any]:
    """Every module: its path, class, plain attributes, and its parameters' and buffers' names, shapes, dtypes."""
    from torch.nn.modules import module as module_globals

    hook_dicts = [name for name in vars(nn.Module()) if "hook" in name]
    if any(
        getattr(module_globals, name, None)
        for name in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks")
    ):
        raise _Unsupported("global module hooks are registered")
    tree = []
    for path, module in model.named_modules(remove_duplicate=False):
        hooks = [
            [name, [_hook_key(hook) for hook in getattr(module, name).values()]]
            for name in hook_dicts
            if getattr(module, name, None) and isinstance(getattr(module, name), dict)
        ]
        attrs = {
            name: _key_value(value)
            for name, value in vars(module).items()
            if name not in _MODULE_INTERNALS and "hook" not in name
        }
        params = [
            [name, list(p.shape), str(p.dtype), p.device.type, p.requires_grad] if p is not None else [name, None]
            for name, p in module._parameters.items()
        ]
        buffers = [
            [name, list(b.shape), str(b.dtype), b.device.type, name in module._non_persistent_buffers_set]
            if b is not None
            else [name, None]
            for name, b in module._buffers.items()
        ]
        tree.append([path, f"{type(module).__module__}.{type(module).__qualname__}", attrs, params, buffers, hooks])
    return tree


def _hook_key(hook: Any) -> list[Any]:
    """A hook by the function it calls and a hash of the file defining that function (or of its source)."""
    arguments = []
    while isinstance(hook, functools.partial):
        arguments.append([_key_value(arg) for arg in hook.args])
        hook = hook.func
    name = f"{getattr(hook, '__module__', None)}.{getattr(hook, '__qualname__', type(hook).__qualname__)}"
    file = getattr(sys.modules.get(getattr(hook, "__module__", None) or ""), "__file__", None)
    if file and os.path.exists(file):
        stat = os.stat(file)
        return [name, _file_hash(file, stat.st_mtime_ns, stat.st_size), arguments]
    try:
        return [name, hashlib.sha256(inspect.getsource(hook).encode()).hexdigest(), arguments]
    except (OSError, TypeError) as error:
        raise _Unsupported(f"no source for hook {name}") from error


def _key_value(value: Any) -> Any:
    """A stable description of a plain attribute (its value for primitives; its type for anything else)."""
    if isinstance(value, _PRIMITIVES):
        return value if not isinstance(value, float) or math.isfinite(value) else repr(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (list, tuple)) and len(value) <= 64:
        return [_key_value(item) for item in value]
    if isinstance(value, dict) and len(value) <= 64 and all(isinstance(key, str) for key in value):
        return {key: _key_value(item) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return ["tensor", list(value.shape), str(value.dtype), value.device.type]
    if isinstance(value, functools.partial):
        value = value.func
    return ["object", f"{type(value).__module__}.{type(value).__qualname__}", getattr(value, "__qualname__", None)]


def _configs_of(model: nn.Module) -> list[str]:
    described = []
    for config in _configs(model):
        fields = dict(config.to_dict())
        for name in ("_name_or_path", "transformers_version"):
            fields.pop(name, None)
        fields["__attn_implementation"] = getattr(config, "_attn_implementation", None)
        described.append(json.dumps(fields, sort_keys=True, default=str))
    return sorted(described)


def _input_signature(example_inputs: Mapping[str, Any], dynamic_shapes: Mapping[str, Any]) -> list[Any]:
    signature = []
    for name, value in example_inputs.items():
        if isinstance(value, torch.Tensor):
            dims = set((dynamic_shapes.get(name) or {}).keys())
            shape = [None if dim in dims else size for dim, size in enumerate(value.shape)]
            signature.append([name, str(value.dtype), value.device.type, shape, value.requires_grad])
        elif isinstance(value, _PRIMITIVES):
            signature.append([name, "value", value])
        else:
            raise _Unsupported(f"example input {name!r} is a {type(value).__name__}")
    return signature


def _autocast_state() -> list[Any]:
    state = []
    for device in ("cpu", "cuda"):
        with contextlib.suppress(Exception):
            state.append([device, torch.is_autocast_enabled(device)])
    return state


# ----------------------------------------------------------------------------------------- store and load


def store(key: str | None, graph: torch.fx.Graph, unlifted: nn.Module, model: nn.Module, training: bool) -> None:
    """Write the raw capture (``graph``, whose lifted constants and subgraphs live in ``unlifted``) under ``key``.

    Does nothing when the cache is off or the capture cannot be described; never raises for a cache problem
    (a warning says what went wrong), so a cache never breaks a capture.
    """
    directory = cache_dir()
    if key is None or directory is None:
        return
    try:
        program, blobs = _Writer(unlifted, model).write(graph)
    except _Unsupported as why:
        log.info("capture cache: not cacheable: %s", why)
        STATS["uncacheable"] += 1
        return
    except Exception as error:  # noqa: BLE001 - a cache must never break a capture
        warnings.warn(f"fx-lntune could not describe this capture for its cache: {error!r}", CacheWarning, 2)
        STATS["uncacheable"] += 1
        return
    program["training"] = training
    body = json.dumps(program, separators=(",", ":"), allow_nan=False).encode()
    payload = body + b"".join(blobs)
    header = {
        "format": FORMAT,
        "key": key,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload_bytes": len(payload),
        "program_bytes": len(body),
        "model_class": type(model).__name__,
        "created": time.time(),
        "versions": _versions(),
    }
    header_bytes = json.dumps(header).encode()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=".tmp-", suffix=_SUFFIX, dir=directory)
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(_MAGIC + struct.pack("<Q", len(header_bytes)) + header_bytes + payload)
            os.replace(temp, directory / f"{key}{_SUFFIX}")
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
    except OSError as error:
        warnings.warn(f"fx-lntune could not write its capture cache in {directory}: {error}", CacheWarning, 2)
        return
    STATS["writes"] += 1


def load(
    key: str | None, model: nn.Module, example_inputs: Mapping[str, Any]
) -> tuple[torch.fx.Graph, nn.Module] | None:
    """The cached raw capture for ``key`` bound to ``model``: ``(graph, fallback)``, where ``fallback`` holds the
    lifted constants and export's subgraph modules at the paths the graph names; None on a miss.

    A corrupt or foreign entry warns and counts as a miss (the caller's fresh capture then overwrites it).
    """
    directory = cache_dir()
    if key is None or directory is None:
        return None
    path = directory / f"{key}{_SUFFIX}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        STATS["misses"] += 1
        return None
    except OSError as error:
        warnings.warn(f"fx-lntune could not read its capture cache entry {path}: {error}", CacheWarning, 2)
        STATS["misses"] += 1
        return None
    try:
        header, body, blobs = _split(data, key)
        program = json.loads(body)
        result = _Reader(program, blobs, model).read()
        if not _inputs_fit(program, example_inputs):
            STATS["misses"] += 1
            log.info("capture cache: entry %s does not fit these example sizes", key[:12])
            return None
    except Exception as error:  # noqa: BLE001 - any problem with an entry is a miss, never a wrong graph
        warnings.warn(
            f"fx-lntune ignored a corrupt capture cache entry {path} ({type(error).__name__}: {error}); "
            "capturing again and rewriting it.",
            CacheWarning,
            2,
        )
        STATS["corrupt"] += 1
        STATS["misses"] += 1
        return None
    STATS["hits"] += 1
    log.info("capture cache: hit %s (%s)", key[:12], header.get("model_class"))
    return result


def _split(data: bytes, key: str) -> tuple[dict, bytes, bytes]:
    if not data.startswith(_MAGIC):
        raise ValueError("not a capture cache entry")
    offset = len(_MAGIC)
    (header_length,) = struct.unpack_from("<Q", data, offset)
    offset += 8
    header = json.loads(data[offset : offset + header_length])
    payload = data[offset + header_length :]
    if header.get("format") != FORMAT or header.get("key") != key:
        raise ValueError("the entry holds another key or format")
    if len(payload) != header["payload_bytes"]:
        raise ValueError(f"truncated: {len(payload)} of {header['payload_bytes']} bytes")
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise ValueError("checksum mismatch")
    return header, payload[: header["program_bytes"]], payload[header["program_bytes"] :]


def _inputs_fit(program: dict, example_inputs: Mapping[str, Any]) -> bool:
    """Whether the example inputs satisfy the cached graph's input shapes: static dims equal, each symbol one
    size within its range."""
    sizes: dict[str, int] = {}
    symbols = program["symbols"]
    for name, dims in program["input_shapes"].items():
        value = example_inputs.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() != len(dims):
            return False
        for dim, size in zip(dims, value.shape, strict=True):
            if isinstance(dim, int):
                if dim != size:
                    return False
            elif sizes.setdefault(dim, size) != size:
                return False
    for name, size in sizes.items():
        _, low, high = symbols[name]
        if size < low or (high is not None and size > high):
            return False
    return True


# ------------------------------------------------------------------------------------------- cache admin


def entries() -> list[dict[str, Any]]:
    """The headers of the entries in the cache directory (with ``path`` and ``bytes``), newest first."""
    directory = cache_dir()
    found = []
    if directory is None or not directory.is_dir():
        return found
    for path in directory.glob(f"*{_SUFFIX}"):
        if path.name.startswith(".tmp-"):
            continue
        info: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size}
        try:
            with open(path, "rb") as file:
                head = file.read(len(_MAGIC) + 8)
                (length,) = struct.unpack_from("<Q", head, len(_MAGIC))
                info.update(json.loads(file.read(length)))
        except (OSError, ValueError, struct.error):
            info["corrupt"] = True
        found.append(info)
    return sorted(found, key=lambda entry: -float(entry.get("created", 0)))


def clear() -> int:
    """Delete every entry (and left-over temporary file) in the cache directory; the number of files deleted."""
    directory = cache_dir()
    if directory is None or not directory.is_dir():
        return 0
    removed = 0
    for path in directory.glob(f"*{_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------ graph writer

_DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)}
_LAYOUTS = {str(layout).removeprefix("torch."): layout for layout in (torch.strided, torch.sparse_coo, torch.jagged)}
_MEMORY_FORMATS = {
    str(fmt).removeprefix("torch."): fmt
    for fmt in (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)
}
# The Python functions (not torch.ops operators) a cached graph may call: pure arithmetic, comparisons and
# indexing, torch's symbolic-size helpers and its grad-mode / autocast switches. Nothing that reaches attributes
# by name, calls a value, or touches files: a forged entry can describe no other call.
_OPERATORS = (
    "getitem add sub mul truediv floordiv mod pow neg pos abs eq ne lt le gt ge and_ or_ xor not_ invert "
    "lshift rshift matmul truth"
).split()
_FUNCTIONS = frozenset(
    [(module, name) for module in ("operator", "_operator") for name in _OPERATORS]
    + [("math", name) for name in ("ceil", "floor", "trunc", "sqrt", "log", "exp", "log2", "isnan", "isinf")]
    + [("torch", name) for name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sum")]
    + [("torch", "sym_sqrt"), ("torch", "_sym_sqrt"), ("torch", "_assert"), ("torch._C", "_set_grad_enabled")]
    + [("torch.amp.autocast_mode", "_enter_autocast"), ("torch.amp.autocast_mode", "_exit_autocast")]
    + [("torch.fx.experimental.sym_node", "sym_sqrt")]
)
_OPS = frozenset({"placeholder", "get_attr", "call_function", "call_module", "output"})
_KEPT_META = ("val", "tensor_meta", "nn_module_stack", "torch_fn", "custom", "stack_trace", "seq_nr")
_DROPPED_META = frozenset({"from_node"})
_SEQUENCES = (list, tuple, torch.fx.immutable_collections.immutable_list)
_SYMNODES = (("SI", "create_symintnode"), ("SB", "create_symboolnode"), ("SF", "create_symfloatnode"))


def _sympy_classes() -> dict[str, type]:
    import torch.utils._sympy.functions as functions

    classes = {
        name: cls
        for name, cls in vars(functions).items()
        if isinstance(cls, type) and issubclass(cls, sympy.Basic) and cls.__module__ == functions.__name__
    }
    for name in ("Add", "Mul", "Pow", "Max", "Min", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Abs"):
        classes.setdefault(name, getattr(sympy, name))
    return classes


_SYMPY = _sympy_classes()


class _Writer:
    def __init__(self, unlifted: nn.Module, model: nn.Module) -> None:
        self.unlifted, self.model = unlifted, model
        self.exprs: list[Any] = []
        self.expr_index: dict[Any, int] = {}
        self.symbols: dict[str, list[Any]] = {}
        self.constants: list[dict[str, Any]] = []
        self.blobs: list[bytes] = []
        self.offset = 0
        self.shape_env = None
        self.storages: list[Any] = []
        self.storage_index: dict[tuple[int, torch.dtype], int] = {}

    def write(self, graph: torch.fx.Graph) -> tuple[dict[str, Any], list[bytes]]:
        from torch.utils._pytree import treespec_dumps

        codegen = graph._codegen
        if type(codegen) is not torch.fx.graph._PyTreeCodeGen:
            raise _Unsupported(f"graph code generator {type(codegen).__name__}")
        info = codegen.pytree_info
        subgraphs = {}
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module"):
                self._attribute(str(node.target), subgraphs)
        program = {
            "graph": self._graph(graph),
            "subgraphs": {path: self._graph(sub.graph) for path, sub in subgraphs.items()},
            "pytree": [list(info.orig_args), treespec_dumps(info.in_spec), treespec_dumps(info.out_spec)],
            "constants": self.constants,
            "exprs": self.exprs,
            "symbols": self.symbols,
            "storages": self.storages,
            "input_shapes": self._input_shapes(graph),
        }
        return program, self.blobs

    def _attribute(self, target: str, subgraphs: dict[str, torch.fx.GraphModule]) -> None:
        if _has_path(self.model, target) or target in subgraphs or any(c["name"] == target for c in self.constants):
            return
        try:
            value = _lookup(self.unlifted, target)
        except AttributeError as error:
            raise _Unsupported(f"attribute {target!r} not found") from error
        if isinstance(value, torch.fx.GraphModule):
            if any(node.op in ("get_attr", "call_module") for node in value.graph.nodes):
                raise _Unsupported(f"subgraph {target!r} reads attributes")
            if type(value.graph._codegen) is not torch.fx.graph.CodeGen:
                raise _Unsupported(f"subgraph {target!r} has a custom code generator")
            subgraphs[target] = value
        elif type(value) in (torch.Tensor, nn.Parameter):
            self._constant(target, value)
        else:
            raise _Unsupported(f"attribute {target!r} is a {type(value).__name__}")

    def _constant(self, target: str, tensor: torch.Tensor) -> None:
        if tensor.is_quantized or tensor.is_sparse or tensor.layout != torch.strided:
            raise _Unsupported(f"constant {target!r} has layout {tensor.layout}")
        entry = {
            "name": target,
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "shape": list(tensor.shape),
            "stride": list(tensor.stride()),
            "device": str(tensor.device),
            "parameter": isinstance(tensor, nn.Parameter),
            "requires_grad": tensor.requires_grad,
        }
        if tensor.device.type != "meta":
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            entry.update(offset=self.offset, nbytes=len(data))
            self.blobs.append(data)
            self.offset += len(data)
        self.constants.append(entry)

    def _input_shapes(self, graph: torch.fx.Graph) -> dict[str, list[Any]]:
        shapes = {}
        for node in graph.nodes:
            if node.op != "placeholder":
                continue
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                dims = []
                for size in val.shape:
                    if isinstance(size, torch.SymInt):
                        expr = size.node.expr
                        if isinstance(expr, sympy.Integer):
                            dims.append(int(expr))
                            continue
                        if not isinstance(expr, sympy.Symbol):
                            raise _Unsupported(f"input {node.name} has a size {expr}")
                        dims.append(str(expr))
                    else:
                        dims.append(int(size))
                shapes[str(node.target)] = dims
        return shapes

    def _graph(self, graph: torch.fx.Graph) -> list[Any]:
        nodes = []
        for node in graph.nodes:
            if node.op not in _OPS:
                raise _Unsupported(f"a {node.op} node")
            meta = {}
            for key, value in node.meta.items():
                if key in _DROPPED_META:
                    continue
                if key not in _KEPT_META:
                    raise _Unsupported(f"node metadata {key!r}")
                meta[key] = self._meta(key, value)
            target = node.target if node.op != "call_function" else self._function(node.target)
            nodes.append([node.op, node.name, target, self._value(node.args), self._value(node.kwargs), meta])
        return nodes

    def _function(self, fn: Any) -> Any:
        if isinstance(fn, torch._ops.OpOverload):
            return {"op": [fn.namespace, fn._schema.name.split("::")[-1], fn._overloadname]}
        if isinstance(fn, torch._ops.HigherOrderOperator):
            if getattr(torch.ops.higher_order, fn.__name__, None) is not fn:
                raise _Unsupported(f"higher-order operator {fn}")
            return {"hop": fn.__name__}
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
        if module and qualname:
            with contextlib.suppress(Exception):
                if _resolve_function(module, qualname) is fn:
                    return {"fn": [module, qualname]}
        raise _Unsupported(f"call target {fn!r}")

    def _meta(self, key: str, value: Any) -> Any:
        if key == "tensor_meta":
            if value is None:
                return None
            if not hasattr(value, "_fields") or value.is_quantized:
                raise _Unsupported("tensor_meta")
            return [
                [self._size(s) for s in value.shape],
                str(value.dtype).removeprefix("torch."),
                value.requires_grad,
                [self._size(s) for s in value.stride],
                self._value(value.memory_format),
            ]
        if key == "val":
            return self._val(value)
        return self._value(value)

    def _val(self, value: Any) -> Any:
        from torch._subclasses.fake_tensor import FakeTensor

        if isinstance(value, FakeTensor):
            if value.layout != torch.strided or value.is_quantized:
                raise _Unsupported("a non-strided fake tensor")
            self.shape_env = value.fake_mode.shape_env or self.shape_env
            return {
                "T": [
                    [self._size(s) for s in value.shape],
                    [self._size(s) for s in value.stride()],
                    self._size(value.storage_offset()),
                    str(value.dtype).removeprefix("torch."),
                    str(value.device),
                    value.requires_grad,
                    self._storage(value),
                ]
            }
        if isinstance(value, (torch.SymInt, torch.SymBool, torch.SymFloat)):
            kind = {torch.SymInt: "SI", torch.SymBool: "SB", torch.SymFloat: "SF"}[type(value)]
            self.shape_env = value.node.shape_env
            return {kind: self._expr(value.node.expr)}
        if isinstance(value, (list, tuple)):
            return {"l" if isinstance(value, list) else "t": [self._val(item) for item in value]}
        if isinstance(value, torch.Tensor):
            raise _Unsupported("a real tensor as node value")
        return self._value(value)

    def _storage(self, value: torch.Tensor) -> int:
        """The index of ``value``'s storage (per dtype), so that values sharing storage (views) share it again."""
        from torch.multiprocessing.reductions import StorageWeakRef

        storage = value.untyped_storage()
        key = (StorageWeakRef(storage).cdata, value.dtype)
        index = self.storage_index.get(key)
        if index is None:
            index = self.storage_index[key] = len(self.storages)
            self.storages.append(self._size(storage.nbytes() // value.element_size()))
        return index

    def _size(self, size: Any) -> Any:
        if isinstance(size, torch.SymInt):
            self.shape_env = size.node.shape_env
            return {"e": self._expr(size.node.expr)}
        return int(size)

    def _expr(self, expr: sympy.Basic) -> int:
        index = self.expr_index.get(expr)
        if index is None:
            encoded = self._tree(expr)
            index = self.expr_index[expr] = len(self.exprs)
            self.exprs.append(encoded)
        return index

    def _tree(self, expr: sympy.Basic) -> Any:
        if isinstance(expr, sympy.Symbol):
            self._symbol(expr)
            return expr.name
        if isinstance(expr, sympy.Integer):
            return int(expr)
        if expr is sympy.true or expr is sympy.false:
            return bool(expr)
        if isinstance(expr, sympy.Rational):
            return ["Rational", int(expr.p), int(expr.q)]
        if isinstance(expr, sympy.Float):
            return ["Float", str(expr)]
        name = type(expr).__name__
        if _SYMPY.get(name) is not type(expr):
            raise _Unsupported(f"symbolic expression {expr} ({name})")
        return [name, *(self._tree(arg) for arg in expr.args)]

    def _symbol(self, symbol: sympy.Symbol) -> None:
        if symbol.name in self.symbols:
            return
        env = self.shape_env
        values = getattr(env, "backed_var_to_val", None) or getattr(env, "var_to_val", {})
        if env is None or symbol not in values or not symbol.name.startswith("s"):
            raise _Unsupported(f"symbol {symbol} is not a backed size")
        bounds = env.var_to_range.get(symbol)
        low = int(bounds.lower) if bounds is not None and isinstance(bounds.lower, sympy.Integer) else 0
        high = int(bounds.upper) if bounds is not None and isinstance(bounds.upper, sympy.Integer) else None
        self.symbols[symbol.name] = [int(values[symbol]), low, high]

    def _value(self, value: Any) -> Any:
        if isinstance(value, torch.fx.Node):
            return {"n": value.name}
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"f": repr(value)}
        if type(value) in _SEQUENCES:
            return {"l" if isinstance(value, list) else "t": [self._value(item) for item in value]}
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            return {"d": [[key, self._value(item)] for key, item in value.items()]}
        if isinstance(value, torch.dtype):
            return {"dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"device": str(value)}
        if isinstance(value, torch.layout):
            return {"layout": str(value).removeprefix("torch.")}
        if isinstance(value, torch.memory_format):
            return {"mf": str(value).removeprefix("torch.")}
        if isinstance(value, slice):
            return {"slice": [self._value(value.start), self._value(value.stop), self._value(value.step)]}
        if value is Ellipsis:
            return {"ellipsis": True}
        raise _Unsupported(f"a {type(value).__name__} in the graph")


def _resolve_function(module: str, qualname: str) -> Any:
    """``module.qualname`` if it is one of `_FUNCTIONS` (of a module already imported); else ValueError."""
    if (module, qualname) not in _FUNCTIONS:
        raise ValueError(f"{module}.{qualname} is not one of the functions loaded from a cache entry")
    obj: Any = sys.modules.get(module)
    if obj is None:
        raise ValueError(f"module {module!r} is not imported")
    return getattr(obj, qualname)


# ------------------------------------------------------------------------------------------ graph reader


class _Reader:
    def __init__(self, program: dict[str, Any], blobs: bytes, model: nn.Module) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        self.program, self.blobs, self.model = program, blobs, model
        self.shape_env = ShapeEnv()
        self.fake_mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self.symbols: dict[str, sympy.Symbol] = {}
        self.hints: dict[sympy.Symbol, int] = {}
        add = getattr(self.shape_env, "add_backed_var_to_val", None) or self.shape_env.add_var_to_val
        for name, (hint, low, high) in program["symbols"].items():
            symbol = sympy.Symbol(name, integer=True, positive=True)
            add(symbol, hint)
            self.shape_env.constrain_symbol_range(
                symbol, compiler_min=low, compiler_max=high if high is not None else int_oo()
            )
            self.symbols[name], self.hints[symbol] = symbol, hint
        self.exprs: list[sympy.Basic | None] = [None] * len(program["exprs"])
        self.symnodes: dict[tuple[str, int], Any] = {}
        self.devices: dict[str, torch.device] = {}
        self.bases: dict[int, torch.Tensor] = {}

    def read(self) -> tuple[torch.fx.Graph, nn.Module]:
        from torch.utils._pytree import treespec_loads

        fallback = nn.Module()
        for entry in self.program["constants"]:
            _place(fallback, entry["name"], self._constant(entry))
        for path, nodes in self.program["subgraphs"].items():
            sub = torch.fx.GraphModule(nn.Module(), self._graph(nodes, torch.fx.Graph()))
            _place(fallback, path, sub)
        orig_args, in_spec, out_spec = self.program["pytree"]
        graph = torch.fx.Graph()
        graph._codegen = torch.fx.graph._PyTreeCodeGen(
            torch.fx.graph._PyTreeInfo(list(orig_args), treespec_loads(in_spec), treespec_loads(out_spec))
        )
        return self._graph(self.program["graph"], graph), fallback

    def _constant(self, entry: dict[str, Any]) -> torch.Tensor:
        dtype = _DTYPES[entry["dtype"]]
        device = torch.device(entry["device"])
        if device.type == "meta":
            tensor = torch.empty_strided(entry["shape"], entry["stride"], dtype=dtype, device="meta")
        else:
            start, count = entry["offset"], entry["nbytes"]
            chunk = bytearray(self.blobs[start : start + count])
            if len(chunk) != count:
                raise ValueError(f"constant {entry['name']!r} is truncated")
            flat = torch.frombuffer(chunk, dtype=torch.uint8) if count else torch.empty(0, dtype=torch.uint8)
            values = flat.view(dtype).reshape(entry["shape"])
            tensor = torch.empty_strided(entry["shape"], entry["stride"], dtype=dtype, device=device)
            tensor.copy_(values)
        if entry["parameter"]:
            return nn.Parameter(tensor, requires_grad=entry["requires_grad"])
        return tensor.requires_grad_(entry["requires_grad"]) if tensor.is_floating_point() else tensor

    def _graph(self, nodes: list[Any], graph: torch.fx.Graph) -> torch.fx.Graph:
        env: dict[str, torch.fx.Node] = {}
        for op, name, target, args, kwargs, meta in nodes:
            if op not in _OPS:
                raise ValueError(f"node {name} is a {op!r} node")
            if op == "call_function":
                target = self._function(target)
            elif not isinstance(target, str) or "__" in target:
                raise ValueError(f"node {name} has target {target!r}")
            node = graph.create_node(op, target, self._value(args, env), self._value(kwargs, env), name=name)
            if node.name != name:
                raise ValueError(f"node {name} was rebuilt as {node.name}")
            node.meta = {key: self._meta(key, value, env) for key, value in meta.items()}
            env[name] = node
        return graph

    def _function(self, target: dict[str, Any]) -> Any:
        if "op" in target:
            namespace, name, overload = target["op"]
            return getattr(getattr(getattr(torch.ops, namespace), name), overload)
        if "hop" in target:
            hop = getattr(torch.ops.higher_order, target["hop"])
            if not isinstance(hop, torch._ops.HigherOrderOperator):
                raise ValueError(f"{target['hop']} is not a higher-order operator")
            return hop
        return _resolve_function(*target["fn"])

    def _meta(self, key: str, value: Any, env: dict[str, torch.fx.Node]) -> Any:
        if key == "val":
            return self._val(value)
        if key == "tensor_meta":
            if value is None:
                return None
            from torch.fx.passes.shape_prop import TensorMetadata

            shape, dtype, requires_grad, stride, memory_format = value
            return TensorMetadata(
                torch.Size([self._size(s) for s in shape]),
                _DTYPES[dtype],
                requires_grad,
                tuple(self._size(s) for s in stride),
                self._value(memory_format, env),
                False,
                {},
            )
        if key == "nn_module_stack":
            stack = self._value(value, env)
            return {name: tuple(entry) for name, entry in stack.items()}
        return self._value(value, env)

    def _val(self, value: Any) -> Any:
        if isinstance(value, dict):
            if "T" in value:
                return self._fake(*value["T"])
            for kind, create in _SYMNODES:
                if kind in value:
                    return self._symnode(kind, value[kind], create)
            if "l" in value or "t" in value:
                items = [self._val(item) for item in value.get("l", value.get("t"))]
                return items if "l" in value else tuple(items)
        return self._value(value, {})

    def _fake(self, shape, stride, offset, dtype, device, requires_grad, storage) -> torch.Tensor:
        """A fake tensor with the saved sizes, strides and offset, viewing the storage of its saved storage group
        (a flat meta tensor of the saved length: cheaper to make with symbolic sizes than a strided one)."""
        from torch._subclasses.fake_tensor import FakeTensor

        base = self.bases.get(storage)
        if base is None:
            numel = self._size(self.program["storages"][storage])
            base = self.bases[storage] = torch.empty((numel,), dtype=_DTYPES[dtype], device="meta")
        elem = base.as_strided([self._size(s) for s in shape], [self._size(s) for s in stride], self._size(offset))
        target = self.devices.get(device)
        if target is None:
            target = self.devices[device] = torch.device(device)
        fake = FakeTensor(self.fake_mode, elem, target)
        if requires_grad:
            fake.requires_grad_(True)
        return fake

    def _size(self, size: Any) -> Any:
        if isinstance(size, int):
            return size
        return self._symnode("SI", size["e"], "create_symintnode")

    def _symnode(self, kind: str, index: int, create: str) -> Any:
        node = self.symnodes.get((kind, index))
        if node is None:
            expr = self._expr(index)
            hint = expr.xreplace(self.hints)
            if kind == "SI":
                node = self.shape_env.create_symintnode(expr, hint=int(hint))
            elif kind == "SB":
                node = self.shape_env.create_symboolnode(expr)
            else:
                node = self.shape_env.create_symfloatnode(expr, hint=float(hint))
            self.symnodes[(kind, index)] = node
        return node

    def _expr(self, index: int) -> sympy.Basic:
        expr = self.exprs[index]
        if expr is None:
            expr = self.exprs[index] = self._tree(self.program["exprs"][index])
        return expr

    def _tree(self, tree: Any) -> sympy.Basic:
        if isinstance(tree, bool):
            return sympy.true if tree else sympy.false
        if isinstance(tree, int):
            return sympy.Integer(tree)
        if isinstance(tree, str):
            return self.symbols[tree]
        name, *args = tree
        if name == "Rational":
            return sympy.Rational(int(args[0]), int(args[1]))
        if name == "Float":
            return sympy.Float(str(args[0]))
        return _SYMPY[name](*(self._tree(arg) for arg in args))

    def _value(self, value: Any, env: dict[str, torch.fx.Node]) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            raise ValueError("bare list in an entry")
        (kind, item), *rest = value.items()
        if rest:
            raise ValueError(f"unknown value {value!r}")
        if kind == "n":
            return env[item]
        if kind == "l":
            return [self._value(x, env) for x in item]
        if kind == "t":
            return tuple(self._value(x, env) for x in item)
        if kind == "d":
            return {key: self._value(x, env) for key, x in item}
        if kind == "f":
            return float(item)
        if kind == "dtype":
            return _DTYPES[item]
        if kind == "device":
            device = self.devices.get(item)
            if device is None:
                device = self.devices[item] = torch.device(item)
            return device
        if kind == "layout":
            return _LAYOUTS[item]
        if kind == "mf":
            return _MEMORY_FORMATS[item]
        if kind == "slice":
            return slice(*(self._value(x, env) for x in item))
        if kind == "ellipsis":
            return Ellipsis
        raise ValueError(f"unknown value kind {kind!r}")


def int_oo() -> Any:
    from torch.utils._sympy.numbers import int_oo as infinity

    return infinity


def _place(root: nn.Module, path: str, value: Any) -> None:
    parent, _, name = path.rpartition(".")
    owner = ensure_module(root, parent)
    if isinstance(value, nn.Module):
        owner.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        owner.register_parameter(name, value)
    else:
        owner.register_buffer(name, value)
