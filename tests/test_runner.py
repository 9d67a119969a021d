"""The pass runner regenerates the code of exactly the graphs a pass changed: the root always, a layer when its
graph changed (nodes, arguments, targets, names), never a layer a pass left alone."""

from __future__ import annotations

import copy
import operator

import pytest
import torch
from conftest import captured
from models import make_inputs
from torch.fx.passes.infra.pass_base import PassResult

from fx_lntune.passes._graphs import graph_modules
from fx_lntune.passes._runner import run_pass


def _negate_output(layer: torch.fx.GraphModule) -> None:
    output = next(node for node in layer.graph.nodes if node.op == "output")
    value = output.args[0]
    with layer.graph.inserting_before(output):
        negated = layer.graph.call_function(operator.neg, (value,))
    output.replace_input_with(value, negated)


def _rename_first(layer: torch.fx.GraphModule) -> None:
    node = next(node for node in layer.graph.nodes if node.op == "call_function")
    node.name = node.name + "_renamed"


@pytest.mark.parametrize("change", [_negate_output, _rename_first])
def test_only_the_changed_layer_graph_gets_new_code(change):
    _, gm = captured("llama")
    layers = dict(graph_modules(gm))
    first, second = layers["model.layers.0"], layers["model.layers.1"]
    codes = {path: module.code for path, module in layers.items()}
    reference = copy.deepcopy(second)

    def pass_fn(graph_module):
        change(second)
        return PassResult(graph_module, True)

    run_pass(pass_fn, gm)
    assert first.code is codes["model.layers.0"]  # not regenerated
    assert gm.code is not codes[""]  # the root always is
    assert second.code != codes["model.layers.1"]
    if change is _negate_output:  # and the new code is what runs
        seen = {}
        second.register_forward_pre_hook(lambda module, args: seen.setdefault("args", args))
        with torch.no_grad():
            gm(**make_inputs("llama"))
            assert torch.equal(second(*seen["args"]), -reference(*seen["args"]))
