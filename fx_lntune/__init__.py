"""fx-lntune: LayerNorm tuning (arXiv 2312.11420) for Hugging Face models as a torch.fx graph rewrite."""

from fx_lntune.adapters import (
    add_adapter,
    delete_adapter,
    disable_adapter_layers,
    disable_adapters,
    enable_adapter_layers,
    merge_adapter,
    merge_and_unload,
    peft_config,
    set_adapter,
    unload,
    unmerge_adapter,
)
from fx_lntune.api import (
    active_adapter,
    active_adapters,
    get_nb_trainable_parameters,
    list_adapters,
    lntune_transform,
    print_trainable_parameters,
    targeted_module_names,
)
from fx_lntune.config import LNTuningConfig
from fx_lntune.deploy import export_onnx, export_program, export_torchscript
from fx_lntune.dispatch import LNTuningDispatch, ModulesToSaveDispatch
from fx_lntune.errors import (
    LNTuneAdapterError,
    LNTuneConfigError,
    LNTuneError,
    LNTuneExportError,
    LNTuneGenerationError,
    LNTuneStateError,
    LNTuneTraceError,
)
from fx_lntune.generation import generate
from fx_lntune.layer_graphs import chunked_loss, gradient_checkpointing, layer_modules
from fx_lntune.materialize import materialize
from fx_lntune.methods import TunedGraphModule
from fx_lntune.persistence import apply_to_model, load_adapter, save_adapter
from fx_lntune.trainer import adapter_checkpoints
from fx_lntune.visualize import visualize_graph

__all__ = [
    "TunedGraphModule",
    "LNTuningConfig",
    "LNTuningDispatch",
    "ModulesToSaveDispatch",
    "LNTuneError",
    "LNTuneConfigError",
    "LNTuneTraceError",
    "LNTuneAdapterError",
    "LNTuneStateError",
    "LNTuneExportError",
    "LNTuneGenerationError",
    "lntune_transform",
    "targeted_module_names",
    "get_nb_trainable_parameters",
    "print_trainable_parameters",
    "active_adapter",
    "active_adapters",
    "list_adapters",
    "peft_config",
    "add_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "disable_adapter_layers",
    "enable_adapter_layers",
    "merge_adapter",
    "unmerge_adapter",
    "merge_and_unload",
    "unload",
    "save_adapter",
    "load_adapter",
    "apply_to_model",
    "adapter_checkpoints",
    "visualize_graph",
    "materialize",
    "layer_modules",
    "chunked_loss",
    "gradient_checkpointing",
    "export_torchscript",
    "export_onnx",
    "export_program",
    "generate",
]
