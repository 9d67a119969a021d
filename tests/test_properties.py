"""Property-based tests: random sequences of adapter operations, checked after every step against a reference.

The reference is a plain model of the state (which adapters exist, their weights, which one is active and which
is merged) and a copy of the Hugging Face model into which the effective adapter's weights are loaded to compute
the expected outputs. Each operation is one ``@rule`` of `AdapterMachine`: to add an operation (e.g. save/load),
add a rule that does it to ``self.gm`` and makes the same change to the reference (``self.adapters``,
``self.active``, ``self.merged``); the invariants do the rest. `unload` (a graph copy and two recompiles, the
slowest check) is a rule and ends every sequence rather than running after every step.

``FX_LNTUNE_HYPOTHESIS_EXAMPLES=200`` runs more examples (and longer sequences) than the default.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import os
import tempfile
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from conftest import _captured as conftest_captured
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from models import make_inputs, make_model

import fx_lntune as fl
from fx_lntune.config import resolve_modules_to_save, resolve_targets
from fx_lntune.dispatch import AdapterDispatch
from fx_lntune.passes._graphs import graph_modules
from fx_lntune.state import dispatch_modules, get_state

_EXAMPLES = os.environ.get("FX_LNTUNE_HYPOTHESIS_EXAMPLES")
settings.register_profile(
    "fx-lntune-properties",
    max_examples=int(_EXAMPLES) if _EXAMPLES else 5,
    stateful_step_count=40 if _EXAMPLES else 12,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
PROFILE = settings.get_profile("fx-lntune-properties")

# Names an adapter may get: a pool small enough that names are reused after a delete.
NAMES = ["default", "a", "b", "other_1"]
# Names every adapter function must refuse with LNTuneAdapterError, touching nothing.
BAD_NAMES = ["", "a.b", "../x", "/abs", "a\\b", "C:x", "nul\x00", "training", "keys", 3, None]
INPUTS = {"batch": 3, "seq": 5, "seed": 1}


@dataclass(frozen=True)
class Subject:
    """One captured model: the first adapter's config and the configs later adapters are added with."""

    arch: str
    config: fl.LNTuningConfig
    other_configs: tuple[fl.LNTuningConfig, ...]
    bad_configs: tuple[fl.LNTuningConfig, ...]


SUBJECTS = {
    "llama": Subject(
        "llama",
        fl.LNTuningConfig(),
        (
            fl.LNTuningConfig(target_modules=["input_layernorm"]),
            fl.LNTuningConfig(target_modules=r".*\.1\..*layernorm|model\.norm"),
            fl.LNTuningConfig(inference_mode=True),
        ),
        # mlp is not a graph leaf; lm_head is not either.
        (fl.LNTuningConfig(target_modules=["mlp"]), fl.LNTuningConfig(modules_to_save=["lm_head"])),
    ),
    "bert": Subject(
        "bert",
        fl.LNTuningConfig(modules_to_save=["classifier"]),
        (
            fl.LNTuningConfig(target_modules=["LayerNorm"], exclude_modules=["embeddings.LayerNorm"]),
            fl.LNTuningConfig(target_modules=["output.LayerNorm"], modules_to_save=["classifier"]),
        ),
        (fl.LNTuningConfig(target_modules=["pooler.dense"]), fl.LNTuningConfig(target_modules=["nope"])),
    ),
}


@functools.cache
def _captured(arch: str):
    if SUBJECTS[arch].config == fl.LNTuningConfig():
        return conftest_captured(arch, "export")  # shared with the other test files
    model = make_model(arch)
    gm = fl.lntune_transform(model, SUBJECTS[arch].config, example_inputs=make_inputs(arch))
    return model, gm


@dataclass
class RefAdapter:
    """What the reference knows of one adapter: its config and the state dict of each of its copies."""

    config: fl.LNTuningConfig
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    slots: dict[str, str] = field(default_factory=dict)  # path -> the ModuleDict holding its copies


def _logits(module, inputs) -> torch.Tensor:
    with torch.no_grad():
        return module(**inputs)["logits"]


def _snapshot(gm) -> dict:
    state = get_state(gm)
    return {
        "code": {path: module.code for path, module in graph_modules(gm)},
        "nodes": {
            path: [(n.op, n.target, str(n.args), str(n.kwargs)) for n in module.graph.nodes]
            for path, module in graph_modules(gm)
        },
        "state": (list(state.configs), state.active_adapter, state.merged_adapter, state.disabled),
        "modules": [(name, type(m).__name__) for name, m in gm.named_modules()],
        "trainable": sorted(name for name, p in gm.named_parameters() if p.requires_grad),
        "tensors": {key: value.clone() for key, value in gm.state_dict().items()},
    }


