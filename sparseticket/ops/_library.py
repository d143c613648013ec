"""The one place where sparseticket's op schemas live.

Backends only register implementations: the C++ extension through
``TORCH_LIBRARY_IMPL(sparseticket, CPU, m)``, Triton/CUDA through their own modules,
and, when no compiled kernel is available for a device, the pure-PyTorch references.
Every op also has a fake kernel (shape/dtype inference with ``torch._check``), so
``torch.compile`` traces through it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NAMESPACE = "sparseticket"
lib = torch.library.Library(NAMESPACE, "DEF")

SCHEMAS = {
    # y = x Wᵀ + b for a ticket W; `ccol/row/perm` and `active` are carried for backward.
    "sparse_linear": "(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor ccol, Tensor row, "
    "Tensor perm, Tensor? bias, Tensor? active) -> Tensor",
    # relu(sparse_linear(...)) as one op and one autograd node (SparseLinear with
    # activation='relu'): the ReLU is applied as the output is written, and its backward
    # masks gy by the saved output
    "sparse_linear_relu": "(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor ccol, Tensor row, "
    "Tensor perm, Tensor? bias, Tensor? active) -> Tensor",
    # The backward of sparse_linear (y None) and sparse_linear_relu (y its output; gy is
    # first zeroed where y <= 0) in one op: (gx, gvalues, gbias). gx is gy W ([B, I]) when
    # input_grad, else an empty [0, I]; gvalues is sddmm's and gbias the batch sum of gy,
    # both 0 on frozen rows (active False); gx still gets their contribution.
    "sparse_linear_backward": "(Tensor gy, Tensor? y, Tensor x, Tensor values, Tensor crow, Tensor col, "
    "Tensor ccol, Tensor row, Tensor perm, Tensor? active, bool input_grad) -> (Tensor, Tensor, Tensor)",
    # dense linear whose weight gradient skips frozen rows
    "neq_linear": "(Tensor x, Tensor weight, Tensor? bias, Tensor? active) -> Tensor",
    "spmm": "(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor? bias) -> Tensor",
    "spmm_t": "(Tensor gy, Tensor values, Tensor ccol, Tensor row, Tensor perm) -> Tensor",
    "sddmm": "(Tensor gy, Tensor x, Tensor crow, Tensor col, Tensor? active) -> Tensor",
    "row_masked_grad_weight": "(Tensor gy, Tensor x, Tensor? active) -> Tensor",
    # the bias gradient [O] of a layer whose output gradient is gy ([B, O] or [N, O, H, W]):
    # gy summed over every dim but 1, and exactly 0 at frozen neurons (active False), even
    # where that sum is inf/NaN
    "masked_bias_grad": "(Tensor gy, Tensor? active) -> Tensor",
    "masked_sgd_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
    "Tensor?[] keep_masks, Tensor?[] active_masks, Tensor?[] row_ptrs, bool[] fresh, float lr, "
    "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize) -> ()",
    "masked_adamw_": "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor?[] keep_masks, Tensor?[] active_masks, Tensor?[] row_ptrs, "
    "float[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
    "bool maximize) -> ()",
    "dense_to_ticket": "(Tensor weight, Tensor mask) -> (Tensor, Tensor, Tensor)",
    "ticket_transpose": "(Tensor crow, Tensor col, SymInt n_cols) -> (Tensor, Tensor, Tensor)",
    "ticket_to_dense": "(Tensor values, Tensor crow, Tensor col, SymInt n_cols) -> Tensor",
    "ticket_bitmap": "(Tensor crow, Tensor col, SymInt n_cols) -> Tensor",
    "ticket_expand": "(Tensor values, Tensor crow, Tensor bits, SymInt n_cols) -> Tensor",
    "ticket_compress": "(Tensor dense, Tensor crow, Tensor bits, SymInt nnz) -> Tensor",
    # Direct (no im2col) sparse convolution, groups=1, zero padding. The ticket is the
    # [O, kh*kw*C] matrix with columns ordered (tap, channel); x/gy are NCHW.
    # y = conv2d(x, W) + b; `active` (frozen output channels) is carried for backward.
    "sparse_conv2d": "(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor ccol, Tensor row, Tensor perm, "
    "Tensor? bias, Tensor? active, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor",
    # relu(sparse_conv2d(...)) as one op and one autograd node (SparseConv2d with
    # activation='relu'): the ReLU is applied as the output tiles are written
    "sparse_conv2d_relu": "(Tensor x, Tensor values, Tensor crow, Tensor col, Tensor ccol, Tensor row, Tensor perm, "
    "Tensor? bias, Tensor? active, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor",
    # gx [input_size] from gy [N, O, oh, ow]
    "sparse_conv2d_grad_input": "(Tensor gy, Tensor values, Tensor crow, Tensor col, SymInt[4] input_size, "
    "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor",
    # kept-weight gradient [nnz] (values order); rows of frozen channels are 0, never computed
    "sparse_conv2d_grad_weight": "(Tensor gy, Tensor x, Tensor ccol, Tensor row, Tensor perm, Tensor? active, "
    "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) -> Tensor",
    # 2x2, stride-2 max-pool (floor), as F.max_pool2d(x, 2): y and, per output, the index
    # 2a + b (uint8) of the window element (2r + a, 2q + b) it kept, for the backward
    "max_pool2x2": "(Tensor x) -> (Tensor, Tensor)",
    # gx [input_size]: gy at each window's kept element, 0 elsewhere
    "max_pool2x2_backward": "(Tensor gy, Tensor where, SymInt[4] input_size) -> Tensor",
}

for _name, _schema in SCHEMAS.items():
    lib.define(_name + _schema)

FLOATS = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- checks
# Shared by the fake kernels and the reference backend, so both reject bad input with
# the same message naming the argument. The C++ kernels carry the same checks.


def _check(cond, msg):
    torch._check(cond, lambda: msg)


def _check_float(name: str, t: Tensor):
    _check(t.dtype in FLOATS, f"sparseticket: {name} must be float32 or float64, got {t.dtype}")


def _check_dim(name: str, t: Tensor, dim: int):
    _check(t.dim() == dim, f"sparseticket: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_index(name: str, t: Tensor):
    _check(t.dtype == torch.int32, f"sparseticket: {name} must be int32, got {t.dtype}")
    _check_dim(name, t, 1)


def _check_same(name: str, t: Tensor, ref_name: str, ref: Tensor):
    _check(t.device == ref.device, f"sparseticket: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_bool(name: str, t: Tensor):
    _check(t.dtype == torch.bool, f"sparseticket: {name} must be a torch.bool mask, got {t.dtype}")


def check_csr(values: Tensor, crow: Tensor, col: Tensor, dtype_of: str, dtype: torch.dtype, device_ref: Tensor):
    _check_dim("values", values, 1)
    _check(values.dtype == dtype, f"sparseticket: values has dtype {values.dtype} but {dtype_of} has {dtype}")
    _check_index("crow", crow)
    _check_index("col", col)
    _check(crow.numel() >= 1, "sparseticket: crow must have O + 1 >= 1 entries")
    _check(col.numel() == values.numel(), f"sparseticket: col has {col.numel()} entries but values has {values.numel()}")
    for n, t in (("values", values), ("crow", crow), ("col", col)):
        _check_same(n, t, dtype_of, device_ref)


def check_spmm(x, values, crow, col, bias):
    _check_float("x", x)
    _check_dim("x", x, 2)
    check_csr(values, crow, col, "x", x.dtype, x)
    O = crow.shape[0] - 1
    if bias is not None:
        _check_dim("bias", bias, 1)
        _check(bias.shape[0] == O, f"sparseticket: bias has {bias.shape[0]} entries, expected out_features={O}")
        _check(bias.dtype == x.dtype, f"sparseticket: bias has dtype {bias.dtype} but x has {x.dtype}")
        _check_same("bias", bias, "x", x)
    return O


def check_sparse_linear_in(x, ccol):
    _check_index("ccol", ccol)
    _check(x.shape[1] == ccol.shape[0] - 1,
           f"sparseticket: x has {x.shape[1]} features but the ticket expects in_features={ccol.shape[0] - 1}")


def check_active(active: Optional[Tensor], n: int, ref: Tensor, ref_name: str = "x"):
    if active is None:
        return
    _check_bool("active", active)
    _check_dim("active", active, 1)
    _check(active.shape[0] == n, f"sparseticket: active has {active.shape[0]} entries, expected out_features={n}")
    _check_same("active", active, ref_name, ref)


def check_spmm_t(gy, values, ccol, row, perm):
    _check_float("gy", gy)
    _check_dim("gy", gy, 2)
    _check_dim("values", values, 1)
    _check(values.dtype == gy.dtype, f"sparseticket: values has dtype {values.dtype} but gy has {gy.dtype}")
    for n, t in (("ccol", ccol), ("row", row), ("perm", perm)):
        _check_index(n, t)
        _check_same(n, t, "gy", gy)
    _check_same("values", values, "gy", gy)
    _check(ccol.numel() >= 1, "sparseticket: ccol must have I + 1 >= 1 entries")
    _check(row.numel() == values.numel(), f"sparseticket: row has {row.numel()} entries but values has {values.numel()}")
    _check(perm.numel() == values.numel(), f"sparseticket: perm has {perm.numel()} entries but values has {values.numel()}")
    return ccol.shape[0] - 1


def check_sddmm(gy, x, crow, col, active):
    _check_float("gy", gy)
    _check_dim("gy", gy, 2)
    _check_float("x", x)
    _check_dim("x", x, 2)
    _check(gy.dtype == x.dtype, f"sparseticket: gy has dtype {gy.dtype} but x has {x.dtype}")
    _check_same("x", x, "gy", gy)
    _check(gy.shape[0] == x.shape[0], f"sparseticket: gy has batch {gy.shape[0]} but x has batch {x.shape[0]}")
    _check_index("crow", crow)
    _check_index("col", col)
    _check_same("crow", crow, "gy", gy)
    _check_same("col", col, "gy", gy)
    O = crow.shape[0] - 1
    _check(gy.shape[1] == O, f"sparseticket: gy has {gy.shape[1]} columns but crow describes {O} rows")
    check_active(active, O, gy, "gy")


def check_row_masked_grad_weight(gy, x, active):
    _check_float("gy", gy)
    _check_dim("gy", gy, 2)
    _check_float("x", x)
    _check_dim("x", x, 2)
    _check(gy.dtype == x.dtype, f"sparseticket: gy has dtype {gy.dtype} but x has {x.dtype}")
    _check_same("x", x, "gy", gy)
    _check(gy.shape[0] == x.shape[0], f"sparseticket: gy has batch {gy.shape[0]} but x has batch {x.shape[0]}")
    check_active(active, gy.shape[1], gy, "gy")


def check_masked_bias_grad(gy, active):
    _check_float("gy", gy)
    _check(gy.dim() >= 2, f"sparseticket: gy must have at least 2 dims (batch, out_features, ...), got shape "
           f"{tuple(gy.shape)}")
    check_active(active, gy.shape[1], gy, "gy")


def check_neq_linear(x, weight, bias, active):
    _check_float("x", x)
    _check_dim("x", x, 2)
    _check_dim("weight", weight, 2)
    _check(weight.dtype == x.dtype, f"sparseticket: weight has dtype {weight.dtype} but x has {x.dtype}")
    _check_same("weight", weight, "x", x)
    _check(weight.shape[1] == x.shape[1], f"sparseticket: weight has in_features {weight.shape[1]} but x has {x.shape[1]}")
    O = weight.shape[0]
    if bias is not None:
        _check_dim("bias", bias, 1)
        _check(bias.shape[0] == O, f"sparseticket: bias has {bias.shape[0]} entries, expected out_features={O}")
        _check(bias.dtype == x.dtype, f"sparseticket: bias has dtype {bias.dtype} but x has {x.dtype}")
        _check_same("bias", bias, "x", x)
    check_active(active, O, x)
    return O


def check_masked_sgd(params, grads, bufs, keeps, actives, row_ptrs, fresh, momentum):
    n = len(params)
    _check(len(fresh) == n, f"sparseticket: masked_sgd_: fresh has {len(fresh)} entries but params has {n}")
    states = {"momentum_buffers": bufs} if momentum != 0 else {}
    check_masked_update("masked_sgd_", params, grads, states, keeps, actives, row_ptrs)


def check_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, keeps, actives, row_ptrs, steps,
                       amsgrad):
    n = len(params)
    _check(len(steps) == n, f"sparseticket: masked_adamw_: steps has {len(steps)} entries but params has {n}")
    for j, st in enumerate(steps):
        _check(st >= 1, f"sparseticket: masked_adamw_: steps[{j}] is {st}; it must be >= 1 (the count after this step)")
    states = {"exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    if amsgrad:
        states["max_exp_avg_sqs"] = max_exp_avg_sqs
    check_masked_update("masked_adamw_", params, grads, states, keeps, actives, row_ptrs)


def check_masked_update(op, params, grads, states, keeps, actives, row_ptrs):
    n = len(params)
    for name, seq in (("grads", grads), ("keep_masks", keeps), ("active_masks", actives), ("row_ptrs", row_ptrs),
                      *states.items()):
        _check(len(seq) == n, f"sparseticket: {op}: {name} has {len(seq)} entries but params has {n}")
    for j, p in enumerate(params):
        _check_float(f"params[{j}]", p)
        g = grads[j]
        _check(g.shape == p.shape, f"sparseticket: grads[{j}] has shape {tuple(g.shape)} but params[{j}] has {tuple(p.shape)}")
        _check(g.dtype == p.dtype, f"sparseticket: grads[{j}] has dtype {g.dtype} but params[{j}] has {p.dtype}")
        _check_same(f"grads[{j}]", g, f"params[{j}]", p)
        for sname, seq in states.items():
            b = seq[j]
            _check(b.shape == p.shape, f"sparseticket: {sname}[{j}] has shape {tuple(b.shape)} but params[{j}] has {tuple(p.shape)}")
            _check(b.dtype == p.dtype, f"sparseticket: {sname}[{j}] has dtype {b.dtype} but params[{j}] has {p.dtype}")
            _check_same(f"{sname}[{j}]", b, f"params[{j}]", p)
        k = keeps[j]
        if k is not None:
            _check_bool(f"keep_masks[{j}]", k)
            _check(k.shape == p.shape, f"sparseticket: keep_masks[{j}] has shape {tuple(k.shape)} but params[{j}] has {tuple(p.shape)}")
            _check_same(f"keep_masks[{j}]", k, f"params[{j}]", p)
        a = actives[j]
        rp = row_ptrs[j]
        if rp is not None:
            _check_index(f"row_ptrs[{j}]", rp)
            _check_same(f"row_ptrs[{j}]", rp, f"params[{j}]", p)
            _check(p.dim() == 1, f"sparseticket: params[{j}] has row_ptrs so must be 1-D compact values, got shape {tuple(p.shape)}")
        if a is not None:
            _check_bool(f"active_masks[{j}]", a)
            _check_same(f"active_masks[{j}]", a, f"params[{j}]", p)
            if rp is not None:
                _check(a.dim() == 1 and a.shape[0] == rp.shape[0] - 1,
                       f"sparseticket: active_masks[{j}] has shape {tuple(a.shape)} but row_ptrs[{j}] describes {rp.shape[0] - 1} rows")
            else:
                _check(a.shape == p.shape or (a.dim() == 1 and p.dim() >= 1 and a.shape[0] == p.shape[0]),
                       f"sparseticket: active_masks[{j}] has shape {tuple(a.shape)}; expected {tuple(p.shape)} (elements) "
                       f"or [{p.shape[0] if p.dim() else 1}] (rows) for params[{j}]")


def check_dense_to_ticket(weight, mask):
    _check_float("weight", weight)
    _check_dim("weight", weight, 2)
    _check_bool("mask", mask)
    _check(mask.shape == weight.shape, f"sparseticket: mask has shape {tuple(mask.shape)} but weight has {tuple(weight.shape)}")
    _check_same("mask", mask, "weight", weight)


def _check_conv_options(kernel_size, stride, padding, dilation):
    for name, v, lo in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0),
                        ("dilation", dilation, 1)):
        _check(len(v) == 2 and all(int(a) >= lo for a in v),
               f"sparseticket: {name} must be two integers >= {lo}, got {list(v)}")


def conv_out_size(h, w, kernel_size, stride, padding, dilation):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def _check_conv_ticket_cols(n_cols, C, kernel_size):
    K = kernel_size[0] * kernel_size[1]
    _check(n_cols == K * C, f"sparseticket: the ticket has {n_cols} columns but kernel_size {list(kernel_size)} "
           f"and {C} input channels need kh*kw*C={K * C}")


def check_sparse_conv2d(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding, dilation):
    _check_float("x", x)
    _check_dim("x", x, 4)
    _check_conv_options(kernel_size, stride, padding, dilation)
    check_csr(values, crow, col, "x", x.dtype, x)
    O = crow.shape[0] - 1
    if bias is not None:
        _check_dim("bias", bias, 1)
        _check(bias.shape[0] == O, f"sparseticket: bias has {bias.shape[0]} entries, expected out_channels={O}")
        _check(bias.dtype == x.dtype, f"sparseticket: bias has dtype {bias.dtype} but x has {x.dtype}")
        _check_same("bias", bias, "x", x)
    check_active(active, O, x)
    for n, t in (("ccol", ccol), ("row", row), ("perm", perm)):
        _check_index(n, t)
        _check_same(n, t, "x", x)
    _check(row.numel() == values.numel(), f"sparseticket: row has {row.numel()} entries but values has {values.numel()}")
    _check(perm.numel() == values.numel(), f"sparseticket: perm has {perm.numel()} entries but values has {values.numel()}")
    _check_conv_ticket_cols(ccol.shape[0] - 1, x.shape[1], kernel_size)
    oh, ow = conv_out_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    _check(oh > 0 and ow > 0, f"sparseticket: x has spatial size {tuple(x.shape[2:])}, smaller than the dilated kernel "
           f"after padding")
    return O, oh, ow


def check_sparse_conv2d_grad_input(gy, values, crow, col, input_size, kernel_size, stride, padding, dilation):
    _check_float("gy", gy)
    _check_dim("gy", gy, 4)
    _check_conv_options(kernel_size, stride, padding, dilation)
    _check(len(input_size) == 4, f"sparseticket: input_size must be [N, C, H, W], got {list(input_size)}")
    check_csr(values, crow, col, "gy", gy.dtype, gy)
    N, C, H, W = input_size
    O = crow.shape[0] - 1
    _check(gy.shape[0] == N and gy.shape[1] == O,
           f"sparseticket: gy has shape {tuple(gy.shape)} but input_size {list(input_size)} and the ticket's {O} "
           f"output channels need [{N}, {O}, oh, ow]")
    oh, ow = conv_out_size(H, W, kernel_size, stride, padding, dilation)
    _check(gy.shape[2] == oh and gy.shape[3] == ow,
           f"sparseticket: gy has spatial size {tuple(gy.shape[2:])} but the conv of an input of {(H, W)} gives {(oh, ow)}")


def check_sparse_conv2d_grad_weight(gy, x, ccol, row, perm, active, kernel_size, stride, padding, dilation):
    _check_float("gy", gy)
    _check_dim("gy", gy, 4)
    _check_float("x", x)
    _check_dim("x", x, 4)
    _check(gy.dtype == x.dtype, f"sparseticket: gy has dtype {gy.dtype} but x has {x.dtype}")
    _check_same("x", x, "gy", gy)
    _check_conv_options(kernel_size, stride, padding, dilation)
    for n, t in (("ccol", ccol), ("row", row), ("perm", perm)):
        _check_index(n, t)
        _check_same(n, t, "gy", gy)
    _check(perm.numel() == row.numel(), f"sparseticket: perm has {perm.numel()} entries but row has {row.numel()}")
    _check_conv_ticket_cols(ccol.shape[0] - 1, x.shape[1], kernel_size)
    _check(gy.shape[0] == x.shape[0], f"sparseticket: gy has batch {gy.shape[0]} but x has batch {x.shape[0]}")
    oh, ow = conv_out_size(x.shape[2], x.shape[3], kernel_size, stride, padding, dilation)
    _check(gy.shape[2] == oh and gy.shape[3] == ow,
           f"sparseticket: gy has spatial size {tuple(gy.shape[2:])} but the conv of x ({tuple(x.shape[2:])}) gives {(oh, ow)}")
    check_active(active, gy.shape[1], gy, "gy")


# ----------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("sparseticket::sparse_linear")
@torch.library.register_fake("sparseticket::sparse_linear_relu")
def _(x, values, crow, col, ccol, row, perm, bias, active):
    O = check_spmm(x, values, crow, col, bias)
    check_active(active, O, x)
    check_sparse_linear_in(x, ccol)
    return x.new_empty((x.shape[0], O))


def check_sparse_linear_backward(gy, y, x, values, crow, col, ccol, row, perm, active):
    """The checks of sddmm and spmm_t over the shared gy, plus y's and x's agreement with them.
    Returns in_features."""
    if y is not None:
        _check(y.shape == gy.shape, f"sparseticket: y has shape {tuple(y.shape)} but gy has shape {tuple(gy.shape)}")
        _check(y.dtype == gy.dtype, f"sparseticket: y has dtype {y.dtype} but gy has {gy.dtype}")
        _check_same("y", y, "gy", gy)
    check_sddmm(gy, x, crow, col, active)
    _check(col.numel() == values.numel(), f"sparseticket: col has {col.numel()} entries but values has {values.numel()}")
    I = check_spmm_t(gy, values, ccol, row, perm)
    _check(x.shape[1] == I, f"sparseticket: x has {x.shape[1]} features but the ticket expects in_features={I}")
    return I


@torch.library.register_fake("sparseticket::sparse_linear_backward")
def _(gy, y, x, values, crow, col, ccol, row, perm, active, input_grad):
    I = check_sparse_linear_backward(gy, y, x, values, crow, col, ccol, row, perm, active)
    gx = gy.new_empty((gy.shape[0] if input_grad else 0, I))
    return gx, gy.new_empty((values.shape[0],)), gy.new_empty((gy.shape[1],))


@torch.library.register_fake("sparseticket::neq_linear")
def _(x, weight, bias, active):
    O = check_neq_linear(x, weight, bias, active)
    return x.new_empty((x.shape[0], O))


@torch.library.register_fake("sparseticket::spmm")
def _(x, values, crow, col, bias):
    O = check_spmm(x, values, crow, col, bias)
    return x.new_empty((x.shape[0], O))


@torch.library.register_fake("sparseticket::spmm_t")
def _(gy, values, ccol, row, perm):
    I = check_spmm_t(gy, values, ccol, row, perm)
    return gy.new_empty((gy.shape[0], I))


@torch.library.register_fake("sparseticket::sddmm")
def _(gy, x, crow, col, active):
    check_sddmm(gy, x, crow, col, active)
    return gy.new_empty((col.shape[0],))


@torch.library.register_fake("sparseticket::row_masked_grad_weight")
def _(gy, x, active):
    check_row_masked_grad_weight(gy, x, active)
    return gy.new_empty((gy.shape[1], x.shape[1]))


@torch.library.register_fake("sparseticket::masked_bias_grad")
def _(gy, active):
    check_masked_bias_grad(gy, active)
    return gy.new_empty((gy.shape[1],))


@torch.library.register_fake("sparseticket::masked_sgd_")
def _(params, grads, momentum_buffers, keep_masks, active_masks, row_ptrs, fresh, lr, momentum, dampening,
      weight_decay, nesterov, maximize):
    check_masked_sgd(params, grads, momentum_buffers, keep_masks, active_masks, row_ptrs, fresh, momentum)
    return None


@torch.library.register_fake("sparseticket::masked_adamw_")
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, keep_masks, active_masks, row_ptrs, steps, lr, beta1,
      beta2, eps, weight_decay, amsgrad, maximize):
    check_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, keep_masks, active_masks, row_ptrs,
                       steps, amsgrad)
    return None


@torch.library.register_fake("sparseticket::dense_to_ticket")
def _(weight, mask):
    check_dense_to_ticket(weight, mask)
    nnz = torch.library.get_ctx().new_dynamic_size()
    O = weight.shape[0]
    return (weight.new_empty((nnz,)), weight.new_empty((O + 1,), dtype=torch.int32),
            weight.new_empty((nnz,), dtype=torch.int32))


@torch.library.register_fake("sparseticket::ticket_transpose")
def _(crow, col, n_cols):
    _check_index("crow", crow)
    _check_index("col", col)
    _check_same("col", col, "crow", crow)
    nnz = col.shape[0]
    return (col.new_empty((n_cols + 1,)), col.new_empty((nnz,)), col.new_empty((nnz,)))


@torch.library.register_fake("sparseticket::ticket_to_dense")
def _(values, crow, col, n_cols):
    _check_index("crow", crow)
    _check_index("col", col)
    _check_same("crow", crow, "values", values)
    _check_same("col", col, "values", values)
    return values.new_empty((crow.shape[0] - 1, n_cols))


def check_bitmap_args(crow, bits):
    _check_index("crow", crow)
    _check(bits.dtype == torch.int64, f"sparseticket: bits must be int64, got {bits.dtype}")
    _check_dim("bits", bits, 2)
    _check_same("bits", bits, "crow", crow)


@torch.library.register_fake("sparseticket::ticket_bitmap")
def _(crow, col, n_cols):
    _check_index("crow", crow)
    _check_index("col", col)
    _check_same("col", col, "crow", crow)
    return crow.new_empty((crow.shape[0] - 1, (n_cols + 63) // 64), dtype=torch.int64)


@torch.library.register_fake("sparseticket::ticket_expand")
def _(values, crow, bits, n_cols):
    _check_float("values", values)
    _check_dim("values", values, 1)
    check_bitmap_args(crow, bits)
    _check_same("crow", crow, "values", values)
    return values.new_empty((crow.shape[0] - 1, n_cols))


@torch.library.register_fake("sparseticket::ticket_compress")
def _(dense, crow, bits, nnz):
    _check_float("dense", dense)
    _check_dim("dense", dense, 2)
    check_bitmap_args(crow, bits)
    _check_same("crow", crow, "dense", dense)
    return dense.new_empty((nnz,))
@torch.library.register_fake("sparseticket::sparse_conv2d")
@torch.library.register_fake("sparseticket::sparse_conv2d_relu")
def _(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding, dilation):
    O, oh, ow = check_sparse_conv2d(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding,
                                    dilation)
    return x.new_empty((x.shape[0], O, oh, ow))


@torch.library.register_fake("sparseticket::sparse_conv2d_grad_input")
def _(gy, values, crow, col, input_size, kernel_size, stride, padding, dilation):
    check_sparse_conv2d_grad_input(gy, values, crow, col, input_size, kernel_size, stride, padding, dilation)
    return gy.new_empty(tuple(input_size))


@torch.library.register_fake("sparseticket::sparse_conv2d_grad_weight")
def _(gy, x, ccol, row, perm, active, kernel_size, stride, padding, dilation):
    check_sparse_conv2d_grad_weight(gy, x, ccol, row, perm, active, kernel_size, stride, padding, dilation)
    return gy.new_empty((row.shape[0],))


def check_max_pool2x2(x):
    _check_float("x", x)
    _check_dim("x", x, 4)
    _check(x.shape[2] >= 2 and x.shape[3] >= 2,
           f"sparseticket: max_pool2x2: x has spatial size ({x.shape[2]}, {x.shape[3]}), smaller than the 2x2 window")


def check_max_pool2x2_backward(gy, where, input_size):
    _check_float("gy", gy)
    _check_dim("gy", gy, 4)
    _check(where.dtype == torch.uint8, f"sparseticket: where must be uint8, got {where.dtype}")
    _check(where.shape == gy.shape, f"sparseticket: where has shape {tuple(where.shape)} but gy has {tuple(gy.shape)}")
    _check(len(input_size) == 4, f"sparseticket: input_size must have 4 entries, got {len(input_size)}")
    N, C, H, W = input_size
    _check(H >= 2 and W >= 2 and tuple(gy.shape) == (N, C, H // 2, W // 2),
           f"sparseticket: gy has shape {tuple(gy.shape)} but a 2x2 pool of input_size {tuple(input_size)} gives "
           f"({N}, {C}, {H // 2}, {W // 2})")


@torch.library.register_fake("sparseticket::max_pool2x2")
def _(x):
    check_max_pool2x2(x)
    N, C, H, W = x.shape
    return x.new_empty((N, C, H // 2, W // 2)), x.new_empty((N, C, H // 2, W // 2), dtype=torch.uint8)


@torch.library.register_fake("sparseticket::max_pool2x2_backward")
def _(gy, where, input_size):
    check_max_pool2x2_backward(gy, where, input_size)
    return gy.new_empty(tuple(input_size))
