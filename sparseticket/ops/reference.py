"""Pure-PyTorch references: the definition of what every sparseticket op computes.

Every backend (C++ CPU, Triton, CUDA) is tested against these functions, and the
benchmarks use them as the "what" next to each kernel's "how". They favour clarity
over speed, but stay vectorised so tests over realistic shapes finish quickly.

Ticket format (see ``sparseticket.ticket.Ticket``): a weight W of shape [O, I] with
``nnz`` kept entries is stored as CSR

* ``values``: [nnz]   kept weights, row-major order (row o, then column i ascending)
* ``crow``:   [O + 1] int32 row pointers; row o owns ``values[crow[o]:crow[o+1]]``
* ``col``:    [nnz]   int32 column index of each kept weight

plus its transpose, built once per mask so the input gradient never scatters:

* ``ccol``:   [I + 1] int32 column pointers
* ``row``:    [nnz]   int32 row index of each entry in column-major order
* ``perm``:   [nnz]   int32 position in ``values`` of each column-major entry

Masks are ``torch.bool``; ``active`` masks say which neurons (rows) are updated,
False meaning *frozen* (NEq); ``keep`` masks say which weights survive pruning,
False meaning *pruned* (held at exactly zero).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

# ----------------------------------------------------------------------------- ticket


def reference_dense_to_ticket(weight: Tensor, mask: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """weight: [O, I], mask: [O, I] bool -> (values [nnz], crow [O+1] int32, col [nnz] int32)."""
    O, I = weight.shape
    rows, cols = torch.nonzero(mask, as_tuple=True)  # row-major order
    counts = torch.bincount(rows, minlength=O) if rows.numel() else torch.zeros(O, dtype=torch.long, device=weight.device)
    crow = torch.zeros(O + 1, dtype=torch.int64, device=weight.device)
    crow[1:] = torch.cumsum(counts, 0)
    values = weight[rows, cols].contiguous()
    return values, crow.to(torch.int32), cols.to(torch.int32)


def reference_ticket_transpose(crow: Tensor, col: Tensor, n_cols: int) -> Tuple[Tensor, Tensor, Tensor]:
    """CSR structure of W [O, n_cols] -> CSC structure (ccol [n_cols+1], row [nnz], perm [nnz])."""
    O = crow.numel() - 1
    nnz = col.numel()
    rows = torch.repeat_interleave(torch.arange(O, device=col.device), (crow[1:] - crow[:-1]).long())
    # stable sort by column keeps rows ascending inside each column
    key = col.long() * max(O, 1) + rows
    perm = torch.argsort(key, stable=True)
    counts = torch.bincount(col.long(), minlength=n_cols) if nnz else torch.zeros(n_cols, dtype=torch.long, device=col.device)
    ccol = torch.zeros(n_cols + 1, dtype=torch.int64, device=col.device)
    ccol[1:] = torch.cumsum(counts, 0)
    return ccol.to(torch.int32), rows[perm].to(torch.int32), perm.to(torch.int32)


def reference_ticket_to_dense(values: Tensor, crow: Tensor, col: Tensor, n_cols: int) -> Tensor:
    """Ticket -> dense W [O, n_cols] with zeros at pruned positions."""
    O = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(O, device=col.device), (crow[1:] - crow[:-1]).long())
    out = torch.zeros(O, n_cols, dtype=values.dtype, device=values.device)
    out[rows, col.long()] = values
    return out


def reference_ticket_bitmap(crow: Tensor, col: Tensor, n_cols: int) -> Tensor:
    """int64 [O, ceil(n_cols / 64)]: bit c % 64 of word c // 64 of row r set iff (r, c) is kept."""
    O, words = crow.numel() - 1, (n_cols + 63) // 64
    mask = reference_ticket_to_dense(torch.ones(col.numel(), dtype=torch.float32, device=col.device), crow, col,
                                     n_cols) != 0
    return pack_bits(mask, words)