def _assert_same_snapshot(before: dict, after: dict) -> None:
    for key in ("code", "nodes", "state", "modules", "trainable"):
        assert after[key] == before[key], key
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in after["tensors"].items():
        assert torch.equal(value, before["tensors"][key]), key


class AdapterMachine(RuleBasedStateMachine):
    """Random adapter operations on a tuned graph, mirrored on a reference model of the state."""

    subject: Subject

    def __init__(self) -> None:
        super().__init__()
        model, gm = _captured(self.subject.arch)
        self.gm = copy.deepcopy(gm)
        self.reference = copy.deepcopy(model)
        self.inputs = make_inputs(self.subject.arch, **INPUTS)
        self.paths = _tunable_paths(model, self.subject)
        self.base = {path: _state_of(model.get_submodule(path)) for path in self.paths}
        self.frozen = {name: p.detach().clone() for name, p in self.gm.named_parameters() if not _in_dispatch(name)}
        self.nodes = _graph_nodes(self.gm)
        self.adapters: dict[str, RefAdapter] = {}
        self._add_reference("default", self.subject.config)
        self.active, self.merged = "default", None
        # Outputs seen so far by effective weights: the same weights must give the same bits, whatever the route.
        self.seen: dict[tuple, torch.Tensor] = {self._weights_key(None): _logits(self.gm, self.inputs)}
        self.seed = itertools.count()

    # ---- the reference ----------------------------------------------------------------------------------------

    def _add_reference(self, name: str, config: fl.LNTuningConfig) -> None:
        adapter = RefAdapter(config)
        for path in resolve_targets(self.reference, config):
            adapter.weights[path], adapter.slots[path] = _clone(self.base[path]), "ln_tuning_layers"
        for path in resolve_modules_to_save(self.reference, config):
            adapter.weights[path], adapter.slots[path] = _clone(self.base[path]), "modules_to_save"
        self.adapters[name] = adapter

    def _effective(self) -> str | None:
        """The adapter whose weights forward uses: the merged one, else the active one."""
        return self.merged if self.merged is not None else self.active

    def _weights_key(self, name: str | None) -> tuple:
        weights = self.adapters[name].weights if name is not None else {}
        return tuple(
            (path, key, tuple(value.flatten().tolist()))
            for path in self.paths
            for key, value in weights.get(path, self.base[path]).items()
        )

    def _expected_logits(self, name: str | None) -> torch.Tensor:
        weights = self.adapters[name].weights if name is not None else {}
        for path in self.paths:
            self.reference.get_submodule(path).load_state_dict(weights.get(path, self.base[path]))
        with torch.no_grad():
            return self.reference(**self.inputs, **_no_cache(self.reference))["logits"]

    def _check_logits(self, logits: torch.Tensor, name: str | None) -> None:
        torch.testing.assert_close(logits, self._expected_logits(name), atol=1e-5, rtol=1e-4)
        seen = self.seen.setdefault(self._weights_key(name), logits)
        assert torch.equal(logits, seen), "the same weights gave different bits"

    def _copy_of(self, name: str, path: str) -> torch.nn.Module:
        """The module holding adapter ``name``'s weights at ``path``: its copy, or the base slot when merged."""
        module = self.gm.get_submodule(path)
        return module.base if module.merged_adapter == name else module.copies[name]

    def _expected_trainable(self) -> list[str]:
        adapter = self.adapters[self.active]
        if self.merged is not None or adapter.config.inference_mode:
            return []
        return sorted(
            f"{path}.{adapter.slots[path]}.{self.active}.{key}"
            for path in adapter.weights
            for key, _ in self.gm.get_submodule(path).copies[self.active].named_parameters()
        )

    def _refused(self, error: type[Exception], operation, *args) -> None:
        before = _snapshot(self.gm)
        with pytest.raises(error), warnings.catch_warnings():
            warnings.simplefilter("error")  # a refused operation must not half-run (and warn) first
            operation(self.gm, *args)
        _assert_same_snapshot(before, _snapshot(self.gm))

    # ---- operations ---------------------------------------------------------------------------------------

    @precondition(lambda self: len(self.adapters) < len(NAMES))
    @rule(data=st.data())
    def add_adapter(self, data) -> None:
        name = data.draw(st.sampled_from([n for n in NAMES if n not in self.adapters]), label="name")
        index = data.draw(st.integers(-1, len(self.subject.other_configs) - 1), label="config")
        config = None if index < 0 else self.subject.other_configs[index]
        fl.add_adapter(self.gm, name, config)
        self._add_reference(name, config or self.adapters[self.active].config)

    @precondition(lambda self: len(self.adapters) < len(NAMES))
    @rule(data=st.data())
    def save_and_load(self, data) -> None:
        """Save any adapter (merged ones save their own weights) and load it back under a new name."""
        source = data.draw(st.sampled_from(sorted(self.adapters)), label="source")
        name = data.draw(st.sampled_from([n for n in NAMES if n not in self.adapters]), label="name")
        with tempfile.TemporaryDirectory() as directory:
            fl.save_adapter(self.gm, directory, source)
            assert sorted(os.listdir(directory)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
            fl.load_adapter(self.gm, directory, name)
        original = self.adapters[source]
        weights = {path: _clone(state) for path, state in original.weights.items()}
        self.adapters[name] = RefAdapter(get_state(self.gm).configs[name], weights, dict(original.slots))

    @rule(data=st.data())
    def set_adapter(self, data) -> None:
        name = data.draw(st.sampled_from(sorted(self.adapters)), label="name")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fl.set_adapter(self.gm, name)
        unmerges = self.merged is not None and self.merged != name
        assert unmerges == any("unmerging" in str(w.message) for w in caught)
        if unmerges:
            self.merged = None
        self.active = name

    @precondition(lambda self: len(self.adapters) > 1)
    @rule(data=st.data())
    def delete_adapter(self, data) -> None:
        name = data.draw(st.sampled_from(sorted(set(self.adapters) - {self.merged})), label="name")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fl.delete_adapter(self.gm, name)
        del self.adapters[name]
        assert (name == self.active) == any("was active" in str(w.message) for w in caught)
        if name == self.active:
            self.active = sorted(self.adapters)[0]

    @rule(data=st.data())
    def merge_adapter(self, data) -> None:
        name = data.draw(st.sampled_from([None, *sorted(self.adapters)]), label="name")
        target = self.active if name is None else name
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fl.merge_adapter(self.gm, name)
        assert (self.merged == target) == any("already merged" in str(w.message) for w in caught)
        self.merged = target

    @rule()
    def unmerge_adapter(self) -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fl.unmerge_adapter(self.gm)
        assert (self.merged is None) == any("nothing to unmerge" in str(w.message) for w in caught)
        self.merged = None

    @rule(data=st.data())
    def perturb(self, data) -> None:
        """Change an unmerged adapter's weights in place, as training would."""
        candidates = sorted(set(self.adapters) - {self.merged})
        if not candidates:
            return
        name = data.draw(st.sampled_from(candidates), label="name")
        generator = torch.Generator().manual_seed(next(self.seed))
        adapter = self.adapters[name]
        with torch.no_grad():
            for path in sorted(adapter.weights):
                for key, param in self._copy_of(name, path).named_parameters():
                    noise = 0.1 * torch.randn(param.shape, generator=generator).to(param.dtype)
                    param.add_(noise)
                    adapter.weights[path][key] = adapter.weights[path][key] + noise

    @rule()
    def train_step(self) -> None:
        """One SGD step: exactly the expected trainable parameters change, and nothing else."""
        trainable = [p for p in self.gm.parameters() if p.requires_grad]
        before = {name: p.detach().clone() for name, p in self.gm.named_parameters()}
        loss = self.gm(**self.inputs)["logits"].float().pow(2).mean()
        if trainable:
            loss.backward()
            torch.optim.SGD(trainable, lr=0.5).step()
            self.gm.zero_grad(set_to_none=True)
        changed = sorted(name for name, p in self.gm.named_parameters() if not torch.equal(p, before[name]))
        assert changed == self._expected_trainable()
        for path, weights in self.adapters[self.active].weights.items():
            if trainable:
                weights.update(_clone(_state_of(self._copy_of(self.active, path))))

    @rule(raises=st.booleans())
    def disabled(self, raises: bool) -> None:
        before = _snapshot(self.gm)
        with pytest.raises(RuntimeError) if raises else torch.no_grad():
            with fl.disable_adapters(self.gm):
                self._check_logits(_logits(self.gm, self.inputs), None)
                assert not [name for name, p in self.gm.named_parameters() if p.requires_grad]
                if raises:
                    raise RuntimeError("user code failed")
        _assert_same_snapshot(before, _snapshot(self.gm))

    @rule(data=st.data(), operation=st.sampled_from(["add", "set", "delete", "merge", "unmerge", "perturb"]))
    def operate_while_disabled(self, data, operation: str) -> None:
        """An operation inside `disable_adapters`: the block still computes the base and trains nothing, and on
        exit the graph is in the state the operation made."""
        if (operation == "add" and len(self.adapters) == len(NAMES)) or (
            operation == "delete" and len(self.adapters) == 1
        ):
            return
        actions = {
            "add": self.add_adapter,
            "set": self.set_adapter,
            "delete": self.delete_adapter,
            "merge": self.merge_adapter,
            "unmerge": lambda _: self.unmerge_adapter(),
            "perturb": self.perturb,
        }
        with fl.disable_adapters(self.gm):
            actions[operation](data)
            self._check_logits(_logits(self.gm, self.inputs), None)
            assert not [name for name, p in self.gm.named_parameters() if p.requires_grad]

    @rule(data=st.data())
    def merge_and_unload(self, data) -> None:
        name = data.draw(st.sampled_from([None, *sorted(self.adapters)]), label="name")
        before = _snapshot(self.gm)
        plain = fl.merge_and_unload(self.gm, name)
        _assert_same_snapshot(before, _snapshot(self.gm))
        _check_plain(plain, self.nodes)
        self._check_logits(_logits(plain, self.inputs), self.active if name is None else name)

    @rule()
    def unload(self) -> None:
        """`unload` gives the base model's outputs bit for bit, whatever the state, and changes nothing."""
        before = _snapshot(self.gm)
        plain = fl.unload(self.gm)
        _assert_same_snapshot(before, _snapshot(self.gm))
        _check_plain(plain, self.nodes)
        assert torch.equal(_logits(plain, self.inputs), self.seen[self._weights_key(None)])

    # ---- bad input: our error, and nothing changes -------------------------------------------------------

    @rule(operation=st.sampled_from(["set", "delete", "merge", "merge_and_unload"]))
    def refuse_unknown_adapter(self, operation: str) -> None:
        functions = {
            "set": fl.set_adapter,
            "delete": fl.delete_adapter,
            "merge": fl.merge_adapter,
            "merge_and_unload": fl.merge_and_unload,
        }
        self._refused(fl.LNTuneAdapterError, functions[operation], "nope")

    @rule(name=st.sampled_from(BAD_NAMES))
    def refuse_bad_name(self, name) -> None:
        self._refused(fl.LNTuneAdapterError, fl.add_adapter, name)

    @rule(data=st.data())
    def refuse_existing_name(self, data) -> None:
        self._refused(fl.LNTuneAdapterError, fl.add_adapter, data.draw(st.sampled_from(sorted(self.adapters))))

    @rule(data=st.data())
    def refuse_bad_config(self, data) -> None:
        config = data.draw(st.sampled_from(self.subject.bad_configs))
        name = next(n for n in NAMES if n not in self.adapters) if len(self.adapters) < len(NAMES) else "fresh"
        self._refused(fl.LNTuneConfigError, fl.add_adapter, name, config)

    @precondition(lambda self: self.merged is not None and len(self.adapters) > 1)
    @rule()
    def refuse_deleting_merged(self) -> None:
        self._refused(fl.LNTuneAdapterError, fl.delete_adapter, self.merged)

    # ---- invariants, after every step ---------------------------------------------------------------------

    @invariant()
    def state_matches(self) -> None:
        state = get_state(self.gm)
        assert fl.list_adapters(self.gm) == list(self.adapters)
        assert (fl.active_adapter(self.gm), state.merged_adapter, state.disabled) == (self.active, self.merged, False)
        assert _graph_nodes(self.gm) == self.nodes

    @invariant()
    def weights_match(self) -> None:
        modules = dispatch_modules(self.gm)
        copies = {name: sorted(a.weights) for name, a in self.adapters.items()}
        assert {name: sorted(p for p, m in modules.items() if name in m.copies) for name in copies} == copies
        wrapped = {path for weights in copies.values() for path in weights}
        assert set(modules) == wrapped  # a module no adapter has a copy of is plain again
        targeted = [p for p in self.paths if any(a.slots.get(p) == "ln_tuning_layers" for a in self.adapters.values())]
        assert fl.targeted_module_names(self.gm) == targeted
        for path in self.paths:
            module = self.gm.get_submodule(path)
            original = module.original() if isinstance(module, AdapterDispatch) else module
            _assert_state_equal(_state_of(original), self.base[path])  # the base, bit for bit
            if isinstance(module, AdapterDispatch) and self.merged is None:
                assert module.base is original
        for name, adapter in self.adapters.items():
            for path, weights in adapter.weights.items():
                _assert_state_equal(_state_of(self._copy_of(name, path)), weights)
        for name, param in self.gm.named_parameters():
            if name in self.frozen:
                assert torch.equal(param, self.frozen[name]) and not param.requires_grad, name

    @invariant()
    def trainable_is_the_active_adapter(self) -> None:
        trainable = sorted(name for name, p in self.gm.named_parameters() if p.requires_grad)
        assert trainable == self._expected_trainable()

    @invariant()
    def outputs_match(self) -> None:
        self._check_logits(_logits(self.gm, self.inputs), self._effective())

    def teardown(self) -> None:
        self.unload()  # every sequence ends with the base model back


def _tunable_paths(model, subject: Subject) -> list[str]:
    """Every path some adapter of ``subject`` may tune, in module order."""
    paths = set()
    for config in (subject.config, *subject.other_configs):
        paths.update(resolve_targets(model, config), resolve_modules_to_save(model, config))
    return [name for name, _ in model.named_modules() if name in paths]


def _state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(module.state_dict())


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in state.items()}


