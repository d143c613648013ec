"""Which masks apply to which Parameter: how the masked optimizers find them.

``MaskedSGD(model.parameters())`` sees only Parameter objects, so each module records,
for each of its parameters, how to fetch the current masks from the module:

* ``keep()``    -> bool tensor of the param's shape (False = pruned, held at 0) or None
* ``active()``  -> bool [rows] (False = frozen neuron, bits untouched) or None
* ``row_ptr()`` -> int32 CSR row pointers when the param is compact ticket values
* ``token()``   -> an object that changes whenever the param's structure (which weight
  each entry is) changes; the optimizer remaps or resets its state when it does
* ``remap(old_token, t)`` -> ``t`` (state laid out for the old structure) moved onto the
  current one, zeros for new entries, or None when the module cannot (state is reset)
* ``current()`` -> the Parameter now in the param's place in its module (a different
  object once a mask change altered nnz); the optimizers swap it into their param groups

The records live in a weak table keyed by Parameter identity, not as attributes on the
Parameters: ``copy.deepcopy`` drops tensor attributes and ``pickle`` cannot store the
closures, whereas the modules re-register in ``__setstate__`` (which both deepcopy and
unpickling call) and after ``_apply``/``load_state_dict(assign=True)``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class ParamMasks:
    keep: Optional[Callable[[], Optional[Tensor]]] = None
    active: Optional[Callable[[], Optional[Tensor]]] = None
    row_ptr: Optional[Callable[[], Optional[Tensor]]] = None
    token: Optional[Callable[[], object]] = None
    remap: Optional[Callable[[object, Tensor], Optional[Tensor]]] = None
    current: Optional[Callable[[], Optional[Tensor]]] = None


_TABLE: "WeakIdKeyDictionary" = WeakIdKeyDictionary()
#: bumped at every (un)registration, so optimizers can cache lookups between steps
VERSION = [0]


def register_param(param: Tensor, *, keep=None, active=None, row_ptr=None, token=None, remap=None,
                   current=None) -> None:
    """Tell the masked optimizers how to find ``param``'s masks (each a zero-argument callable).

    For third-party layers: e.g. a dense layer pruned by a mask it keeps elsewhere,
    ``register_param(layer.weight, keep=lambda: my_masks['fc1'])``.
    """
    _TABLE[param] = ParamMasks(keep, active, row_ptr, token, remap, current)
    VERSION[0] += 1


def unregister_param(param: Tensor) -> None:
    if _TABLE.pop(param, None) is not None:
        VERSION[0] += 1


def param_masks(param: Tensor) -> Optional[ParamMasks]:
    return _TABLE.get(param)


def _module_getter(module: torch.nn.Module, attr: str) -> Callable[[], Optional[Tensor]]:
    ref = weakref.ref(module)

    def get():
        # buffers, parameters, plain attributes directly, unrolled: nn.Module.__getattr__
        # is slow, and a repeated optimizer step calls several of these per parameter
        # (building a tuple of the three dicts per call cost ~0.2 us of ~0.35)
        m = ref()
        if m is None:
            return None
        d = m._buffers
        if attr in d:
            return d[attr]
        d = m._parameters
        if attr in d:
            return d[attr]
        d = m.__dict__
        if attr in d:
            return d[attr]
        return getattr(m, attr, None)

    return get


def _module_method(module: torch.nn.Module, name: str) -> Callable:
    ref = weakref.ref(module)

    def call(*args):
        m = ref()
        return None if m is None else getattr(m, name)(*args)

    return call


def register_module_params(module: torch.nn.Module) -> None:
    """(Re-)register the parameters of a sparseticket module (or a torch-pruned layer).

    * ``weight_values`` (compact ticket values): active and row_ptr = crow, token, remap
    * ``weight`` / ``weight_orig`` (dense, NEq-capable): active over dim 0; with a
      ``weight_mask`` buffer (torch.nn.utils.prune), keep = that mask
    * ``bias``: active
    """
    has_active = hasattr(module, "active")
    active = _module_getter(module, "active") if has_active else None
    p = module._parameters.get("weight_values")
    if p is not None:
        register_param(p, active=active, row_ptr=_module_getter(module, "crow"),
                       token=_module_getter(module, "_st_token"), remap=_module_method(module, "_st_remap_state"),
                       current=_module_getter(module, "weight_values"))
    for name in ("weight", "weight_orig"):
        p = module._parameters.get(name)
        if p is None:
            continue
        keep = _prune_keep_getter(module) if name == "weight_orig" else None
        if keep is None and active is None:
            unregister_param(p)
        else:
            register_param(p, keep=keep, active=active, current=_module_getter(module, name))
    p = module._parameters.get("bias")
    if p is not None:
        if active is None:
            unregister_param(p)
        else:
            register_param(p, active=active, current=_module_getter(module, "bias"))


def _prune_keep_getter(module: torch.nn.Module) -> Optional[Callable[[], Optional[Tensor]]]:
    """keep() for a layer pruned by torch.nn.utils.prune: its ``weight_mask`` as bool (cached)."""
    if "weight_mask" not in module._buffers:
        return None
    ref = weakref.ref(module)
    cache = {}

    def keep():
        m = ref()
        if m is None:
            return None
        wm = m._buffers.get("weight_mask")
        if wm is None:
            return None
        if wm.dtype == torch.bool:
            return wm
        sig = (id(wm), wm._version, wm.data_ptr())
        if cache.get("sig") != sig:
            cache["sig"], cache["mask"] = sig, wm != 0
        return cache["mask"]

    return keep