def pack_bits(mask: Tensor, words: int) -> Tensor:
    """bool [O, K] -> int64 [O, words] (little-endian bits within each 64-bit word)."""
    O, K = mask.shape
    padded = torch.zeros(O, words * 64, dtype=torch.int64, device=mask.device)
    padded[:, :K] = mask.long()
    shifts = torch.arange(64, device=mask.device, dtype=torch.int64)
    # bit 63 overflows int64 arithmetic into the sign bit, which is the two's complement we want
    return (padded.view(O, words, 64) << shifts).sum(-1)


def unpack_bits(bits: Tensor, n_cols: int) -> Tensor:
    """int64 [O, words] -> bool [O, n_cols]."""
    shifts = torch.arange(64, device=bits.device, dtype=torch.int64)
    return ((bits.unsqueeze(-1) >> shifts) & 1).bool().view(bits.shape[0], -1)[:, :n_cols]


def reference_ticket_expand(values: Tensor, crow: Tensor, bits: Tensor, n_cols: int) -> Tensor:
    """Compact values -> dense [O, n_cols] through the bitmap (values in row-major order)."""
    mask = unpack_bits(bits, n_cols)
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    out[mask] = values
    return out


def reference_ticket_compress(dense: Tensor, crow: Tensor, bits: Tensor, nnz: int) -> Tensor:
    """The kept entries of dense [O, n_cols], row-major: the inverse of ticket_expand."""
    return dense[unpack_bits(bits, dense.shape[1])]


# ----------------------------------------------------------------------------- matmuls


def reference_spmm(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y = x Wᵀ + bias.  x: [B, I] -> y: [B, O] (contiguous)."""
    W = reference_ticket_to_dense(values, crow, col, x.shape[1])
    y = x @ W.t()
    if bias is not None:
        y = y + bias
    return y.contiguous()


def reference_spmm_t(gy: Tensor, values: Tensor, ccol: Tensor, row: Tensor, perm: Tensor) -> Tensor:
    """gx = gy W.  gy: [B, O] -> gx: [B, I], using the transposed (CSC) structure.

    O is not recoverable from the CSC arrays alone, so it is read from gy.
    """
    O, I = gy.shape[1], ccol.numel() - 1
    cols = torch.repeat_interleave(torch.arange(I, device=row.device), (ccol[1:] - ccol[:-1]).long())
    W = torch.zeros(O, I, dtype=values.dtype, device=values.device)
    W[row.long(), cols] = values[perm.long()]
    return (gy @ W).contiguous()


def reference_sddmm(gy: Tensor, x: Tensor, crow: Tensor, col: Tensor, active: Optional[Tensor]) -> Tensor:
    """Kept-weight gradient: g[k] = Σ_b gy[b, row_k] · x[b, col_k].  -> [nnz].

    Rows with ``active[o] == False`` (frozen neurons) are not computed; their entries are 0.
    """
    O = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(O, device=col.device), (crow[1:] - crow[:-1]).long())
    # the dense product sampled at the kept positions ([O, I] memory, not [B, nnz])
    g = (gy.t() @ x)[rows, col.long()]
    if active is not None:
        g = torch.where(active[rows], g, torch.zeros_like(g))
    return g.contiguous()


def reference_sparse_linear_backward(gy: Tensor, y: Optional[Tensor], x: Tensor, values: Tensor, crow: Tensor,
                                     col: Tensor, ccol: Tensor, row: Tensor, perm: Tensor, active: Optional[Tensor],
                                     input_grad: bool):
    """(gx, gvalues, gbias) of sparse_linear, or of sparse_linear_relu when its output y is
    given (gy is then zeroed where y <= 0, as ReLU's backward does). gx is gy W, or an
    empty [0, I] when not ``input_grad``; gvalues and gbias are 0 on frozen rows."""
    if y is not None:  # threshold_backward(gy, y, 0): gy passes where y > 0 or y is NaN
        gy = torch.where(y <= 0, torch.zeros_like(gy), gy)
    I = ccol.numel() - 1
    gx = reference_spmm_t(gy, values, ccol, row, perm) if input_grad else gy.new_empty((0, I))
    return gx, reference_sddmm(gy, x, crow, col, active), reference_masked_bias_grad(gy, active)


def reference_masked_bias_grad(gy: Tensor, active: Optional[Tensor]) -> Tensor:
    """Bias gradient [O]: gy ([B, O] or [N, O, H, W]) summed over every dim but 1; frozen
    neurons' entries are exactly 0, whatever the sum (inf, NaN) would be."""
    gb = gy.sum([d for d in range(gy.dim()) if d != 1])
    if active is not None:
        gb = torch.where(active, gb, torch.zeros_like(gb))
    return gb.contiguous()


def reference_row_masked_grad_weight(gy: Tensor, x: Tensor, active: Optional[Tensor]) -> Tensor:
    """Dense weight gradient gW = gyᵀ x: [O, I]; rows of frozen neurons are 0 (never computed)."""
    gw = gy.t() @ x
    if active is not None:
        gw = gw * active[:, None].to(gw.dtype)
        gw[~active] = 0  # also clears any NaN/inf that the multiply would keep
    return gw.contiguous()


def reference_sparse_linear(x, values, crow, col, ccol, row, perm, bias, active):
    """Autograd-carrying ticket linear: forward of ``reference_spmm``; ``active`` only affects backward."""
    return reference_spmm(x, values, crow, col, bias)


def reference_sparse_linear_relu(x, values, crow, col, ccol, row, perm, bias, active):
    """relu(reference_sparse_linear(...))."""
    return torch.relu(reference_spmm(x, values, crow, col, bias))


def reference_neq_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], active: Optional[Tensor]) -> Tensor:
    """Dense linear whose backward skips the weight gradient of frozen rows."""
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y.contiguous()


