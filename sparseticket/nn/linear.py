"""SparseLinear (a ticket weight) and DenseNEqLinear (a dense weight whose frozen rows get no gradient)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops as _ops
from . import _mode
from ._common import (REDUCED_FLOATS, NEqMixin, TicketModule, autocast_device, autocast_operand, check_active,
                      check_replaceable, check_weight_dtype, where)
from ._registry import register_module_params

_sparse_linear = torch.ops.sparseticket.sparse_linear
_sparse_linear_relu = torch.ops.sparseticket.sparse_linear_relu
_ticket_expand = torch.ops.sparseticket.ticket_expand
_neq_linear = torch.ops.sparseticket.neq_linear
# sparse_linear(_relu) through the C++ dispatcher without torch.ops' argument parsing
# (csrc/fast_calls.cpp: ~2 us less per call), where _ops.c_entry_allowed says it may.
_sparse_linear_call = getattr(_ops._C, "sparse_linear_call", None) if _ops._C is not None else None


class SparseLinear(TicketModule):
    """Drop-in nn.Linear whose weight is a ticket: y = x Wᵀ + b, x: [..., in_features].

    Only the kept weights are stored and trained (``weight_values``: [nnz]); the index
    structure (``crow``/``col`` CSR and its transpose ``ccol``/``row``/``perm``, int32) is
    buffers. Forward, input gradient and kept-weight gradient equal nn.Linear's with the
    masked weight. ``mode``: 'sparse' (ticket kernels), 'dense' (dense masked weight and
    BLAS), or 'auto' (measured per shape, see ``sparseticket.nn.set_mode``).

    ``SparseLinear(in, out)`` initialises like nn.Linear and keeps a random ``density``
    fraction of the weights; usually build one with :meth:`from_dense` or ``sparsify``.

    ``activation='relu'`` makes the layer compute relu(x Wᵀ + b) as one op and one
    autograd node (``sparsify(..., fuse_relu=True)`` sets it and replaces the nn.ReLU
    that followed by a :class:`FusedReLU` placeholder). Its output, which forward hooks
    see, is then the activation.
    """

    _layout_kind = "Linear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, density: float = 1.0,
                 mode: str = "auto", device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        ref = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_ticket(ref.weight, _random_mask(ref.weight.shape, density, ref.weight.device), ref.bias, mode)

    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None, *, mode: str = "auto",
                   name: Optional[str] = None) -> "SparseLinear":
        """A SparseLinear computing ``linear`` with its weight masked by ``mask`` ([out, in], bool or 0/1).

        ``mask=None``: the layer's torch.nn.utils.prune mask if it has one, else ``weight != 0``.
        An ``active`` mask (DenseNEqLinear) carries over.
        """
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._st_name = name
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, mask = _weight_and_mask(linear, mask)
        self._init_ticket(weight, mask, linear.bias, mode)
        a = getattr(linear, "active", None)
        if a is not None:
            self.set_active(a)
        self.train(linear.training)
        return self

    def to_dense(self) -> nn.Linear:
        """A dense nn.Linear with the masked weight (a DenseNEqLinear if neurons are frozen).

        A fused activation is not part of it: ``densify`` turns the FusedReLU placeholder
        back into nn.ReLU."""
        p = self.weight_values
        frozen = self._buffers.get("active") is not None
        cls = DenseNEqLinear if frozen else nn.Linear
        lin = cls(self.in_features, self.out_features, bias=self.bias is not None, device=p.device, dtype=p.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            lin.weight.requires_grad_(p.requires_grad)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
                lin.bias.requires_grad_(self.bias.requires_grad)
        if frozen:
            lin.set_active(self.active)
        lin.train(self.training)
        return lin

    # -- structure
    def _weight_shape(self):
        return (self.out_features, self.in_features)

    def _ticket_cols(self) -> int:
        return self.in_features

    # -- execution
    def _run_sparse(self, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        b = self._buffers  # direct dict access: nn.Module.__getattr__ costs ~0.5 us per name
        args = (x, values, b["crow"], b["col"], b["ccol"], b["row"], b["perm"], bias, b["active"])
        if _sparse_linear_call is not None and _ops.c_entry_allowed(args):
            return _sparse_linear_call(*args, self.activation is not None)
        return (_sparse_linear if self.activation is None else _sparse_linear_relu)(*args)

    def _run_dense(self, x: Tensor, values: Tensor, bias: Optional[Tensor]) -> Tensor:
        b = self._buffers
        if values.shape[0] == self.out_features * self.in_features:
            w = values.view(self.out_features, self.in_features)  # full ticket: values are W, row-major
        else:
            w = _ticket_expand(values, b["crow"], b["bits"], self.in_features)
        active = b["active"]
        y = F.linear(x, w, bias) if active is None else _neq_linear(x, w, bias, active)
        return y if self.activation is None else torch.relu(y)

    def forward(self, x: Tensor) -> Tensor:
        values, bias = self._parameters["weight_values"], self._parameters["bias"]
        amp = autocast_device(x)
        if amp is not None:
            with torch.autocast(amp, enabled=False):
                return self.forward(x.to(values.dtype) if x.dtype in REDUCED_FLOATS else x)
        if x.shape[-1] != self.in_features or x.dtype != values.dtype:
            raise ValueError(f"sparseticket: {where(self)}: input has shape {tuple(x.shape)} and dtype {x.dtype}; "
                             f"expected [..., {self.in_features}] of {values.dtype}")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        path = self._path(x2)
        y = self._run_sparse(x2, values, bias) if path == "sparse" else self._run_dense(x2, values, bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def _key(self, x2: Tensor) -> tuple:
        return ("linear", self.in_features, self.out_features, _mode.nnz_bucket(self.nnz),
                _mode.batch_bucket(x2.shape[0]), self.activation) + _mode.common_key(x2.dtype, x2.device,
                                                                                     self._grad_key(x2))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                + self._repr_common())


class FusedReLU(nn.Identity):
    """Stands where an nn.ReLU was before ``sparsify(..., fuse_relu=True)`` folded it into
    the SparseLinear / SparseConv2d before it (which now applies it), or, where a
    sparseticket MaxPool2d follows it, into that pool (``relu_after``: the ReLU is applied
    to the pool's output, so a hook on this placeholder, or a pre-hook on the pool, sees
    the pre-activation); ``densify`` puts nn.ReLU back."""


class DenseNEqBase(NEqMixin):
    """What the dense NEq layers (DenseNEqLinear, NEqConv2d) add to their torch base class:
    an ``active`` entry that loads from checkpoints with or without it, parameter
    registration for the masked optimizers after loading/unpickling, and ``frozen=`` in repr."""

    def _load_from_state_dict(self, state_dict, prefix, *args):
        _prepare_active_load(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)
        register_module_params(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        register_module_params(self)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self._buffers["active"] is not None:
            s += f", frozen={self.frozen_fraction:.3g}"
        return s


class DenseNEqLinear(DenseNEqBase, nn.Linear):
    """nn.Linear with NEq freezing: ``active`` ([out] bool or None) rows get no weight/bias gradient.

    The weight gradient of frozen rows is never computed (``neq_linear`` op); the input
    gradient still flows through them. State dict keys are nn.Linear's plus ``active``
    when set. Works with torch.nn.utils.prune (the hook sets ``weight`` before forward).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _init_neq(self)

    def forward(self, x: Tensor) -> Tensor:
        active = self._buffers["active"]
        if active is None:
            return F.linear(x, self.weight, self.bias)
        amp = autocast_device(x)
        if amp is not None:
            # as autocast runs F.linear: the operands cast to its dtype outside the op (the
            # casts are autograd nodes, so the parameters get gradients of their own
            # dtype), the product and its backward in that dtype
            # (float64 and non-float operands stay as they are, and must then match)
            dt = torch.get_autocast_dtype(amp)
            with torch.autocast(amp, enabled=False):
                return self._neq_forward(autocast_operand(x, dt), autocast_operand(self.weight, dt),
                                         autocast_operand(self.bias, dt), active)
        return self._neq_forward(x, self.weight, self.bias, active)

    def _neq_forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], active: Tensor) -> Tensor:
        if x.dtype not in (torch.float32, torch.float64) or weight.dtype != x.dtype:
            if weight.dtype != x.dtype:
                raise ValueError(f"sparseticket: {where(self)}: input has dtype {x.dtype}, weight {weight.dtype}")
            return _ReducedPrecisionNEqLinear.apply(x, weight, bias, active)
        if x.dim() == 2:  # (self.weight, not _parameters: torch.nn.utils.prune sets it as an attribute)
            return _neq_linear(x, weight, bias, active)
        lead = x.shape[:-1]
        y = _neq_linear(x.reshape(lead.numel(), x.shape[-1]), weight, bias, active)
        return y.reshape(*lead, self.out_features) if len(lead) != 1 else y

    def _n_out(self) -> int:
        return self.out_features


