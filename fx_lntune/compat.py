"""Version shims: each difference between the transformers / torch releases we support, handled in one place.

Every shim names the versions it serves, so that it can go when the oldest supported release no longer needs it.
The README's "Tested with" table lists those releases.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["hf_fx_available", "model_token_id", "is_stateless_function_module", "is_tracing"]


def hf_fx_available() -> bool:
    """True where transformers still ships ``transformers.utils.fx``.

    transformers <= 4.57 has it; 5.0 removed it (the ``hf_fx`` front-end is then unavailable).
    """
    try:
        import transformers.utils.fx  # noqa: F401
    except ImportError:
        return False
    return True


def model_token_id(model: nn.Module, field: str) -> int | None:
    """A special token id (``pad_token_id``, ``decoder_start_token_id``, ...) the way transformers reads it: the
    model's config, then its generation config; ``None`` where neither holds it.

    transformers <= 4.57: a config answers a field it does not hold with the class default (``None``).
    transformers >= 5.2x (seen on 5.25): configs raise ``AttributeError`` for fields they do not hold (e.g.
    ``T5Config(...)`` built without ``decoder_start_token_id``), and generation ids live in
    ``model.generation_config``. ``getattr`` with a default reads both lines alike.
    """
    config = getattr(model, "config", None)
    value = getattr(config, field, None) if config is not None else None
    if value is None:
        generation = getattr(model, "generation_config", None)
        value = getattr(generation, field, None) if generation is not None else None
    if isinstance(value, (list, tuple)):  # several eos ids; a start or pad id is one
        value = value[0] if value else None
    return value


def is_stateless_function_module(value: object) -> bool:
    """True for a module that only wraps a function: no parameters, buffers, submodules, hooks or attributes of
    its own beyond ``nn.Module``'s bookkeeping. Two of the same class compute the same thing.

    transformers >= 5.2x (seen on 5.25; kernels integration, ``use_kernelized_func``): every attention module holds
    its own instance of such a wrapper (``self_attn._kernel_funcs["rotary_pos_emb"]``), so alike layers of the llama
    family hold different objects that must compare as alike. transformers <= 4.57 has no such attribute.
    """
    if not isinstance(value, nn.Module) or value._parameters or value._buffers or value._modules:
        return False
    own = set(vars(value)) - set(vars(nn.Module()))
    hooks = [key for key, item in vars(value).items() if key.endswith(("_hooks", "_hooks_with_kwargs")) and item]
    return not own and not hooks


def is_tracing(tensor: torch.Tensor | None = None) -> bool:
    """Whether a tracer sees this call (dynamo compile or export, TorchScript trace, torch.fx, fake tensors): the
    test transformers' masking code makes before reading values from a tensor.

    transformers 5 has it as ``transformers.utils.import_utils.is_tracing``; 4.57 has no such function (its checks
    are spread over ``is_torchdynamo_compiling`` and friends), so the same test is made here.
    """
    try:
        from transformers.utils.import_utils import is_tracing as hf_is_tracing  # transformers >= 5
    except ImportError:  # transformers 4.57
        from torch._subclasses.fake_tensor import FakeTensor

        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return True
        return tensor is not None and isinstance(tensor, (torch.fx.Proxy, FakeTensor))
    return hf_is_tracing(tensor)
