"""The graph passes of fx-lntune: each a function over a GraphModule returning a ``PassResult``."""

from fx_lntune.passes.checkpoint_layers import checkpoint_layers
from fx_lntune.passes.device import follow_input_device
from fx_lntune.passes.dropout import fold_dropout
from fx_lntune.passes.dtype import follow_weight_dtype
from fx_lntune.passes.fold import fold_module_calls
from fx_lntune.passes.image_count import free_image_count
from fx_lntune.passes.inject import inject_adapters
from fx_lntune.passes.merge import merge_adapters, unmerge_adapters
from fx_lntune.passes.split_layers import inline_layers, split_layers
from fx_lntune.passes.unload import unload_adapters

__all__ = [
    "checkpoint_layers",
    "inline_layers",
    "split_layers",
    "follow_input_device",
    "fold_dropout",
    "follow_weight_dtype",
    "fold_module_calls",
    "free_image_count",
    "inject_adapters",
    "merge_adapters",
    "unmerge_adapters",
    "unload_adapters",
]
