"""Data-parallel training of a tuned graph: DDP and FSDP2 over gloo with 2 processes, against one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import captured
from ddp_worker import PER_RANK_BATCH, train

import fx_lntune as fl

WORLD = 2
WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run the worker on 2 ranks once; its reports and trained state dicts are in the returned directory."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--standalone"]
    done = subprocess.run([*command, str(WORKER), str(out)], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def one_process() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[float]]:
    """(initial state, state after training, losses) of one process on the whole global batch."""
    gm = _tuned_llama()
    initial = {name: value.clone() for name, value in gm.state_dict().items()}
    losses = train(gm, rank=0, world=1, per_rank=WORLD * PER_RANK_BATCH)
    return initial, gm.state_dict(), losses


def _tuned_llama() -> torch.fx.GraphModule:
    """What the worker's `tuned_llama` builds, from the suite's cached capture."""
    return captured("llama")[1].eval()


def _adapter_names(gm: torch.fx.GraphModule) -> list[str]:
    return [name for name, param in gm.named_parameters() if param.requires_grad]


def test_ddp_registers_and_allreduces_only_adapter_parameters(two_ranks):
    report = json.loads((two_ranks / "ddp.json").read_text())
    gm = _tuned_llama()
    adapters = dict(gm.named_parameters())
    names = _adapter_names(gm)
    assert names and all(".ln_tuning_layers.default." in name for name in names)
    assert sorted(report["registered"]) == sorted(names)
    adapter_numel = sum(adapters[name].numel() for name in names)
    assert adapter_numel < fl.get_nb_trainable_parameters(gm)[1] // 100
    assert report["allreduced"], "no gradient bucket was all-reduced"
    for bucket in report["allreduced"]:  # one backward per step, each all-reducing the adapter gradients only
        assert bucket["numel"] == adapter_numel
        assert sorted(bucket["params"]) == sorted(adapters[name].numel() for name in names)
    assert len(report["allreduced"]) == len(report["losses"])
    assert sum(int(size) for size in report["bucket_sizes"].split(",")) == 4 * adapter_numel  # float32 bytes
    assert report["find_unused_parameters"] == 0


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_two_ranks_give_the_weights_of_one_process_with_twice_the_batch(two_ranks, one_process, run):
    initial, reference, losses = one_process
    trained = torch.load(two_ranks / f"{run}.pt")
    assert trained.keys() == reference.keys()
    changed = 0
    for name, value in trained.items():
        if ".ln_tuning_layers." in name:
            torch.testing.assert_close(value, reference[name], atol=1e-6, rtol=1e-5, msg=name)
            changed += not torch.equal(value, initial[name])
        else:
            assert torch.equal(value, initial[name]), f"{name} is frozen but changed"
    assert changed == len(_adapter_names(_tuned_llama()))
    assert len(json.loads((two_ranks / f"{run}.json").read_text())["losses"]) == len(losses)
