"""One rank of FSDP2 training of a tuned tiny llama graph sharded per layer, on CPU (gloo), launched by torchrun.

Run by tests/test_layers.py as
``python -m torch.distributed.run --nproc_per_node 2 --standalone tests/fsdp_layers_worker.py OUT_DIR``. Each rank
shards the graph twice, per layer (``fully_shard(layer)`` for each of ``fl.layer_modules(gm)``, then the root) and
root only, records the most parameter bytes gathered (unsharded) at once during forward, and trains the per-layer
one on its rows of the global batches (`ddp_worker.train`). Rank 0 writes the trained state dict and a report to
``OUT_DIR``. ``--layers N --hidden H`` give a bigger llama, for the README's memory figures.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from ddp_worker import exit_before_interpreter_teardown, global_batch, train, tuned_llama
from models import make_config, make_inputs
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

import fx_lntune as fl


def sized_llama(layers: int, hidden: int) -> torch.fx.GraphModule:
    config = make_config("llama")
    config.num_hidden_layers, config.hidden_size, config.intermediate_size = layers, hidden, 4 * hidden
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    return fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=make_inputs("llama")).eval()


def shard(gm: torch.fx.GraphModule, per_layer: bool) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if per_layer:
        for layer in fl.layer_modules(gm):
            fully_shard(layer, mesh=mesh)
    fully_shard(gm, mesh=mesh)


def gathered_bytes(gm: torch.nn.Module) -> int:
    """The bytes of the parameters FSDP holds unsharded (all-gathered) right now, over every FSDP unit of ``gm``."""
    total = 0
    for module in gm.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            for param in group.fsdp_params if group is not None else ():
                if param.sharded_state == ShardedState.UNSHARDED:
                    total += param.sharded_param.numel() * param.sharded_param.element_size()
    return total


def peak_gathered_forward(gm: torch.fx.GraphModule) -> int:
    """The most parameter bytes gathered at once in one forward: sampled before and after every module call."""
    peak = [0]

    def sample(*_):
        peak[0] = max(peak[0], gathered_bytes(gm))

    handles = []
    for module in gm.modules():
        handles += [module.register_forward_pre_hook(sample), module.register_forward_hook(sample)]
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        batch = global_batch(0, 2 * world)
        with torch.no_grad():
            gm(**{key: value[rank * 2 : (rank + 1) * 2] for key, value in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    return peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=0, help="a llama of this many layers instead of the tiny one")
    parser.add_argument("--hidden", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        gm = sized_llama(args.layers, args.hidden) if args.layers else tuned_llama()
        report = {
            "params_bytes": sum(p.numel() * p.element_size() for p in gm.parameters()),
            "layer_bytes": [sum(p.numel() * p.element_size() for p in m.parameters()) for m in fl.layer_modules(gm)],
        }
        root_only = copy.deepcopy(gm)
        shard(root_only, per_layer=False)
        report["peak_root_only"] = peak_gathered_forward(root_only)
        shard(gm, per_layer=True)
        report["losses"] = train(gm, dist.get_rank(), dist.get_world_size()) if not args.layers else []
        report["peak_per_layer"] = peak_gathered_forward(gm)
        state = {name: value.full_tensor() for name, value in gm.state_dict().items()}
        if dist.get_rank() == 0:
            (args.out / "fsdp_layers.json").write_text(json.dumps(report))
            torch.save(state, args.out / "fsdp_layers.pt")
        dist.barrier()  # no rank tears down while the other still communicates
    finally:
        dist.destroy_process_group()
    exit_before_interpreter_teardown()  # gloo's threads outlive the group: see ddp_worker


if __name__ == "__main__":
    main()
