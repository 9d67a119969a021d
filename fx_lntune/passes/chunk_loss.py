"""Chunked loss on the head: in training with ``labels`` the full logits are never materialized.

A loop of our own rather than torch's ``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``, on every
device and dtype: on SmolLM2's head (1024 x 576 tokens, frozen 49152 x 576 weight, CPU) the loop takes 0.88 (fp32)
and 0.82 (bf16) of the plain loss's time at 74 MiB peak against 575 MiB; torch's op peaks at 4.5 MiB but takes six
times the plain time. (Not measured on a GPU; README "Memory".)
"""

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


class _FrozenHeadLoss(torch.autograd.Function):
    """The summed cross-entropy of a frozen head's logits, chunk by chunk, with the gradient of its input computed in
    the same pass (the weight needs none): two matrix products per chunk, as the plain loss, and no recomputation."""

    @staticmethod
    def forward(ctx, hidden, labels, weight, bias, extra, rows):
        total = hidden.new_zeros((), dtype=torch.float32)
        grad = torch.zeros_like(hidden)
        for start in range(0, hidden.shape[0], rows):
            target = labels[start : start + rows]
            if bool((target == -100).all()):
                continue
            logits = F.linear(hidden[start : start + rows], weight, bias)
            if extra is not None:
                logits = logits + extra
            # cross_entropy's own two steps, its log-softmax kept: exponentiated in place, it is the softmax that
            # the gradient needs, so a chunk holds two logits-sized tensors at most, not three.
            log_probabilities = logits.float().log_softmax(-1)
            del logits
            total += F.nll_loss(log_probabilities, target, ignore_index=-100, reduction="sum")
            # d(sum of losses) / d(logits): softmax minus the one-hot target, zero on ignored rows.
            probabilities = log_probabilities.exp_()
            kept = target != -100
            probabilities[kept, target[kept]] -= 1
            probabilities[~kept] = 0
            grad[start : start + rows] = (probabilities.to(weight.dtype) @ weight).to(hidden.dtype)
            del probabilities, log_probabilities  # before the next chunk's logits
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None


@torch.fx.wrap
def chunked_model_loss(logits, labels, loss_type, owner, hidden, weight, bias, extra, **constants):
    """The model's loss; with ``logits`` withheld (training with labels), computed chunk by chunk from the head's
    input, in fp32 as transformers computes it, so the peak holds one chunk, not the whole ``batch x seq x vocab``
    tensor. A frozen head (the LN-tuning case) computes each chunk's input gradient in the forward pass
    (`_FrozenHeadLoss`: the same two products per chunk as the plain loss); a trained head runs each chunk in a
    checkpointed call, recomputed in backward, so that its weight gets its gradient."""
    if logits is not None or labels is None:
        return graph_inputs.model_loss(logits, labels, loss_type, **constants)
    if loss_type == "ForCausalLM":
        labels = F.pad(labels[..., 1:], (0, 1), value=-100)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    rows = max(1, min(-(-hidden.shape[0] // _CHUNKS), _CHUNK_ELEMENTS // weight.shape[0]))
    if not any(t is not None and t.requires_grad for t in (weight, bias, extra)):
        return _FrozenHeadLoss.apply(hidden, labels, weight, bias, extra, rows) / (labels != -100).sum()
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
