"""Loading compact checkpoints into fresh models, and safetensors files."""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor, nn

from ._common import LAYOUT_KEY, TicketModule
from .conv import NEqConv2d, SparseConv2d
from .convert import _DENSE_TYPES, _named_convertible
from .fast_step import install_chains
from .linear import DenseNEqLinear, SparseLinear, _init_neq


def prepare_for_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Make a freshly built (dense) model's layers match a sparseticket checkpoint, in place.

    Layers whose checkpoint entries are a ticket (``<name>.weight_values``) become
    SparseLinear / SparseConv2d (their structure is then set by ``load_state_dict``);
    dense layers with an ``active`` entry become NEq-capable (an MLP holding one gets the
    chain node, as after ``enable_neq``). Layers already sparse stay.
    """
    for name, parent, attr, module in _named_convertible(model, _DENSE_TYPES):
        if name + ".weight_values" in state_dict:
            cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
            full = torch.ones(module.weight.shape, dtype=torch.bool, device=module.weight.device)
            setattr(parent, attr, cls.from_dense(module, full, name=name))
        elif name + ".active" in state_dict and type(module) in (nn.Linear, nn.Conv2d):
            module.__class__ = DenseNEqLinear if type(module) is nn.Linear else NEqConv2d
            _init_neq(module)
    install_chains(model, holding=(DenseNEqLinear,))
    return model


def load_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], strict: bool = True):
    """``prepare_for_state_dict`` then ``model.load_state_dict``: loads a sparse checkpoint into
    a freshly built dense or sparse model. Returns load_state_dict's result."""
    prepare_for_state_dict(model, state_dict)
    return model.load_state_dict(state_dict, strict=strict)


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # optional dependency
        raise ImportError("sparseticket: safetensors is not installed (pip install safetensors)") from e
    return st


def save_safetensors(model: nn.Module, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``model.state_dict()`` (compact tickets included) to a safetensors file."""
    st = _safetensors()
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach()
        ptr = (v.untyped_storage().data_ptr(), v.device) if v.numel() else None
        if ptr in seen or not v.is_contiguous():  # safetensors refuses shared or strided storage
            v = v.contiguous().clone()
        if ptr is not None:
            seen.add(ptr)
        tensors[k] = v
    meta = {"format": "pt", "library": "sparseticket"}
    meta.update(metadata or {})
    # what each ticket's columns mean (TicketModule.ticket_layout), checked on loading
    meta.update({f"{LAYOUT_KEY}:{name}": m.ticket_layout() for name, m in model.named_modules()
                 if isinstance(m, TicketModule)})
    st.save_file(tensors, path, metadata=meta)


def load_safetensors(model: nn.Module, path: str, strict: bool = True, device=None):
    """Load a safetensors file written by ``save_safetensors`` into ``model`` (fresh or not)."""
    st = _safetensors()
    if device is None:
        p = next(iter(model.parameters()), None)
        device = "cpu" if p is None else str(p.device)
    state = OrderedDict(st.load_file(path, device=device))
    with st.safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
    # the layouts saved by save_safetensors, as state-dict metadata (what load_state_dict checks)
    state._metadata = {k[len(LAYOUT_KEY) + 1:]: {LAYOUT_KEY: v} for k, v in header.items()
                       if k.startswith(LAYOUT_KEY + ":")}
    return load_state_dict(model, state, strict=strict)
