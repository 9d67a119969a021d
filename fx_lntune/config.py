"""LN tuning configuration: the config dataclass, PEFT's name-matching rules, and target resolution."""

from __future__ import annotations

import difflib
import enum
import json
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .errors import LNTuneConfigError

__all__ = [
    "LNTuningConfig",
    "DEFAULT_TARGET_MODULES",
    "as_config",
    "is_normalization_module",
    "matches",
    "is_target",
    "resolve_targets",
    "resolve_modules_to_save",
]

_PEFT_TYPE = "LN_TUNING"

# The per-architecture defaults PEFT uses for LN tuning
# (peft.utils.constants.TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING), reproduced so that peft
# stays an optional dependency.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": [
        "multi_modal_projector",
        "input_layernorm",
        "post_attention_layernorm",
        "norm",
        "embed_tokens",
        "lm_head",
    ],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ],
    "gemma3_text": [
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
        "norm",
    ],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}

# PEFT's TaskType values: PEFT refuses any other task_type when it reads our adapter_config.json.
_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# Keys PEFT's LNTuningConfig writes that describe the checkpoint rather than the tuning: read and ignored.
_PEFT_ONLY_KEYS = frozenset({"peft_version"})
_FIELDS = (
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "inference_mode",
    "task_type",
    "peft_type",
    "base_model_name_or_path",
    "revision",
    "auto_mapping",
)
# PEFT only parses peft_version for OFT configs; any string is accepted for LN tuning.
_PEFT_VERSION_TAG = "fx-lntune"
_MAX_LISTED_NAMES = 20
# Names that only illustrate (the matching norms of a model, a config's list): a few are enough.
_NAMES_IN_A_HINT = 6

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
)
_NORM_CLASS_NAME = re.compile(r"Norm(?:[123]d)?$")


