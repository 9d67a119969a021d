"""Shared pytest plumbing: one capture per architecture and front-end, reused (as copies) by every test."""

from __future__ import annotations

import atexit
import copy
import functools
import os
import shutil
import tempfile

import pytest
import torch
from models import make_inputs, make_model

import fx_lntune as fl

torch.set_num_threads(min(2, os.cpu_count() or 1))

# The on-disk capture cache of this test session, set before any capture: no test sees entries another run left,
# nothing is written to ~/.cache, and captures repeated across tests (and their subprocesses) are loaded from it.
CACHE_DIR = tempfile.mkdtemp(prefix="fx-lntune-test-cache-")
os.environ["FX_LNTUNE_CACHE_DIR"] = CACHE_DIR
atexit.register(shutil.rmtree, CACHE_DIR, ignore_errors=True)


@functools.cache
def _captured(arch: str, tracer: str):
    model = make_model(arch)
    gm = fl.lntune_transform(model, fl.LNTuningConfig(), tracer=tracer, example_inputs=make_inputs(arch))
    return model, gm


def captured(arch: str, tracer: str = "export"):
    """(model, tuned graph) for ``arch``: fresh copies of one cached capture, so tests may change them."""
    model, gm = _captured(arch, tracer)
    return copy.deepcopy(model), copy.deepcopy(gm)


@pytest.fixture
def capture_of():
    return captured
