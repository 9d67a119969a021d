"""Inject adapters: turn each targeted ``call_module`` node's module into an adapter-dispatch module."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.fx
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.dispatch import AdapterDispatch, LNTuningDispatch, ModulesToSaveDispatch
from fx_lntune.errors import LNTuneConfigError
from fx_lntune.modules import set_submodule
from fx_lntune.passes._graphs import graph_modules, leaf_calls

__all__ = ["NODE_MARK", "inject_adapters"]

NODE_MARK = "fx_lntune"


def inject_adapters(
    gm: torch.fx.GraphModule,
    *,
    adapter_name: str,
    targets: Sequence[str],
    modules_to_save: Sequence[str] = (),
) -> PassResult:
    """Give ``adapter_name`` a copy of every module in ``targets`` and ``modules_to_save`` (in place).

    The low-level half of `fx_lntune.add_adapter`: this pass only changes modules. It does not register the
    adapter in the graph's state (``gm.meta["fx_lntune"]``) nor choose what trains; ``add_adapter`` does both,
    and is what users call. Run alone, the new copies exist but no adapter function knows them.

    A module seen for the first time is wrapped in a dispatch module at the same path; the graph's nodes keep
    their targets and only gain a mark in ``node.meta["fx_lntune"]``. Before, for ``targets=["ln"]``::

        x -> call_module[ln](x)            ln = LayerNorm

    after::

        x -> call_module[ln](x)            ln = LNTuningDispatch(base_layer=LayerNorm,
                                                                ln_tuning_layers={adapter: LayerNorm copy})

    The node may be in the root graph or in a layer's graph (``call_module[input_layernorm]`` inside the
    GraphModule at ``model.layers.0``). Copies start from the base weights and are frozen; `set_adapter`
    decides what trains.
    """
    calls = leaf_calls(gm)  # the root's and each layer graph's, by full module path
    kinds = [(path, LNTuningDispatch) for path in targets] + [(path, ModulesToSaveDispatch) for path in modules_to_save]
    for path, kind in kinds:
        if path not in calls:
            raise LNTuneConfigError(f"module '{path}' is not a call_module node of this graph, so it cannot be tuned.")
        module = gm.get_submodule(path)
        if not isinstance(module, AdapterDispatch):
            _read_tied_state_by_another_name(gm, path)
            module = kind(module)
            set_submodule(gm, path, module)
        elif not isinstance(module, kind):
            raise LNTuneConfigError(
                f"module '{path}' is a {type(module).__name__} for another adapter and cannot also be a "
                f"{kind.__name__}; keep it in either target_modules or modules_to_save for every adapter."
            )
        module.add_copy(adapter_name)
        module.set_trainable(None, False)
        for node in calls[path]:
            node.meta[NODE_MARK] = kind.__name__
    return PassResult(gm, bool(kinds))


def _read_tied_state_by_another_name(gm: torch.fx.GraphModule, path: str) -> None:
    """Point each ``get_attr`` of a tensor of ``path``'s module, left outside its calls, at another name of the
    same tensor (in place): the module becomes a dispatch module, its own names move, and its base slot holds a
    merged adapter while merged. Such reads are tied weights: with ``tie_word_embeddings`` the captured embedding
    reads ``lm_head.weight``, which must stay the frozen base embedding, as in the model (and in PEFT, whose
    ``modules_to_save`` copy of a tied head is untied from the embedding). Before, for ``path="lm_head"``::

        get_attr[lm_head.weight] -> embedding(...)         call_module[lm_head](h)

    after::

        get_attr[model.embed_tokens.weight] -> embedding(...)   call_module[lm_head](h)
    """
    own = path + "."
    for prefix, graph_module in graph_modules(gm):
        scope = f"{prefix}." if prefix else ""
        for node in graph_module.graph.nodes:
            full = scope + str(node.target)
            if node.op != "get_attr" or not full.startswith(own):
                continue
            tensor = functools.reduce(getattr, full.split("."), gm)
            aliases = [
                name
                for name, value in [
                    *gm.named_parameters(remove_duplicate=False),
                    *gm.named_buffers(remove_duplicate=False),
                ]
                if value is tensor and name.startswith(scope) and not name.startswith(own)
            ]
            if not aliases:
                raise LNTuneConfigError(
                    f"the graph reads '{full}' outside the call of module '{path}', so '{path}' cannot be wrapped "
                    "for an adapter; leave it out of target_modules / modules_to_save."
                )
            node.target = aliases[0].removeprefix(scope)
