"""Drop-in layers: ticket weights (SparseLinear, SparseConv2d), NEq-capable dense layers
(DenseNEqLinear, NEqConv2d), and in-place conversion of whole models.

    import sparseticket.nn as stnn
    stnn.sparsify(model, amount=0.9)        # nn.Linear/nn.Conv2d -> sparse, 90% pruned by magnitude
    print(stnn.report(model))               # per layer: density, sparse or dense execution
    stnn.densify(model)                      # back to plain layers with the masked weights
"""
from ._common import TicketModule, neq_capable
from ._mode import clear_cache, get_mode, set_mode, use_mode
from ._registry import param_masks, register_param, unregister_param
from .conv import NEqConv2d, SparseConv2d, neq_conv2d
from .fast_step import MLPStep, remove_chains
from .distributed import check_same_masks
from .convert import attach_masks, densify, enable_neq, layer_report, magnitude_masks, neq_modules, report, sparsify
from .io import load_safetensors, load_state_dict, prepare_for_state_dict, save_safetensors
from .linear import DenseNEqLinear, FusedReLU, SparseLinear
from .pool import MaxPool2d

__all__ = ["SparseLinear", "SparseConv2d", "FusedReLU", "MLPStep", "remove_chains", "MaxPool2d", "DenseNEqLinear",
           "NEqConv2d", "TicketModule", "neq_conv2d",
           "sparsify", "densify", "enable_neq", "attach_masks", "neq_capable", "neq_modules", "magnitude_masks",
           "report", "layer_report", "set_mode", "get_mode", "use_mode", "clear_cache",
           "register_param", "unregister_param", "param_masks",
           "save_safetensors", "load_safetensors", "load_state_dict", "prepare_for_state_dict", "check_same_masks"]