def _assert_state_equal(ours: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in ours.items())


def _in_dispatch(name: str) -> bool:
    return any(
        part in name.split(".") for part in ("base_layer", "ln_tuning_layers", "original_module", "modules_to_save")
    )


def _no_cache(model) -> dict:
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def _graph_nodes(gm) -> dict[str, list[tuple]]:
    """Per graph (the root and each layer's, which must be valid), its nodes' ops and targets."""
    for _, module in graph_modules(gm):
        module.graph.lint()
    return {path: [(n.op, n.target) for n in module.graph.nodes] for path, module in graph_modules(gm)}


def _check_plain(plain, nodes) -> None:
    assert all(type(module).__mro__[1] is torch.fx.GraphModule for _, module in graph_modules(plain))
    assert not [m for m in plain.modules() if isinstance(m, AdapterDispatch)]
    assert "fx_lntune" not in plain.meta
    assert _graph_nodes(plain) == nodes


class LlamaMachine(AdapterMachine):
    subject = SUBJECTS["llama"]


class BertMachine(AdapterMachine):
    subject = SUBJECTS["bert"]


TestLlamaAdapters = LlamaMachine.TestCase
TestLlamaAdapters.settings = PROFILE
TestBertAdapters = BertMachine.TestCase
TestBertAdapters.settings = PROFILE


