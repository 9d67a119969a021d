"""One rank of a data-parallel run of a tuned tiny llama graph on CPU (gloo), launched by torchrun.

Run by tests/test_distributed.py as
``python -m torch.distributed.run --nproc_per_node 2 --standalone tests/ddp_worker.py OUT_DIR``. Each rank
trains on its own rows of the same global batches, first under ``DistributedDataParallel``, then under FSDP2's
``fully_shard``; rank 0 writes each run's trained state dict and what DDP registered and all-reduced to
``OUT_DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from models import make_inputs, make_model
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import fx_lntune as fl

STEPS = 3
PER_RANK_BATCH = 2
SEQ = 8
LR = 1e-2


def tuned_llama() -> torch.fx.GraphModule:
    """The tuned graph every run starts from (the same weights in every process)."""
    gm = fl.lntune_transform(make_model("llama"), fl.LNTuningConfig(), example_inputs=make_inputs("llama"))
    # Dropout draws differ between one process and two; the comparison is about gradients, not dropout.
    return gm.eval()


def global_batch(step: int, size: int) -> dict[str, torch.Tensor]:
    """The ``step``-th global batch: unpadded, so that every rank's share of the loss has the same token count."""
    inputs = make_inputs("llama", batch=size, seq=SEQ, seed=100 + step)
    inputs["attention_mask"] = torch.ones_like(inputs["attention_mask"])
    return inputs


def train(model: torch.nn.Module, rank: int, world: int, per_rank: int = PER_RANK_BATCH) -> list[float]:
    """``STEPS`` AdamW steps on rows ``rank * per_rank ... (rank + 1) * per_rank`` of each global batch."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for step in range(STEPS):
        batch = global_batch(step, per_rank * world)
        mine = {key: value[rank * per_rank : (rank + 1) * per_rank] for key, value in batch.items()}
        logits = model(**mine)["logits"]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), mine["input_ids"][:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run_ddp(gm: torch.fx.GraphModule, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    ddp = DistributedDataParallel(gm, find_unused_parameters=False)
    reduced: list[dict] = []

    def recording_allreduce(state, bucket):
        reduced.append({"numel": bucket.buffer().numel(), "params": [p.numel() for p in bucket.parameters()]})
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, recording_allreduce)
    losses = train(ddp, rank, world)
    if rank == 0:
        registered = {id(p) for p in ddp._build_params_for_reducer()[0]}
        logging = ddp._get_ddp_logging_data()
        report = {
            "losses": losses,
            "registered": [name for name, p in gm.named_parameters() if id(p) in registered],
            "allreduced": reduced,
            "bucket_sizes": logging["bucket_sizes"],
            "find_unused_parameters": logging["find_unused_parameters"],
        }
        (out / "ddp.json").write_text(json.dumps(report))
        torch.save(gm.state_dict(), out / "ddp.pt")


def run_fsdp(gm: torch.fx.GraphModule, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    # The graph is flat: only the root and the norm leaves are ever called, so the root is the one unit whose
    # forward hooks can gather and free the parameters (a unit per layer would never see a forward call).
    fully_shard(gm, mesh=init_device_mesh("cpu", (world,)))
    losses = train(gm, rank, world)
    state = {name: value.full_tensor() for name, value in gm.state_dict().items()}
    if rank == 0:
        (out / "fsdp.json").write_text(json.dumps({"losses": losses}))
        torch.save(state, out / "fsdp.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        gm = tuned_llama()
        run_ddp(copy.deepcopy(gm), args.out)
        run_fsdp(gm, args.out)
        dist.barrier()  # no rank tears down while the other still communicates
    finally:
        dist.destroy_process_group()
    exit_before_interpreter_teardown()


def exit_before_interpreter_teardown() -> None:
    """End a rank that finished cleanly without Python's interpreter finalization.

    ``destroy_process_group`` does not stop gloo's C++ threads (two ``pt_gloo_runloop`` workers and the
    ``gloo_tcp_loop``): they live as long as the ``ProcessGroupGloo`` object, which DTensor's sharding caches
    keep referenced (through the FSDP2 mesh) until the interpreter is torn down. A worker thread that frees the
    tensors of its last collective needs the GIL; once finalization has begun CPython ends such a thread with
    ``pthread_exit``, whose unwinding through a ``noexcept`` C++ frame calls ``std::terminate``: "terminate
    called without an active exception", SIGABRT. The window is the moment between a collective's completion
    and its worker thread releasing it, so it opens only when the machine is busy. Every output is written and
    closed by now, so the rank flushes its streams and exits at once, with those threads idle.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
