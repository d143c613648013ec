"""MaskedSGD: torch.optim.SGD through the fused ``masked_sgd_`` kernel, with masks."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops as _ops
from ._base import MaskedOptimizer, lean_step, _float, check_implementation_args, check_positive, lists

_masked_sgd_ = torch.ops.sparseticket.masked_sgd_
# The same op through the C++ dispatcher without torch.ops' per-element argument parsing
# (csrc/fast_calls.cpp: ~5 us less per step for a six-parameter model); not while
# torch.compile traces, which must see the op itself.
_masked_sgd_call = getattr(_ops._C, "masked_sgd_call", None) if _ops._C is not None else None


def _sgd_call():
    if _masked_sgd_call is None or torch.compiler.is_compiling():
        return _masked_sgd_
    return _masked_sgd_call


class MaskedSGD(MaskedOptimizer):
    """torch.optim.SGD (same arguments, param groups, state_dict with ``momentum_buffer``)
    that keeps pruned weights at exactly 0 and leaves frozen neurons bit-for-bit untouched.

    Masks come from the layers: a SparseLinear/SparseConv2d's compact ``weight_values``
    (frozen rows through its ``crow``), NEq layers' ``active`` over dim 0 (weight and bias),
    ``torch.nn.utils.prune`` masks (after ``sparseticket.nn.attach_masks``), or
    ``sparseticket.nn.register_param``. Parameters without masks get plain SGD.
    Each param group is one call of the fused multi-tensor kernel.
    """

    _state_tensors = ("momentum_buffer",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, differentiable: bool = False):
        check_implementation_args(differentiable)
        check_positive("learning rate", lr)
        check_positive("momentum value", momentum)
        check_positive("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("sparseticket: Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    @lean_step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            momentum = _float(group["momentum"], "momentum")
            params, grads, bufs, keeps, actives, row_ptrs, fresh = lists(7)
            for p, state, keep, active, row_ptr in self._prepare(group):
                params.append(p)
                grads.append(p.grad)
                keeps.append(keep)
                actives.append(active)
                row_ptrs.append(row_ptr)
                if momentum != 0:
                    buf = state.get("momentum_buffer")
                    # zeros, not empty: frozen entries of a new buffer keep these bits
                    fresh.append(buf is None)
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    bufs.append(buf)
                else:
                    fresh.append(False)
            if params:
                _sgd_call()(params, grads, bufs, keeps, actives, row_ptrs, fresh, _float(group["lr"], "lr"),
                            momentum, _float(group["dampening"], "dampening"),
                            _float(group["weight_decay"], "weight_decay"), bool(group["nesterov"]),
                            bool(group["maximize"]))
        return loss