# Regression tests for what the state machine found, as plain examples.


def test_merge_and_unload_leaves_the_trainable_parameters_alone():
    _, gm = conftest_captured("llama", "export")
    gm = copy.deepcopy(gm)
    trainable = sorted(name for name, p in gm.named_parameters() if p.requires_grad)
    assert trainable
    plain = fl.merge_and_unload(gm)
    assert sorted(name for name, p in gm.named_parameters() if p.requires_grad) == trainable
    shared = {p.data_ptr() for p in gm.parameters()}
    assert all(p.data_ptr() in shared for p in plain.parameters())  # still no weight is copied


def test_merged_adapter_with_fewer_targets_is_computed_alone_and_nothing_trains():
    """Merging a non-active adapter that lacks copies where the active one has them: forward computes the merged
    adapter alone (the base where it has no copy), as `merge_and_unload` does, not a mix with the active one."""
    _, gm = conftest_captured("llama", "export")
    gm = copy.deepcopy(gm)
    fl.add_adapter(gm, "few", fl.LNTuningConfig(target_modules=["input_layernorm"]))
    with torch.no_grad():
        for module in dispatch_modules(gm).values():
            for param in module.copies.parameters():
                param.add_(0.5)
    inputs = make_inputs("llama", **INPUTS)
    expected = _logits(fl.merge_and_unload(gm, "few"), inputs)
    fl.merge_adapter(gm, "few")
    assert fl.active_adapter(gm) == "default"
    assert torch.equal(_logits(gm, inputs), expected)
    assert not [name for name, p in gm.named_parameters() if p.requires_grad]
