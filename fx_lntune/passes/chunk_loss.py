"""Chunked loss on the head: in training with ``labels`` the full logits are never materialized."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune import graph_inputs

__all__ = ["chunk_loss", "chunked_model_loss", "unless_training"]

_ORIGINAL = "chunk_loss_original"
_LOSSES = frozenset({"ForCausalLM", "ForMaskedLM"})
# At most this many elements in one fp32 logits chunk (64 MiB), and at least _CHUNKS chunks: the chunk's rows
# follow from the vocabulary size and the number of tokens.
_CHUNK_ELEMENTS = 1 << 24
_CHUNKS = 8


@torch.fx.wrap
def unless_training(target, owner: torch.nn.Module, labels, *args):
    """``target(*args)``, or ``None`` in training mode with labels (the chunked loss then needs no logits)."""
    if owner.training and labels is not None:
        return None
    return target(*args)


def _chunk_loss_sum(hidden, target, weight, bias, extra):
    logits = F.linear(hidden, weight, bias)
    if extra is not None:
        logits = logits + extra
    return F.cross_entropy(logits.float(), target, ignore_index=-100, reduction="sum")


@torch.fx.wrap
def chunked_model_loss(logits, labels, loss_type, owner, hidden, weight, bias, extra, **constants):
    """The model's loss; with ``logits`` withheld (training with labels), computed chunk by chunk from the head's
    input: each chunk's logits live only inside a checkpointed call (recomputed in backward), in fp32 as
    transformers computes them, so the peak holds one chunk, not the whole ``batch x seq x vocab`` tensor."""
    if logits is not None or labels is None:
        return graph_inputs.model_loss(logits, labels, loss_type, **constants)
    if loss_type == "ForCausalLM":
        labels = F.pad(labels[..., 1:], (0, 1), value=-100)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    rows = max(1, min(-(-hidden.shape[0] // _CHUNKS), _CHUNK_ELEMENTS // weight.shape[0]))
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], rows):
        target = labels[start : start + rows]
        if bool((target == -100).all()):
            continue
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_loss_sum, hidden[start : start + rows], target, weight, bias, extra, use_reentrant=False
        )
    return total / (labels != -100).sum()


def _head(logits: torch.fx.Node):
    """(linear node, extra bias node or None) when ``logits`` is ``linear(hidden, weight[, bias])`` [+ bias]."""
    extra = None
    if logits.target is torch.ops.aten.add.Tensor and isinstance(logits.args[0], torch.fx.Node):
        logits, extra = logits.args[0], logits.args[1]
    if logits.target is not torch.ops.aten.linear.default or logits.args[1].op != "get_attr":
        return None
    return logits, extra


def chunk_loss(gm: torch.fx.GraphModule, *, enabled: bool) -> PassResult:
    """Compute the causal / masked LM loss chunk by chunk from the frozen head's input (in place; ``enabled=False``
    gives the plain code back). Before::

        linear_14 = aten.linear(slice_21, lm_head_weight)
        model_loss = model_loss(linear_14, labels, 'ForCausalLM', vocab_size=100)

    after::

        lm_head = get_attr[lm_head]
        linear_14 = unless_training(aten.linear, lm_head, labels, slice_21, lm_head_weight)
        model_loss = chunked_model_loss(linear_14, labels, 'ForCausalLM', lm_head, slice_21, lm_head_weight,
                                        None, None, vocab_size=100)
    """
    graph = gm.graph
    modified = False
    for node in list(graph.nodes):
        if enabled and node.target is graph_inputs.model_loss and node.args[2] in _LOSSES:
            head = _head(node.args[0])
            if head is None:
                continue
            linear, extra = head
            labels = node.args[1]
            weight = linear.args[1]
            with graph.inserting_before(linear):
                owner = graph.get_attr(weight.target.rpartition(".")[0] or weight.target)
            rewritten = [linear] + ([node.args[0]] if extra is not None else [])
            for part in rewritten:
                part.meta[_ORIGINAL] = (part.target, part.args)
                part.target, part.args = unless_training, (part.target, owner, labels, *part.args)
            bias = linear.meta[_ORIGINAL][1][2] if len(linear.meta[_ORIGINAL][1]) > 2 else None
            node.meta[_ORIGINAL] = (node.target, node.args)
            hidden = linear.meta[_ORIGINAL][1][0]
            node.target, node.args = chunked_model_loss, (*node.args, owner, hidden, weight, bias, extra)
            modified = True
        elif not enabled and _ORIGINAL in node.meta:
            owner = node.args[3] if node.target is chunked_model_loss else node.args[1]
            node.target, node.args = node.meta.pop(_ORIGINAL)
            if not owner.users:
                graph.erase_node(owner)
            modified = True
    return PassResult(gm, modified)