# ----------------------------------------------------------------------------- optimizer


def _active_elements(p: Tensor, active: Optional[Tensor], row_ptr: Optional[Tensor]) -> Optional[Tensor]:
    """Expand an active mask (element, per-row, or per-CSR-row) to p's shape."""
    if active is None:
        return None
    if row_ptr is not None:  # p is compact ticket values, active is per CSR row
        counts = (row_ptr[1:] - row_ptr[:-1]).long()
        return torch.repeat_interleave(active, counts)
    if active.shape == p.shape:
        return active
    # per-row mask over dim 0
    return active.reshape((-1,) + (1,) * (p.dim() - 1)).expand_as(p)


def reference_masked_sgd_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    keep_masks: Sequence[Optional[Tensor]],
    active_masks: Sequence[Optional[Tensor]],
    row_ptrs: Sequence[Optional[Tensor]],
    fresh: Sequence[bool],
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> None:
    """One step of torch.optim.SGD over ``params`` in place, with masks.

    For each parameter p (with gradient g and, if momentum != 0, buffer buf):
      d = -g if maximize else g;  d += weight_decay * p
      buf = d if fresh else momentum * buf + (1 - dampening) * d
      d = d + momentum * buf if nesterov else buf
      p -= lr * d
    then at pruned positions (keep == False) p = 0 and buf = 0; at frozen positions
    (active == False) p and buf keep their old bits. ``fresh[j]`` marks a buffer that
    torch.optim.SGD would create on this step (its old content is ignored).
    """
    for j, p in enumerate(params):
        g = grads[j]
        d = -g if maximize else g
        if weight_decay != 0:
            d = d.add(p, alpha=weight_decay)
        buf_new = None
        if momentum != 0:
            buf = momentum_buffers[j]
            if fresh[j]:
                buf_new = d.clone()
            else:
                buf_new = buf.mul(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf_new, alpha=momentum) if nesterov else buf_new
        p_new = p.add(d, alpha=-lr)
        keep = keep_masks[j]
        if keep is not None:
            p_new = torch.where(keep, p_new, torch.zeros_like(p_new))
            if buf_new is not None:
                buf_new = torch.where(keep, buf_new, torch.zeros_like(buf_new))
        act = _active_elements(p, active_masks[j], row_ptrs[j])
        if act is not None:
            p_new = torch.where(act, p_new, p)
            if buf_new is not None:
                buf_new = torch.where(act, buf_new, momentum_buffers[j])
        p.copy_(p_new)
        if buf_new is not None:
            momentum_buffers[j].copy_(buf_new)