class _ReducedPrecisionNEqLinear(torch.autograd.Function):
    """neq_linear for the dtypes its kernels lack (bf16 / fp16, as under autocast): the same
    gradients (none for frozen rows: their weight and bias gradients are zero) from dense
    products in that dtype, with no rows skipped."""

    @staticmethod
    def forward(ctx, x, weight, bias, active):
        ctx.save_for_backward(x, weight, active)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight, active = ctx.saved_tensors
        gx = gw = gb = None
        lead = gy.shape[:-1].numel()
        g2 = gy.reshape(lead, gy.shape[-1])
        if ctx.needs_input_grad[0]:
            gx = gy @ weight  # frozen neurons still pass gradient to earlier layers
        if ctx.needs_input_grad[1]:
            gw = torch.where(active[:, None], g2.t() @ x.reshape(lead, x.shape[-1]), 0)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = torch.where(active, g2.sum(0), 0)
        return gx, gw, gb, None


# ----------------------------------------------------------------------------- helpers


def _init_neq(module: nn.Module) -> None:
    if "active" not in module._buffers:
        module.register_buffer("active", None)
    register_module_params(module)


def _prepare_active_load(module: nn.Module, state_dict, prefix: str) -> None:
    """A checkpoint with ``active`` loads into a module whose ``active`` is None."""
    a = state_dict.get(prefix + "active")
    if a is not None and module._buffers.get("active") is None:
        dev = next(iter(module._parameters.values())).device
        module._buffers["active"] = check_active(a, module._n_out(), where(module, prefix[:-1] or None), dev)


def _random_mask(shape, density: float, device) -> Tensor:
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"sparseticket: density must be in [0, 1], got {density}")
    n = 1
    for s in shape:
        n *= s
    k = int(round(density * n))
    if k == n:
        return torch.ones(shape, dtype=torch.bool, device=device)
    m = torch.zeros(n, dtype=torch.bool, device=device)
    m[torch.randperm(n, device=device)[:k]] = True
    return m.view(shape)


def _weight_and_mask(layer: nn.Module, mask):
    """(dense weight, mask) of a dense layer, honouring torch.nn.utils.prune's weight_orig/weight_mask."""
    check_replaceable(layer, where(layer))
    if "weight_orig" in layer._parameters:
        weight = layer.weight_orig
        if mask is None:
            mask = layer.weight_mask
    else:
        weight = layer.weight
    if mask is None:
        mask = weight.detach() != 0
    check_weight_dtype(weight.dtype, where(layer))
    return weight, mask
