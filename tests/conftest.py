"""Shared pytest plumbing: one capture per architecture and front-end, reused (as copies) by every test."""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
from models import make_inputs, make_model

import fx_lntune as fl

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