def reference_masked_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    keep_masks: Sequence[Optional[Tensor]],
    active_masks: Sequence[Optional[Tensor]],
    row_ptrs: Sequence[Optional[Tensor]],
    steps: Sequence[float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """One step of torch.optim.AdamW over ``params`` in place, with masks.

    ``steps[j]`` is parameter j's step count *after* this step (torch.optim's
    ``state['step']``), used for the bias corrections. For each parameter:
      g = -grad if maximize else grad;  p *= 1 - lr * weight_decay
      m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g²;  (amsgrad: vmax = max(vmax, v))
      p -= lr / (1 - beta1^step) * m / (sqrt(v or vmax) / sqrt(1 - beta2^step) + eps)
    Pruned positions (keep == False): p and all state 0. Frozen positions (active ==
    False): p and all state keep their bits.
    """
    for j, p in enumerate(params):
        g = -grads[j] if maximize else grads[j]
        step = float(steps[j])
        p_new = p.mul(1 - lr * weight_decay)
        m = exp_avgs[j].lerp(g, 1 - beta1)
        v = exp_avg_sqs[j].mul(beta2).addcmul_(g, g, value=1 - beta2)
        bc1 = 1 - beta1 ** step
        bc2_sqrt = math.sqrt(1 - beta2 ** step)
        vmax = None
        if amsgrad:
            vmax = torch.maximum(max_exp_avg_sqs[j], v)
            denom = (vmax.sqrt() / bc2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
        p_new = p_new.addcdiv(m, denom, value=-lr / bc1)
        news = [p_new, m, v] + ([vmax] if amsgrad else [])
        olds = [p, exp_avgs[j], exp_avg_sqs[j]] + ([max_exp_avg_sqs[j]] if amsgrad else [])
        keep = keep_masks[j]
        if keep is not None:
            news = [torch.where(keep, t, torch.zeros_like(t)) for t in news]
        act = _active_elements(p, active_masks[j], row_ptrs[j])
        if act is not None:
            news = [torch.where(act, t, o) for t, o in zip(news, olds)]
        for o, t in zip(olds, news):
            o.copy_(t)


# ----------------------------------------------------------------------------- direct sparse convolution
#
# A conv ticket is the [O, kh*kw*C] matrix whose column (i*kw + j)*C + c holds
# weight[o, c, i, j] (columns ordered (tap, channel), as SparseConv2d stores it), groups=1.


def _conv_dense_weight(values: Tensor, crow: Tensor, col: Tensor, C: int, kernel_size) -> Tensor:
    """Ticket -> dense conv weight [O, C, kh, kw]."""
    kh, kw = kernel_size
    O = crow.numel() - 1
    return reference_ticket_to_dense(values, crow, col, kh * kw * C).view(O, kh, kw, C).permute(0, 3, 1, 2)


def _csc_cols(ccol: Tensor) -> Tensor:
    n = ccol.numel() - 1
    return torch.repeat_interleave(torch.arange(n, device=ccol.device), (ccol[1:] - ccol[:-1]).long())


def reference_sparse_conv2d(x, values, crow, col, ccol, row, perm, bias, active, kernel_size, stride, padding,
                            dilation) -> Tensor:
    """y = conv2d(x, W, bias) for the ticket W.  x: [N, C, H, W] -> y: [N, O, oh, ow] (contiguous).

    ``ccol/row/perm`` and ``active`` are carried for backward (frozen channels only change
    the weight gradient)."""
    C, O = x.shape[1], crow.numel() - 1
    w = _conv_dense_weight(values, crow, col, C, kernel_size)
    if O == 0 or C == 0:  # F.conv2d rejects a weight with no output channels, miscounts with no inputs
        from ._library import conv_out_size
        y = x.new_zeros((x.shape[0], O) + tuple(conv_out_size(x.shape[2], x.shape[3], kernel_size, stride, padding,
                                                              dilation)))
        return y if bias is None else (y + bias.view(1, O, 1, 1)).contiguous()
    return torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation).contiguous()


def reference_sparse_conv2d_grad_input(gy, values, crow, col, input_size, kernel_size, stride, padding,
                                       dilation) -> Tensor:
    """gx = ∂(conv2d(x, W))/∂x applied to gy.  gy: [N, O, oh, ow] -> gx: ``input_size`` [N, C, H, W]."""
    C = int(input_size[1])
    w = _conv_dense_weight(values, crow, col, C, kernel_size)
    if gy.numel() == 0 or C == 0:
        return gy.new_zeros(tuple(input_size))
    return torch.nn.grad.conv2d_input(list(input_size), w, gy, stride, padding, dilation).contiguous()


def reference_sparse_conv2d_grad_weight(gy, x, ccol, row, perm, active, kernel_size, stride, padding,
                                        dilation) -> Tensor:
    """Kept-weight gradient, in the order of ``values``: g[perm[k]] = Σ_{n,p} gy[n, row_k, p] · patch(x)[n, p, col_k]
    for the k-th entry of the transposed (CSC) ticket. Output channels with ``active`` False get 0."""
    kh, kw = kernel_size
    O, C = gy.shape[1], x.shape[1]
    if gy.numel() == 0 or x.numel() == 0:
        return gy.new_zeros((row.numel(),))
    gw = torch.nn.grad.conv2d_weight(x, (O, C, kh, kw), gy, stride, padding, dilation)
    gw2d = gw.permute(0, 2, 3, 1).reshape(O, kh * kw * C)
    rows = row.long()
    g = gw2d[rows, _csc_cols(ccol)]
    if active is not None:
        g = torch.where(active[rows], g, torch.zeros_like(g))
    out = torch.empty_like(g)
    out[perm.long()] = g
    return out.contiguous()


# ----------------------------------------------------------------------------- pooling


def reference_max_pool2x2(x: Tensor) -> Tuple[Tensor, Tensor]:
    """2x2, stride-2 max-pool of x [N, C, H, W] -> (y [N, C, H//2, W//2], where uint8), as
    ``F.max_pool2d(x, 2)``: the same values and, for ties and NaNs, the same element kept
    (its index within the window, 2a + b for row 2r + a, column 2q + b, is ``where``)."""
    N, C, H, W = x.shape
    if x.numel() == 0:  # (aten refuses C = 0)
        return x.new_empty((N, C, H // 2, W // 2)), x.new_empty((N, C, H // 2, W // 2), dtype=torch.uint8)
    y, idx = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
    oh = torch.arange(H // 2, device=x.device).view(-1, 1)
    ow = torch.arange(W // 2, device=x.device).view(1, -1)
    where = (idx // W - 2 * oh) * 2 + (idx % W - 2 * ow)
    return y.contiguous(), where.to(torch.uint8).contiguous()


def _pool2x2_kept(where: Tensor, W: int) -> Tensor:
    """[N, C, n_out] flat index (h * W + w) of the element each window kept."""
    N, C, OH, OW = where.shape
    oh = torch.arange(OH, device=where.device).view(-1, 1)
    ow = torch.arange(OW, device=where.device).view(1, -1)
    w = where.long()
    return ((2 * oh + w // 2) * W + 2 * ow + w % 2).reshape(N, C, OH * OW)


def reference_max_pool2x2_backward(gy: Tensor, where: Tensor, input_size: Sequence[int]) -> Tensor:
    """gx [input_size]: gy at the element each window kept (``where``), +0 everywhere else
    (aten's zeros-then-add, so a -0 gradient also lands as +0)."""
    N, C, H, W = (int(s) for s in input_size)
    gx = gy.new_zeros((N, C, H * W))
    gx.scatter_add_(2, _pool2x2_kept(where, W), gy.reshape(N, C, (H // 2) * (W // 2)))
    return gx.view(N, C, H, W)


def reference_max_pool2x2_select(gx: Tensor, where: Tensor) -> Tensor:
    """The kept element of each window of gx [N, C, H, W] -> [N, C, H//2, W//2]: the adjoint
    of reference_max_pool2x2_backward (its gradient with respect to gy)."""
    N, C, H, W = gx.shape
    return gx.reshape(N, C, H * W).gather(2, _pool2x2_kept(where, W)).view(N, C, H // 2, W // 2)
