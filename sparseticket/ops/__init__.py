"""sparseticket ops: schemas, backends, autograd.

``torch.ops.sparseticket.<name>`` is the op; this module makes sure its schema is
defined, picks an implementation per device, and registers autograd. Import order:

1. ``_library`` defines every schema and fake kernel;
2. the compiled C++ extension (``sparseticket._C``) registers CPU kernels, unless
   ``SPARSETICKET_NO_EXT=1`` or it was not built; failing that, the pure-PyTorch
   references are registered for the CPU so everything still runs (slowly);
3. autograd formulas, built from sparseticket ops.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torch.overrides import has_torch_function

from . import _library
from . import reference as ref
from ._library import (check_dense_to_ticket, check_masked_bias_grad, check_masked_sgd, check_neq_linear,
                       check_row_masked_grad_weight, check_sddmm, check_spmm, check_spmm_t, check_active)

#: which implementation serves each device: "c++", "reference", "triton", ...
BACKENDS: Dict[str, str] = {}
#: why the compiled extension is not in use, if it is not
EXTENSION_ERROR: Optional[str] = None

_C = None
if os.environ.get("SPARSETICKET_NO_EXT", "0") not in ("", "0"):
    EXTENSION_ERROR = "disabled by SPARSETICKET_NO_EXT"
else:
    try:
        from .. import _C  # noqa: F401  (registers TORCH_LIBRARY_IMPL(sparseticket, CPU))
    except ImportError as e:  # not built, or built against another torch
        EXTENSION_ERROR = f"{type(e).__name__}: {e}"
        warnings.warn(f"sparseticket: compiled kernels unavailable ({EXTENSION_ERROR}); "
                      "using the pure-PyTorch reference path (correct but slow). "
                      "Run `python -m sparseticket.info` for details.", stacklevel=2)


def c_entry_allowed(tensors) -> bool:
    """Whether a C++ entry of csrc/fast_calls.cpp may stand in for torch.ops with these
    tensor arguments. It reaches the same op through the dispatcher but skips Python's
    ``__torch_function__`` handling: not under a TorchFunctionMode or with an argument that
    overrides ``__torch_function__`` (``has_torch_function`` covers both), and not while
    torch.compile traces (the graph must see the op)."""
    return not torch.compiler.is_compiling() and not has_torch_function(tensors)


# ----------------------------------------------------------------------------- reference backend


def _check_ptr(name, ptr, nnz):
    _library._check(ptr.numel() >= 1 and int(ptr[0]) == 0 and int(ptr[-1]) == nnz,
                    f"sparseticket: {name} must start at 0 and end at nnz={nnz}")
    _library._check(bool((ptr[1:] >= ptr[:-1]).all()), f"sparseticket: {name} must be non-decreasing")


def _check_range(name, idx, k, operand):
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        _library._check(lo >= 0 and hi < k, f"sparseticket: {name} has index {lo if lo < 0 else hi} but {operand} "
                        f"has only {k} (is the ticket for a different in/out size?)")


def _checked_reference_impls():
    """Reference implementations with the same input checks as the compiled kernels."""

    def spmm(x, values, crow, col, bias):
        check_spmm(x, values, crow, col, bias)
        _check_ptr("crow", crow, values.numel())
        _check_range("col", col, x.shape[1], "x's feature dimension (x.size(1))")
        return ref.reference_spmm(x, values, crow, col, bias)

    def sparse_linear(x, values, crow, col, ccol, row, perm, bias, active):
        O = check_spmm(x, values, crow, col, bias)
        check_active(active, O, x)
        _library.check_sparse_linear_in(x, ccol)
        _check_ptr("crow", crow, values.numel())
        _check_range("col", col, x.shape[1], "x's feature dimension (x.size(1))")
        return ref.reference_spmm(x, values, crow, col, bias)

    def sparse_linear_relu(x, values, crow, col, ccol, row, perm, bias, active):
        # composed from the op itself, so a device whose sparse_linear is compiled or
        # Triton (but has no fused kernel) runs that, not the reference
        return torch.relu(torch.ops.sparseticket.sparse_linear(x, values, crow, col, ccol, row, perm, bias, active))

    def neq_linear(x, weight, bias, active):
        check_neq_linear(x, weight, bias, active)
        return ref.reference_neq_linear(x, weight, bias, active)

    def spmm_t(gy, values, ccol, row, perm):
        check_spmm_t(gy, values, ccol, row, perm)
        _check_ptr("ccol", ccol, values.numel())
        _check_range("row", row, gy.shape[1], "gy's feature dimension (gy.size(1))")
        _check_range("perm", perm, values.numel(), "values")
        return ref.reference_spmm_t(gy, values, ccol, row, perm)

    def sddmm(gy, x, crow, col, active):
        check_sddmm(gy, x, crow, col, active)
        _check_ptr("crow", crow, col.numel())
        _check_range("col", col, x.shape[1], "x's feature dimension (x.size(1))")
        return ref.reference_sddmm(gy, x, crow, col, active)

    def sparse_linear_backward(gy, y, x, values, crow, col, ccol, row, perm, active, input_grad):
        # composed from the ops (as sparse_linear_relu): a device with its own spmm_t and
        # sddmm (Triton) runs those
        _library.check_sparse_linear_backward(gy, y, x, values, crow, col, ccol, row, perm, active)
        if y is not None:
            gy = torch.ops.aten.threshold_backward(gy, y, 0)
        gy = gy.contiguous()
        gx = (torch.ops.sparseticket.spmm_t(gy, values, ccol, row, perm) if input_grad
              else gy.new_empty((0, ccol.numel() - 1)))
        return (gx, torch.ops.sparseticket.sddmm(gy, x, crow, col, active),
                torch.ops.sparseticket.masked_bias_grad(gy, active))

    def row_masked_grad_weight(gy, x, active):
        check_row_masked_grad_weight(gy, x, active)
        return ref.reference_row_masked_grad_weight(gy, x, active)

    def masked_bias_grad(gy, active):
        check_masked_bias_grad(gy, active)
        return ref.reference_masked_bias_grad(gy, active)

    def masked_sgd_(params, grads, bufs, keeps, actives, row_ptrs, fresh, lr, momentum, dampening, weight_decay,
                    nesterov, maximize):
        check_masked_sgd(params, grads, bufs, keeps, actives, row_ptrs, fresh, momentum)
        ref.reference_masked_sgd_(params, grads, bufs, keeps, actives, row_ptrs, fresh, lr, momentum, dampening,
                                  weight_decay, nesterov, maximize)

    def masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, keeps, actives, row_ptrs, steps, lr,
                      beta1, beta2, eps, weight_decay, amsgrad, maximize):
        _library.check_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, keeps, actives, row_ptrs,
                                    steps, amsgrad)
        ref.reference_masked_adamw_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, keeps, actives, row_ptrs,
                                    steps, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize)

    def dense_to_ticket(weight, mask):
        check_dense_to_ticket(weight, mask)
        return ref.reference_dense_to_ticket(weight, mask)

    def ticket_transpose(crow, col, n_cols):
        _library._check_index("crow", crow)
        _library._check_index("col", col)
        _library._check_same("col", col, "crow", crow)
        _check_ptr("crow", crow, col.numel())
        _check_range("col", col, n_cols, "n_cols")
        return ref.reference_ticket_transpose(crow, col, n_cols)

    def ticket_to_dense(values, crow, col, n_cols):
        _library._check_float("values", values)
        _library._check_dim("values", values, 1)
        _library._check_index("crow", crow)
        _library._check_index("col", col)
        _library._check_same("crow", crow, "values", values)
        _library._check_same("col", col, "values", values)
        _library._check(col.numel() == values.numel(),
                        f"sparseticket: col has {col.numel()} entries but values has {values.numel()}")
        _check_ptr("crow", crow, values.numel())
        _check_range("col", col, n_cols, "n_cols")
        return ref.reference_ticket_to_dense(values, crow, col, n_cols)

    def _check_bitmap(bits, crow, n_cols):
        _library.check_bitmap_args(crow, bits)
        O, words = crow.numel() - 1, (n_cols + 63) // 64
        _library._check(tuple(bits.shape) == (O, words), f"sparseticket: bits has shape {tuple(bits.shape)}, expected "
                        f"[{O}, {words}] (rows, ceil(n_cols / 64))")
        mask = ref.unpack_bits(bits, words * 64)
        ok = bool((mask.sum(1) == (crow[1:] - crow[:-1])).all()) and not bool(mask[:, n_cols:].any())
        _library._check(ok, "sparseticket: bits do not match the ticket (each row must set exactly "
                        f"crow[r+1]-crow[r] bits, none at or past n_cols={n_cols})")

    def ticket_bitmap(crow, col, n_cols):
        _library._check_index("crow", crow)
        _library._check_index("col", col)
        _library._check_same("col", col, "crow", crow)
        _check_ptr("crow", crow, col.numel())
        _check_range("col", col, n_cols, "n_cols")
        rows = torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device),
                                       (crow[1:] - crow[:-1]).long())
        same_row = rows[1:] == rows[:-1]
        _library._check(not bool((same_row & (col[1:] <= col[:-1])).any()),
                        "sparseticket: ticket_bitmap: the columns of a row are not strictly increasing")
        return ref.reference_ticket_bitmap(crow, col, n_cols)

    def ticket_expand(values, crow, bits, n_cols):
        _library._check_float("values", values)
        _library._check_dim("values", values, 1)
        _library._check_index("crow", crow)
        _check_ptr("crow", crow, values.numel())
        _check_bitmap(bits, crow, n_cols)
        return ref.reference_ticket_expand(values, crow, bits, n_cols)

    def ticket_compress(dense, crow, bits, nnz):
        _library._check_float("dense", dense)
        _library._check_dim("dense", dense, 2)
        _library._check_index("crow", crow)
        _library._check(dense.shape[0] == crow.numel() - 1,
                        f"sparseticket: dense has {dense.shape[0]} rows but crow has {crow.numel() - 1}")
        _check_ptr("crow", crow, nnz)
        _check_bitmap(bits, crow, dense.shape[1])
        return ref.reference_ticket_compress(dense, crow, bits, nnz)

    def sparse_conv2d(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding, dilation):
        _library.check_sparse_conv2d(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding,
                                     dilation)
        _check_ptr("crow", crow, values.numel())
        _check_ptr("ccol", ccol, values.numel())
        _check_range("col", col, ccol.numel() - 1, "the ticket's kh*kw*C columns")
        _check_range("row", row, crow.numel() - 1, "the output channels")
        _check_range("perm", perm, values.numel(), "values")
        return ref.reference_sparse_conv2d(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride,
                                           padding, dilation)

    def sparse_conv2d_grad_input(gy, values, crow, col, input_size, kernel_size, stride, padding, dilation):
        _library.check_sparse_conv2d_grad_input(gy, values, crow, col, input_size, kernel_size, stride, padding,
                                                dilation)
        _check_ptr("crow", crow, values.numel())
        _check_range("col", col, kernel_size[0] * kernel_size[1] * int(input_size[1]), "the ticket's kh*kw*C columns")
        return ref.reference_sparse_conv2d_grad_input(gy, values, crow, col, input_size, kernel_size, stride, padding,
                                                      dilation)

    def sparse_conv2d_relu(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding,
                           dilation):
        # composed from the op itself (as sparse_linear_relu): a device with its own
        # sparse_conv2d runs that
        return torch.relu(torch.ops.sparseticket.sparse_conv2d(x, values, crow, col, ccol, row, perm, bias, active,
                                                               kernel_size, stride, padding, dilation))

    def sparse_conv2d_grad_weight(gy, x, ccol, row, perm, active, kernel_size, stride, padding, dilation):
        _library.check_sparse_conv2d_grad_weight(gy, x, ccol, row, perm, active, kernel_size, stride, padding,
                                                 dilation)
        _check_ptr("ccol", ccol, row.numel())
        _check_range("row", row, gy.shape[1], "gy's channel dimension (gy.size(1))")
        _check_range("perm", perm, row.numel(), "values")
        return ref.reference_sparse_conv2d_grad_weight(gy, x, ccol, row, perm, active, kernel_size, stride, padding,
                                                       dilation)

    def max_pool2x2(x):
        _library.check_max_pool2x2(x)
        return ref.reference_max_pool2x2(x)

    def max_pool2x2_backward(gy, where, input_size):
        _library.check_max_pool2x2_backward(gy, where, input_size)
        return ref.reference_max_pool2x2_backward(gy, where, input_size)

    return dict(max_pool2x2=max_pool2x2, max_pool2x2_backward=max_pool2x2_backward, ticket_bitmap=ticket_bitmap,
                ticket_expand=ticket_expand, ticket_compress=ticket_compress, spmm=spmm, sparse_linear=sparse_linear,
                sparse_linear_relu=sparse_linear_relu, sparse_linear_backward=sparse_linear_backward,
                neq_linear=neq_linear, spmm_t=spmm_t, sddmm=sddmm,
                sparse_conv2d=sparse_conv2d, sparse_conv2d_relu=sparse_conv2d_relu,
                sparse_conv2d_grad_input=sparse_conv2d_grad_input,
                sparse_conv2d_grad_weight=sparse_conv2d_grad_weight, row_masked_grad_weight=row_masked_grad_weight,
                masked_bias_grad=masked_bias_grad,
                masked_sgd_=masked_sgd_, masked_adamw_=masked_adamw_,
                dense_to_ticket=dense_to_ticket, ticket_transpose=ticket_transpose, ticket_to_dense=ticket_to_dense)


def _register_reference(dispatch_key: str) -> None:
    for name, fn in _checked_reference_impls().items():
        _library.lib.impl(name, fn, dispatch_key)


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_library.NAMESPACE}::{name}", key)


#: ops the loaded compiled library has no CPU kernel for (a build older than the Python
#: package): they run the reference until the extension is rebuilt
STALE_OPS: List[str] = []
if _C is not None:
    BACKENDS["cpu"] = "c++"
    STALE_OPS = [n for n in _library.SCHEMAS if not _has_kernel(n, "CPU")]
    if STALE_OPS:
        _impls = _checked_reference_impls()
        for _name in STALE_OPS:
            _library.lib.impl(_name, _impls[_name], "CPU")
        warnings.warn(f"sparseticket: the compiled extension is older than the package (no kernel for "
                      f"{', '.join(STALE_OPS)}: these run the pure-PyTorch reference); rebuild it with "
                      "`pip install --no-build-isolation -e .`", stacklevel=2)
else:
    _register_reference("CPU")
    BACKENDS["cpu"] = "reference"

# GPU kernels register themselves for CUDA (sparseticket.triton); until one does, CUDA
# tensors take the reference path rather than failing.
from ..triton import register_cuda_backends as _register_cuda_backends  # noqa: E402  (never imports triton itself)

BACKENDS["cuda"] = _register_cuda_backends(_library.lib, _checked_reference_impls())


# ----------------------------------------------------------------------------- autograd


def _masked_bias_grad_setup(ctx, inputs, output):
    gy, active = inputs
    ctx.save_for_backward(active)
    ctx.gy_shape = gy.shape


def _masked_bias_grad_backward(ctx, gg):
    """masked_bias_grad is linear in gy: each gy[b, o, ...] gets gg[o], 0 for frozen o."""
    active, = ctx.saved_tensors
    if active is not None:
        gg = torch.where(active, gg, torch.zeros_like(gg))
    shape = ctx.gy_shape
    return gg.reshape([1, shape[1]] + [1] * (len(shape) - 2)).expand(shape), None


# No compiled autograd kernel: the C++ backward formulas call this op below the Autograd
# key unless they are recorded (create_graph), and then this formula differentiates it.
torch.library.register_autograd("sparseticket::masked_bias_grad", _masked_bias_grad_backward,
                                setup_context=_masked_bias_grad_setup)


# The other ops that backward formulas call (here and in csrc/autograd*.cpp, csrc/op_calls.h)
# run below autograd unless the backward is recorded (create_graph=True); then each is
# differentiated as its pure-PyTorch reference, which defines it, so second derivatives
# through a sparse layer are the dense masked layer's. Before session 31 these ops had no
# formula: torch took their outputs as constants and second derivatives came out 0, with
# only a warning (review 49).
_REFERENCE_DIFFERENTIATED = {
    "spmm_t": ref.reference_spmm_t,
    "sddmm": ref.reference_sddmm,
    "row_masked_grad_weight": ref.reference_row_masked_grad_weight,
    "ticket_compress": ref.reference_ticket_compress,
    "sparse_linear_backward": ref.reference_sparse_linear_backward,
    "sparse_conv2d_grad_input": ref.reference_sparse_conv2d_grad_input,
    "sparse_conv2d_grad_weight": ref.reference_sparse_conv2d_grad_weight,
}


def _reference_setup(ctx, inputs, output):
    tensors = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
    ctx.save_for_backward(*[inputs[i] for i in tensors])
    ctx.tensor_args = tensors
    ctx.other_args = [None if isinstance(a, torch.Tensor) else a for a in inputs]


def _reference_backward(reference):
    def backward(ctx, *grads):
        args = list(ctx.other_args)
        for i, t in zip(ctx.tensor_args, ctx.saved_tensors):
            args[i] = t
        wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need]
        result = [None] * len(args)
        if not wanted:
            return tuple(result)

        def f(*diff):
            a = list(args)
            for i, t in zip(wanted, diff):
                a[i] = t
            out = reference(*a)
            return tuple(out) if isinstance(out, (tuple, list)) else (out,)

        # torch.func.vjp, not autograd.grad on a graph built here: the inputs are part of
        # the graph being differentiated, whose spent nodes autograd.grad would walk into
        outs, vjp = torch.func.vjp(f, *[args[i] for i in wanted])
        got = vjp(tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outs, grads)))
        for i, g in zip(wanted, got):
            result[i] = g
        return tuple(result)
    return backward


for _name, _reference in _REFERENCE_DIFFERENTIATED.items():
    torch.library.register_autograd(f"sparseticket::{_name}", _reference_backward(_reference),
                                    setup_context=_reference_setup)


def _sparse_linear_setup(ctx, inputs, output):
    x, values, crow, col, ccol, row, perm, bias, active = inputs
    ctx.save_for_backward(x, values, crow, col, ccol, row, perm, active)
    ctx.has_bias = bias is not None


def _sparse_linear_grads(ctx, gy, y):
    x, values, crow, col, ccol, row, perm, active = ctx.saved_tensors[:8]
    want_bias = ctx.has_bias and ctx.needs_input_grad[7]
    gx = gvalues = gbias = None
    if ctx.needs_input_grad[1]:  # training: one op for all three (as csrc/autograd.cpp)
        gx, gvalues, gbias = torch.ops.sparseticket.sparse_linear_backward(
            gy.contiguous(), y, x, values, crow, col, ccol, row, perm, active, ctx.needs_input_grad[0])
        gx = gx if ctx.needs_input_grad[0] else None
        gbias = gbias if want_bias else None
    else:
        if y is not None:
            gy = torch.ops.aten.threshold_backward(gy, y, 0)
        gy = gy.contiguous()
        if ctx.needs_input_grad[0]:
            gx = torch.ops.sparseticket.spmm_t(gy, values, ccol, row, perm)
        if want_bias:
            gbias = torch.ops.sparseticket.masked_bias_grad(gy, active)
    return gx, gvalues, None, None, None, None, None, gbias, None


def _sparse_linear_backward(ctx, gy):
    return _sparse_linear_grads(ctx, gy, None)


def _sparse_linear_relu_setup(ctx, inputs, output):
    x, values, crow, col, ccol, row, perm, bias, active = inputs
    # the output masks the gradient in backward, as ReluBackward0 does
    ctx.save_for_backward(x, values, crow, col, ccol, row, perm, active, output)
    ctx.has_bias = bias is not None


def _sparse_linear_relu_backward(ctx, gy):
    return _sparse_linear_grads(ctx, gy, ctx.saved_tensors[8])


def _neq_linear_setup(ctx, inputs, output):
    x, weight, bias, active = inputs
    ctx.save_for_backward(x, weight, active)
    ctx.has_bias = bias is not None


def _neq_linear_backward(ctx, gy):
    x, weight, active = ctx.saved_tensors
    gy = gy.contiguous()
    gx = gw = gbias = None
    if ctx.needs_input_grad[0]:
        gx = gy @ weight  # frozen neurons still pass gradient to earlier layers
    if ctx.needs_input_grad[1]:
        gw = torch.ops.sparseticket.row_masked_grad_weight(gy, x, active)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        gbias = torch.ops.sparseticket.masked_bias_grad(gy, active)
    return gx, gw, gbias, None


def _sparse_conv2d_setup(ctx, inputs, output, *extra):
    x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding, dilation = inputs
    ctx.save_for_backward(x, values, crow, col, ccol, row, perm, active, *extra)
    ctx.has_bias = bias is not None
    ctx.conf = (tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation))


def _sparse_conv2d_relu_setup(ctx, inputs, output):
    _sparse_conv2d_setup(ctx, inputs, output, output)  # the output masks gy in backward (ReluBackward0)


def _sparse_conv2d_relu_backward(ctx, gy):
    return _sparse_conv2d_backward(ctx, torch.ops.aten.threshold_backward(gy, ctx.saved_tensors[8], 0))


def _sparse_conv2d_backward(ctx, gy):
    x, values, crow, col, ccol, row, perm, active = ctx.saved_tensors[:8]
    conf = ctx.conf
    gy = gy.contiguous()
    gx = gvalues = gbias = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.sparseticket.sparse_conv2d_grad_input(gy, values, crow, col, list(x.shape), *conf)
    if ctx.needs_input_grad[1]:
        gvalues = torch.ops.sparseticket.sparse_conv2d_grad_weight(gy, x, ccol, row, perm, active, *conf)
    if ctx.has_bias and ctx.needs_input_grad[7]:
        gbias = torch.ops.sparseticket.masked_bias_grad(gy, active)
    return gx, gvalues, None, None, None, None, None, gbias, None, None, None, None, None


# The compiled library registers the same formulas in C++ (csrc/autograd.cpp), which
# saves the Python round trips of this path on every layer call; these serve the
# reference path (and any op a stale build lacks).
for _name, _backward, _setup in [
        ("sparse_linear", _sparse_linear_backward, _sparse_linear_setup),
        ("sparse_linear_relu", _sparse_linear_relu_backward, _sparse_linear_relu_setup),
        ("neq_linear", _neq_linear_backward, _neq_linear_setup),
        ("sparse_conv2d", _sparse_conv2d_backward, _sparse_conv2d_setup),
        ("sparse_conv2d_relu", _sparse_conv2d_relu_backward, _sparse_conv2d_relu_setup)]:
    if _C is None or not _has_kernel(_name, "Autograd"):
        torch.library.register_autograd(f"sparseticket::{_name}", _backward, setup_context=_setup)


def _max_pool2x2_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.input_size = tuple(inputs[0].shape)


def _max_pool2x2_backward(ctx, gy, _gwhere):
    (where,) = ctx.saved_tensors
    return torch.ops.sparseticket.max_pool2x2_backward(gy.contiguous(), where, list(ctx.input_size))


def _max_pool2x2_backward_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _max_pool2x2_backward_backward(ctx, ggx):
    # the backward is linear in gy: its adjoint picks each window's kept element of ggx
    (where,) = ctx.saved_tensors
    return ref.reference_max_pool2x2_select(ggx, where), None, None


if _C is None or not _has_kernel("max_pool2x2", "Autograd"):  # (the compiled library has it in C++)
    torch.library.register_autograd("sparseticket::max_pool2x2", _max_pool2x2_backward,
                                    setup_context=_max_pool2x2_setup)
torch.library.register_autograd("sparseticket::max_pool2x2_backward", _max_pool2x2_backward_backward,
                                setup_context=_max_pool2x2_backward_setup)


# ticket_expand is differentiable in its values: the gradient of a dense weight goes back
# to the kept entries through the same bitmap (ticket_compress). In C++ too when the
# library is built (csrc/autograd.cpp).
def _expand_setup(ctx, inputs, output):
    values, crow, bits, n_cols = inputs
    ctx.save_for_backward(crow, bits)
    ctx.nnz = values.shape[0]


def _expand_backward(ctx, g):
    crow, bits = ctx.saved_tensors
    return torch.ops.sparseticket.ticket_compress(g, crow, bits, ctx.nnz), None, None, None


if _C is None:
    torch.library.register_autograd("sparseticket::ticket_expand", _expand_backward, setup_context=_expand_setup)


# ----------------------------------------------------------------------------- public names

spmm = torch.ops.sparseticket.spmm
spmm_t = torch.ops.sparseticket.spmm_t
sddmm = torch.ops.sparseticket.sddmm
row_masked_grad_weight = torch.ops.sparseticket.row_masked_grad_weight
masked_bias_grad = torch.ops.sparseticket.masked_bias_grad
masked_sgd_ = torch.ops.sparseticket.masked_sgd_
masked_adamw_ = torch.ops.sparseticket.masked_adamw_
dense_to_ticket = torch.ops.sparseticket.dense_to_ticket
ticket_transpose = torch.ops.sparseticket.ticket_transpose
ticket_to_dense = torch.ops.sparseticket.ticket_to_dense
ticket_bitmap = torch.ops.sparseticket.ticket_bitmap
ticket_expand = torch.ops.sparseticket.ticket_expand
ticket_compress = torch.ops.sparseticket.ticket_compress
sparse_linear_op = torch.ops.sparseticket.sparse_linear
sparse_linear_relu_op = torch.ops.sparseticket.sparse_linear_relu
sparse_linear_backward = torch.ops.sparseticket.sparse_linear_backward
neq_linear_op = torch.ops.sparseticket.neq_linear
sparse_conv2d_op = torch.ops.sparseticket.sparse_conv2d
sparse_conv2d_relu_op = torch.ops.sparseticket.sparse_conv2d_relu
sparse_conv2d_grad_input = torch.ops.sparseticket.sparse_conv2d_grad_input
sparse_conv2d_grad_weight = torch.ops.sparseticket.sparse_conv2d_grad_weight
max_pool2x2 = torch.ops.sparseticket.max_pool2x2
max_pool2x2_backward = torch.ops.sparseticket.max_pool2x2_backward

__all__ = ["spmm", "spmm_t", "sddmm", "row_masked_grad_weight", "masked_bias_grad", "masked_sgd_", "masked_adamw_", "dense_to_ticket",
           "ticket_transpose", "ticket_to_dense", "ticket_bitmap", "ticket_expand", "ticket_compress",
           "sparse_linear_op", "sparse_linear_relu_op", "sparse_linear_backward", "neq_linear_op", "sparse_conv2d_op", "sparse_conv2d_relu_op",
           "sparse_conv2d_grad_input", "sparse_conv2d_grad_weight", "max_pool2x2", "max_pool2x2_backward", "BACKENDS",
           "EXTENSION_ERROR", "ref"]