@dataclass
class LNTuningConfig:
    """Which modules LN tuning gives a trainable copy, with PEFT's field names and matching rules.

    Args:
        target_modules: a regex that must match a module's full qualified name (``re.fullmatch``), or a list
            of names, each matching a module whose name equals it or ends with ``"." + entry``. ``None``
            means the architecture's default (:data:`DEFAULT_TARGET_MODULES`), or every normalization module
            for an architecture PEFT does not know.
        exclude_modules: the same two forms; a module matched here is never a target.
        modules_to_save: names of extra modules trained in full and saved (e.g. a fresh ``classifier``);
            a module is picked if its name ends with an entry (see :func:`resolve_modules_to_save`).
        inference_mode: when true nothing requires grad.
        task_type: one of PEFT's task types (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...) or ``None``.
        peft_type: PEFT's base field, always ``"LN_TUNING"`` (a ``peft.PeftType`` is accepted); another method's
            type is refused.
        base_model_name_or_path, revision, auto_mapping: PEFT's base fields describing the checkpoint (the Hub id
            or directory of the base model, its revision, and how ``AutoPeftModel`` finds the model class). They
            are kept and written to ``adapter_config.json``, and do not take part in ``==`` (two configs that tune
            the same way are equal, whichever checkpoint they name).

    A tuple is turned into a list and a set into a sorted list. Invalid values raise
    :class:`~fx_lntune.errors.LNTuneConfigError` on creation.
    """

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    inference_mode: bool = False
    task_type: str | None = None
    peft_type: str = _PEFT_TYPE
    base_model_name_or_path: str | None = field(default=None, compare=False)
    revision: str | None = field(default=None, compare=False)
    auto_mapping: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.target_modules = _check_patterns("target_modules", self.target_modules)
        self.exclude_modules = _check_patterns("exclude_modules", self.exclude_modules)
        self.modules_to_save = _check_modules_to_save(self.modules_to_save)
        if not isinstance(self.inference_mode, bool):
            raise LNTuneConfigError(
                f"inference_mode must be True or False, got {type(self.inference_mode).__name__} "
                f"{self.inference_mode!r}."
            )
        self.task_type = _check_task_type(self.task_type)
        if self.peft_type is not None and _plain(self.peft_type) != _PEFT_TYPE:
            raise LNTuneConfigError(
                f"This config is for PEFT method {_plain(self.peft_type)!r}, not {_PEFT_TYPE!r}: fx-lntune only "
                "loads LayerNorm tuning adapters. Load it with peft instead."
            )
        self.peft_type = _PEFT_TYPE
        for name in ("base_model_name_or_path", "revision"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise LNTuneConfigError(f"{name} must be a string or None, got {type(value).__name__} {value!r}.")
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, Mapping):
            raise LNTuneConfigError(
                "auto_mapping must be None or a dict such as {'base_model_class': 'LlamaForCausalLM', "
                "'parent_library': 'transformers.models.llama.modeling_llama'}, "
                f"got {type(self.auto_mapping).__name__}."
            )
        self.auto_mapping = dict(self.auto_mapping) if self.auto_mapping is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict of every field; the config is not changed."""
        return {
            "peft_type": _PEFT_TYPE,
            "target_modules": _copy_patterns(self.target_modules),
            "exclude_modules": _copy_patterns(self.exclude_modules),
            "modules_to_save": _copy_patterns(self.modules_to_save),
            "inference_mode": self.inference_mode,
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "revision": self.revision,
            "auto_mapping": dict(self.auto_mapping) if self.auto_mapping is not None else None,
        }

    def to_peft_dict(self, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """Return the dict PEFT's ``LNTuningConfig.to_dict()`` gives for this config: same keys, JSON values.

        Written to ``adapter_config.json`` (``json.dumps(..., indent=2, sort_keys=True)`` as PEFT does), it is
        read back by ``peft.PeftConfig.from_pretrained``. ``peft_version`` is ``"fx-lntune"``: PEFT does not
        check it for LN tuning. When ``target_modules`` is ``None`` PEFT resolves it again on load and refuses
        architectures it does not know, so a saver should first put the resolved names in
        (``dataclasses.replace(config, target_modules=resolve_targets(model, config))``). The config's own
        ``base_model_name_or_path``, ``revision`` and ``auto_mapping`` win over the argument and ``None``.
        The config is not changed.
        """
        if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
            raise LNTuneConfigError(
                "base_model_name_or_path must be a string (a Hub id or a directory) or None, got "
                f"{type(base_model_name_or_path).__name__}."
            )
        if self.base_model_name_or_path is not None:
            base_model_name_or_path = self.base_model_name_or_path
        return {
            "task_type": self.task_type,
            "peft_type": _PEFT_TYPE,
            "auto_mapping": dict(self.auto_mapping) if self.auto_mapping is not None else None,
            "peft_version": _PEFT_VERSION_TAG,
            "base_model_name_or_path": base_model_name_or_path,
            "revision": self.revision,
            "inference_mode": self.inference_mode,
            "target_modules": _copy_patterns(self.target_modules),
            "exclude_modules": _copy_patterns(self.exclude_modules),
            "modules_to_save": _copy_patterns(self.modules_to_save),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LNTuningConfig:
        """Build a config from :meth:`to_dict` output or from the dict in a PEFT ``adapter_config.json``.

        Keys this version does not know (a newer PEFT's, ``peft_version``) are ignored with a warning that names
        them, as PEFT does, so that an adapter saved by a later PEFT loads. A wrong value, or a ``peft_type``
        other than ``"LN_TUNING"``, raises :class:`~fx_lntune.errors.LNTuneConfigError`.
        """
        if not isinstance(data, Mapping):
            raise LNTuneConfigError(
                f"LNTuningConfig.from_dict expects a dict such as json.load(adapter_config.json), "
                f"got {type(data).__name__}."
            )
        peft_type = data.get("peft_type")
        if peft_type is not None and _plain(peft_type) != _PEFT_TYPE:
            raise LNTuneConfigError(
                f"This config is for PEFT method {_plain(peft_type)!r}, not {_PEFT_TYPE!r}: fx-lntune only "
                "loads LayerNorm tuning adapters. Load it with peft instead."
            )
        unknown = sorted(set(data) - set(_FIELDS) - _PEFT_ONLY_KEYS)
        if unknown:
            version = data.get("peft_version")
            written = f" (it says peft_version {version!r}: a newer PEFT may have added them)" if version else ""
            warnings.warn(
                f"Ignoring LN tuning config key(s) {unknown} that neither this fx-lntune nor PEFT's LNTuningConfig "
                f"knows{written}; the config is loaded without them.",
                UserWarning,
                stacklevel=2,
            )
        return cls(**{key: data[key] for key in _FIELDS if key in data})

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike) -> dict[str, Any]:
        """The JSON object in ``path_json_file`` (an ``adapter_config.json``), as PEFT's ``from_json_file`` returns
        it: a dict, to pass to :meth:`from_dict`. PEFT's ``runtime_config`` key is dropped with a warning.

        Raises:
            LNTuneConfigError: the file is missing, not JSON, or not a JSON object.
        """
        try:
            with open(path_json_file, encoding="utf-8") as file:
                data = json.load(file)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise LNTuneConfigError(
                f"cannot read {path_json_file} as JSON ({exc}); pass an adapter_config.json."
            ) from exc
        if not isinstance(data, dict):
            raise LNTuneConfigError(f"{path_json_file} holds a JSON {type(data).__name__}, not an object (a config).")
        if "runtime_config" in data:
            warnings.warn(
                f"{path_json_file} has a 'runtime_config' key; it is ignored (runtime settings are not saved).",
                UserWarning,
                stacklevel=2,
            )
            del data["runtime_config"]
        return data


def as_config(config: Any) -> LNTuningConfig:
    """Return ``config`` as an fx-lntune :class:`LNTuningConfig`.

    Ours is returned unchanged (not copied); a ``peft.LNTuningConfig`` gives a new config with the same
    fields. peft is not imported: it is recognised by class name and ``peft_type``.
    """
    if isinstance(config, LNTuningConfig):
        return config
    if type(config).__name__ == "LNTuningConfig" and _plain(getattr(config, "peft_type", None)) == _PEFT_TYPE:
        return LNTuningConfig(
            target_modules=getattr(config, "target_modules", None),
            exclude_modules=getattr(config, "exclude_modules", None),
            modules_to_save=getattr(config, "modules_to_save", None),
            inference_mode=getattr(config, "inference_mode", False),
            task_type=getattr(config, "task_type", None),
            base_model_name_or_path=getattr(config, "base_model_name_or_path", None),
            revision=getattr(config, "revision", None),
            auto_mapping=getattr(config, "auto_mapping", None),
        )
    hint = " Use LNTuningConfig.from_dict(...) for a dict." if isinstance(config, Mapping) else ""
    raise LNTuneConfigError(
        f"Expected an fx_lntune.LNTuningConfig or a peft.LNTuningConfig, got {type(config).__name__}.{hint}"
    )


def is_normalization_module(module: nn.Module) -> bool:
    """Return whether ``module`` is a normalization layer, the default LN tuning target.

    True for torch's ``LayerNorm``, ``RMSNorm`` and ``GroupNorm`` (and subclasses) and for any class whose
    name ends in ``Norm`` (``LlamaRMSNorm``, ``T5LayerNorm``, ``Gemma2RMSNorm``). Batch and instance norms
    count too (``BatchNorm1d``, ``InstanceNorm2d``, ``SyncBatchNorm``, ``LazyBatchNorm3d``, a timm-style
    ``LayerNorm2d``: a name ending in ``Norm1d/2d/3d``): they are normalization layers with an optional
    affine weight and bias, and a tuned copy of one keeps its own running statistics. A norm without
    parameters (``LocalResponseNorm``, a non-affine ``InstanceNorm``) counts too, but has nothing to train:
    :func:`resolve_targets` skips it.
    """
    return isinstance(module, _NORM_TYPES) or _NORM_CLASS_NAME.search(type(module).__name__) is not None


def matches(name: str, patterns: str | list[str] | None) -> bool:
    """Return whether the qualified module name ``name`` matches ``patterns``, with PEFT's rules.

    - a ``str`` is a regex that must match the whole name (``re.fullmatch``): ``r".*\\.0\\..*norm"``;
    - a list matches a name equal to an entry or ending with ``"." + entry``: ``"norm"`` matches
      ``"model.norm"`` but not ``"model.layernorm"``, and ``"0.mlp"`` matches ``"model.layers.0.mlp"``;
    - ``None`` (and an empty list) matches nothing.

    Used for both ``target_modules`` and ``exclude_modules``; :func:`is_target` combines them, exclusion
    first.
    """
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in patterns)


def is_target(
    name: str,
    target_modules: str | list[str] | None,
    exclude_modules: str | list[str] | None = None,
    modules_to_save: list[str] | None = None,
) -> bool:
    """Return whether the module ``name`` is an LN tuning target, in PEFT's order of precedence.

    1. excluded by ``exclude_modules`` (see :func:`matches`): not a target;
    2. named by ``modules_to_save`` (PEFT's regex ``(^|.*\\.){entry}($|\\..*)``: the module or one of its
       ancestors is called ``entry``, and entry is used unescaped as PEFT does): not a target;
    3. otherwise a target iff :func:`matches` ``(name, target_modules)``; ``None`` matches nothing, so
       resolve architecture defaults first (:func:`resolve_targets` does).
    """
    return not _is_excluded(name, exclude_modules, modules_to_save) and matches(name, target_modules)


def resolve_targets(model: nn.Module, config: LNTuningConfig) -> list[str]:
    """Return the qualified names of the modules of ``model`` to tune, in ``named_modules()`` order.

    Matching is :func:`is_target`'s. When ``config.target_modules`` is ``None``, the list in
    :data:`DEFAULT_TARGET_MODULES` for ``model.config.model_type`` is used, or, for a model PEFT has no
    default for, every module :func:`is_normalization_module` accepts. Only the outermost match is kept:
    a matched module inside a matched module is tuned as part of its parent's copy (PEFT fails with an
    ``AttributeError`` there). A matched module without parameters (``act_fn``, ``rotary_emb``) is
    skipped: it has nothing to train (PEFT fails with ``StopIteration`` there). ``model`` is not modified;
    a ``peft.LNTuningConfig`` is accepted too.

    Raises:
        LNTuneConfigError: nothing matched (the message lists the normalization modules that exist),
            everything that matched was excluded or has no parameters, the root module matched, or a
            target overlaps a module picked by ``modules_to_save``.
    """
    config = as_config(config)
    select, described = _target_selector(model, config)
    targets: list[str] = []
    norm_names: list[str] = []
    excluded: list[str] = []
    no_parameters: list[str] = []
    for name, module in model.named_modules():
        if is_normalization_module(module):
            norm_names.append(name)
        if not select(name, module):
            continue
        if _is_excluded(name, config.exclude_modules, config.modules_to_save):
            excluded.append(name)
        elif not name:
            raise LNTuneConfigError(
                f"{described} matches the root module ({type(model).__name__} itself), which cannot be "
                "replaced. Use a pattern that only matches submodules, e.g. r'.+norm' instead of r'.*'."
            )
        # named_modules() is a pre-order walk: the descendants of the last target directly follow it.
        elif targets and name.startswith(targets[-1] + "."):
            continue
        elif next(module.parameters(), None) is None:
            no_parameters.append(name)
        else:
            targets.append(name)
    if not targets:
        raise LNTuneConfigError(_no_target_message(model, described, excluded, no_parameters, norm_names))
    if config.modules_to_save:
        _check_no_overlap(targets, _pick_modules_to_save(model, config.modules_to_save)[0])
    return targets


def resolve_modules_to_save(model: nn.Module, config: LNTuningConfig) -> list[str]:
    """Return the qualified names of the modules ``config.modules_to_save`` picks, in module order.

    PEFT's rule: a module is picked when its name ends with an entry (plain ``str.endswith``, so ``"head"``
    picks ``"lm_head"`` too); only the outermost of nested picks is kept. Modules registered under two
    names are listed under both, as PEFT wraps both. ``model`` is not modified.

    Raises:
        LNTuneConfigError: an entry picks no module (the message suggests close names); PEFT ignores it.
    """
    config = as_config(config)
    if not config.modules_to_save:
        return []
    picked, found = _pick_modules_to_save(model, config.modules_to_save)
    missing = [entry for entry in config.modules_to_save if entry not in found]
    if missing:
        names = [name for name, _ in model.named_modules() if name]
        candidates = sorted(set(names) | {name.rpartition(".")[2] for name in names})
        hints = {entry: difflib.get_close_matches(entry, candidates, n=5) for entry in missing}
        raise LNTuneConfigError(
            f"modules_to_save entries {missing} match no module of {type(model).__name__} (a module is "
            f"picked when its qualified name ends with the entry). Close names: {hints}. Fix or remove them."
        )
    return list(picked)


def _target_selector(model: nn.Module, config: LNTuningConfig) -> tuple[Callable[[str, nn.Module], bool], str]:
    """Return a ``(name, module) -> bool`` target test before exclusion, and a description for messages."""
    patterns = config.target_modules
    if patterns is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        patterns = DEFAULT_TARGET_MODULES.get(model_type) if isinstance(model_type, str) else None
        if patterns is None:
            return (lambda _name, module: is_normalization_module(module)), "the default (every norm module)"
        described = f"the default target_modules for model_type {model_type!r} ({patterns})"
    else:
        shown = _listed(patterns, _NAMES_IN_A_HINT) if isinstance(patterns, list) else repr(patterns)
        described = f"target_modules={shown}"
    return (lambda name, _module: matches(name, patterns)), described


def _is_excluded(name: str, exclude_modules: str | list[str] | None, modules_to_save: list[str] | None) -> bool:
    if matches(name, exclude_modules):
        return True
    return any(re.match(_modules_to_save_regex(entry), name) for entry in modules_to_save or ())


def _modules_to_save_regex(entry: str) -> str:
    # PEFT's pattern, entry unescaped: "a.b" also excludes "a_b".
    return rf"(^|.*\.){entry}($|\..*)"


def _pick_modules_to_save(model: nn.Module, entries: list[str]) -> tuple[dict[str, str], set[str]]:
    """Return ``{outermost picked name: entry}`` and the set of entries that picked any module."""
    picked: dict[str, str] = {}
    found: set[str] = set()
    last = None
    for name, _ in model.named_modules(remove_duplicate=False):
        entry = next((entry for entry in entries if name.endswith(entry)), None)
        if entry is None:
            continue
        found.add(entry)
        if last is None or not name.startswith(last + "."):
            picked[name] = entry
            last = name
    return picked, found


def _check_no_overlap(targets: list[str], saved: dict[str, str]) -> None:
    for target in targets:
        for name, entry in saved.items():
            if target == name or target.startswith(name + ".") or name.startswith(target + "."):
                raise LNTuneConfigError(
                    f"Module {target!r} is an LN tuning target but overlaps {name!r}, which modules_to_save "
                    f"entry {entry!r} picks (it picks every module whose name ends with {entry!r}). A module "
                    "is either tuned or saved in full: use a longer modules_to_save entry (e.g. the full "
                    "name) or add the module to exclude_modules. PEFT fails on this config too."
                )


def _no_target_message(
    model: nn.Module, described: str, excluded: list[str], no_parameters: list[str], norm_names: list[str]
) -> str:
    if excluded and not no_parameters:
        return (
            f"All modules were excluded: {described} matched {_listed(excluded)} in "
            f"{type(model).__name__}, and exclude_modules or modules_to_save excluded every one. Check "
            "target_modules, exclude_modules and modules_to_save."
        )
    if no_parameters:
        others = f" (the other matches were excluded: {_listed(excluded)})" if excluded else ""
        return (
            f"{described} matched only modules without parameters, which LN tuning cannot train: "
            f"{_listed(no_parameters)}{others}. Target modules that have a weight, such as the norms."
        )
    if not norm_names:
        return (
            f"{described} matched no module of {type(model).__name__}, which has no normalization module "
            "either. Pass target_modules naming the modules to tune."
        )
    suffixes = sorted({name.rpartition(".")[2] for name in norm_names})
    return (
        f"{described} matched no module of {type(model).__name__}. Its normalization modules are "
        f"{_listed(norm_names, _NAMES_IN_A_HINT)}. Pass target_modules as a list of name suffixes, e.g. "
        f"{suffixes}, or as a regex that matches the full name."
    )


def _listed(names: list[str], limit: int = _MAX_LISTED_NAMES) -> str:
    """``names`` for a message: at most ``limit`` of them, then how many more."""
    more = len(names) - limit
    return f"{names[:limit]}" + (f" (and {more} more)" if more > 0 else "")


def _check_patterns(field: str, value: Any) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise LNTuneConfigError(
                f"{field}={value!r} is not a valid regular expression ({exc}). Fix the regex, or pass a list "
                f"of module names such as ['input_layernorm'] to match name suffixes literally."
            ) from exc
        return _plain(value)
    return _check_names(field, value, "a regex string, a list of module names or None")


def _check_modules_to_save(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        raise LNTuneConfigError(
            f"modules_to_save must be a list of module names, got the string {value!r}: write "
            f"modules_to_save=[{value!r}] (PEFT would treat each character as a name)."
        )
    names = _check_names("modules_to_save", value, "a list of module names or None")
    for entry in names:
        try:
            re.compile(_modules_to_save_regex(entry))
        except re.error as exc:
            raise LNTuneConfigError(
                f"modules_to_save entry {entry!r} breaks PEFT's exclusion regex ({exc}): PEFT inserts "
                "entries into a regex unescaped. Use a plain module name such as 'classifier'."
            ) from exc
    return names


def _check_names(field: str, value: Any, expected: str) -> list[str]:
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise LNTuneConfigError(f"{field} must be {expected}, got {type(value).__name__} {value!r}.")
    bad = [entry for entry in value if not isinstance(entry, str) or not entry]
    if bad:
        raise LNTuneConfigError(
            f"{field} entries must be non-empty strings (module names), got {bad!r} in {value!r}. "
            "Example: ['input_layernorm', 'post_attention_layernorm']."
        )
    names = [_plain(entry) for entry in value]
    return sorted(names) if isinstance(value, (set, frozenset)) else names


def _check_task_type(value: Any) -> str | None:
    if value is None:
        return None
    plain = _plain(value) if isinstance(value, str) else value
    if plain not in _TASK_TYPES:
        raise LNTuneConfigError(
            f"task_type must be None or one of PEFT's task types {list(_TASK_TYPES)}, got {value!r}."
        )
    return plain


def _plain(value: Any) -> Any:
    """Turn a str enum (PEFT's ``PeftType``/``TaskType``) or str subclass into a plain ``str``."""
    if isinstance(value, enum.Enum):
        value = value.value
    return str.__str__(value) if isinstance(value, str) else value


def _copy_patterns(value: str | Iterable[str] | None) -> str | list[str] | None:
    return value if value is None or isinstance(value, str) else list(value)
