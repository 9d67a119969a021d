"""Turn a captured graph into a plain GraphModule that owns its parameters and keeps the model's paths."""

from __future__ import annotations

import contextlib
import copy
import os
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.fx
import torch.nn as nn

from fx_lntune.errors import LNTuneTraceError
from fx_lntune.graph_inputs import GRAPH_FUNCTIONS
from fx_lntune.modules import ensure_module, set_submodule
from fx_lntune.passes._graphs import checkpointed_call

__all__ = ["ReloadTracer", "alias_model", "build_graph_module", "capture_mode", "trace_error"]


class ReloadTracer(torch.fx.Tracer):
    """The tracer torch.fx rebuilds an unpickled graph with (``GraphModule._tracer_cls``).

    Pickling a ``GraphModule`` keeps its code, not its graph, and traces the code again on load. torch.fx's
    default tracer would run every op on a buffer alone (``token_type_ids[:, :n]``) and bake the result into a
    new constant; with buffers read as graph values the reloaded graph is the saved one. Export's tracer class,
    which the graph would otherwise name, cannot be rebuilt without arguments.
    """

    proxy_buffer_attributes = True

    def __init__(self) -> None:
        # The graph's default-filling and loss calls, and a checkpointed layer call (`passes.checkpoint_layers`),
        # stay calls: run on proxies they would vanish into their internals.
        super().__init__(autowrap_functions=(*GRAPH_FUNCTIONS, checkpointed_call))


def alias_model(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters share storage with the model's (no data is copied).

    The copy's parameters are new ``nn.Parameter`` objects with ``requires_grad=False``, so freezing them and
    swapping modules in the graph never touches the user's model. Tied parameters stay tied; buffers are
    shared as they are.
    """
    memo: dict[int, Any] = {}
    for param in model.parameters():
        memo[id(param)] = nn.Parameter(param.detach(), requires_grad=False)
    for buffer in model.buffers():
        memo[id(buffer)] = buffer
    return copy.deepcopy(model, memo)


def build_graph_module(
    shell: nn.Module,
    graph: torch.fx.Graph,
    *,
    leaves: Iterable[str],
    fallback: nn.Module | None = None,
    class_name: str = "GraphModule",
) -> torch.fx.GraphModule:
    """A plain ``torch.fx.GraphModule`` running ``graph`` over ``shell``'s state.

    Every parameter and buffer of ``shell`` sits at its own path (so the state dict has the model's keys, with
    persistent buffers only), and every module in ``leaves`` at its path whether or not a node calls it yet.
    Attributes a node names that ``shell`` lacks (export's higher-order submodules, lifted constants) come
    from the same path in ``fallback``.
    """
    root: dict[str, Any] = {}
    constants: list[str] = []
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            target = str(node.target)
            own = _has_path(shell, target)
            root[target] = _lookup(shell if own else fallback, target)
            if not own and isinstance(root[target], torch.Tensor):
                constants.append(target)
    graph._tracer_cls = ReloadTracer  # kept by deepcopy, which rebuilds gm._tracer_cls from the graph
    gm = torch.fx.GraphModule(root, graph, class_name=class_name)
    for target in constants:
        # A tensor the model made in forward (export lifts it): it moves with the graph but is no state.
        owner_path, _, name = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        if name in owner._buffers:
            owner._non_persistent_buffers_set.add(name)
    for path in leaves:
        set_submodule(gm, path, shell.get_submodule(path))
    for owner_path, owner in shell.named_modules(remove_duplicate=False):
        if not owner._parameters and not owner._buffers:
            continue
        target = ensure_module(gm, owner_path)
        for name, param in owner._parameters.items():
            if param is not None and name not in target._parameters:
                target.register_parameter(name, param)
        for name, buffer in owner._buffers.items():
            if buffer is None:
                continue
            persistent = name not in owner._non_persistent_buffers_set
            if name in target._buffers:
                if not persistent:
                    target._non_persistent_buffers_set.add(name)
            else:
                target.register_buffer(name, buffer, persistent=persistent)
    _order_like(gm, shell)
    return gm


def _order_like(module: nn.Module, reference: nn.Module) -> None:
    """Reorder ``module``'s children and state recursively as in ``reference`` (in place), so that the graph
    module lists modules and state-dict keys in the model's order; what ``reference`` lacks goes last."""
    for attr in ("_modules", "_parameters", "_buffers"):
        mine, theirs = getattr(module, attr), getattr(reference, attr)
        rank = {name: index for index, name in enumerate(theirs)}
        ordered = sorted(mine.items(), key=lambda item: rank.get(item[0], len(rank)))
        mine.clear()
        mine.update(ordered)
    for name, child in module._modules.items():
        counterpart = reference._modules.get(name)
        if child is not None and counterpart is not None and child is not counterpart:
            _order_like(child, counterpart)


@contextlib.contextmanager
def capture_mode(model: nn.Module, *, training: bool) -> Iterator[None]:
    """Set ``model`` to train/eval and turn off every KV cache for the capture, then restore both exactly.

    Encoder-decoder and multimodal models keep copies of the config on submodules and as sub-configs; each
    would make the model return a cache object, which a graph cannot output.
    """
    modes = [(module, module.training) for module in model.modules()]
    caches = [
        (config, config.use_cache) for config in _configs(model) if isinstance(getattr(config, "use_cache", None), bool)
    ]
    try:
        model.train(training)
        for config, _ in caches:
            config.use_cache = False
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for config, use_cache in caches:
            config.use_cache = use_cache


def _configs(model: nn.Module) -> list[Any]:
    found: dict[int, Any] = {}
    pending = [getattr(module, "config", None) for module in model.modules()]
    while pending:
        config = pending.pop()
        if config is None or id(config) in found or not hasattr(config, "to_dict"):
            continue
        found[id(config)] = config
        pending.extend(value for value in vars(config).values() if hasattr(value, "model_type"))
    return list(found.values())


def _has_path(root: nn.Module, path: str) -> bool:
    try:
        _lookup(root, path)
    except AttributeError:
        return False
    return True


def _lookup(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def trace_error(frontend: str, model: nn.Module, error: BaseException, suggestion: str) -> LNTuneTraceError:
    """The error a front-end raises: its name, the model class, the first failing call in the model's own code
    (the innermost frame outside torch), what went wrong, and which front-end to try instead."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if not frame.filename.startswith(torch_dir)]
    where = ""
    if frames:
        frame = frames[-1]
        where = f" at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}()"
        if frame.line:
            where += f" `{frame.line.strip()[:120]}`"
    lines = str(error).strip().splitlines()
    first = lines[0][:300] if lines else "(no message)"
    return LNTuneTraceError(
        f"tracer='{frontend}' could not capture {type(model).__name__}{where}: {type(error).__name__}: {first}. "
        f"Try {suggestion}."
    )
