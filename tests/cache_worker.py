"""One process capturing a tiny model with the on-disk capture cache, launched by tests/test_cache.py.

Run as ``python tests/cache_worker.py ARCH`` with ``FX_LNTUNE_CACHE_DIR`` set. Prints one JSON line: what the
cache did in this process (hits, misses, writes), the tuned graph's code, and its logits on inputs of another
batch size and length than the capture's (so a warm graph must keep its symbolic shapes).
"""

from __future__ import annotations

import json
import sys

import torch
from models import make_inputs, make_model

import fx_lntune as fl
from fx_lntune.capture import cache

torch.set_num_threads(1)

if __name__ == "__main__":
    arch = sys.argv[1]
    model = make_model(arch)
    gm = fl.lntune_transform(model, fl.LNTuningConfig(), example_inputs=make_inputs(arch))
    with torch.no_grad():
        logits = gm.eval()(**make_inputs(arch, batch=3, seq=5, seed=1))["logits"]
    print(json.dumps({"stats": dict(cache.STATS), "code": gm.code, "logits": logits.tolist()}))
