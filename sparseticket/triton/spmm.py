"""Ticket-weight forward and input gradient: row-split CSR × dense (Gale et al. 2020 style).

Both products have the same shape of work: every row r of a CSR matrix (values, ptr, idx)
combines the rows idx[k] of a dense operand D [n_cols, B]:

    out[b, r] = Σ_{k in ptr[r]..ptr[r+1]} values[k] · D[idx[k], b]   (+ bias[r])

* forward  ``triton_spmm``:   y  = x Wᵀ + b   with W's CSR,     D = xᵀ,  out = y  [B, O]
* backward ``triton_spmm_t``: gx = gy W       with W's CSC+perm, D = gyᵀ, out = gx [B, I]

One program computes one sparse row for a block of BLOCK_B batch entries; it walks the row
in chunks of BLOCK_K non-zeros, gathering a [BLOCK_K, BLOCK_B] tile of D per chunk (batch
contiguous, so each gathered feature row is a coalesced load). Rows are visited longest
first (row swizzle) and consecutive programs share a batch block so the gathered rows of D
are reused from L2.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._library import _check, _check_index, check_active, check_spmm, check_spmm_t
from ._common import (autotune_configs, check_index_range, feature_major, fp_fusion_kwargs, heavy_rows_first, nnz_bucket,
                      on_device_of, tl_dtype)

# (BLOCK_B, BLOCK_K, num_warps, num_stages). The accumulator is a BLOCK_K × BLOCK_B register
# tile (≤ 64 fp32 registers per thread in every config); short rows (very sparse tickets)
# favour small BLOCK_K, large batches favour wide BLOCK_B. Tuned per (rows, batch, row length).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_B": bb, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bb, bk, w, s in [
        (64, 32, 4, 2), (128, 32, 4, 2), (128, 16, 4, 3), (256, 16, 8, 2),
        (64, 64, 4, 2), (128, 64, 8, 2), (256, 32, 8, 2), (32, 32, 2, 2), (64, 16, 2, 3),
    ]
]
_INTERP_CONFIG = triton.Config({"BLOCK_B": 16, "BLOCK_K": 8}, num_warps=1)


@triton.autotune(configs=autotune_configs(_GPU_CONFIGS, _INTERP_CONFIG), key=["n_rows", "B", "row_len_bucket"])
@triton.jit
def _csr_dense_rowsplit_kernel(
    d_ptr, stride_d_row, stride_d_b,      # dense operand D[n_cols, B]
    val_ptr, ptr_ptr, idx_ptr,            # CSR of the sparse operand: [nnz], [n_rows+1], [nnz]
    order_ptr,                            # [n_rows] int32 order in which rows are visited
    bias_ptr,                             # [n_rows] or unused
    out_ptr, stride_out_b, stride_out_row,
    n_rows, B, nnz, n_cols, row_len_bucket,
    HAS_ORDER: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_b = pid // n_rows
    r = pid % n_rows
    if HAS_ORDER:
        row = tl.load(order_ptr + r)
    else:
        row = r
    start = tl.load(ptr_ptr + row)
    end = tl.load(ptr_ptr + row + 1)

    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    d_cols = offs_b.to(tl.int64) * stride_d_b

    # Accumulate the whole tile and reduce once after the loop: the loop body is then pure
    # loads and FMAs, with no cross-thread reduction per chunk.
    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=ACC)
    for k0 in range(start, end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = (ks < end) & (ks < nnz) & (ks >= 0)
        idx = tl.load(idx_ptr + ks, mask=mask_k, other=0)
        # never read outside D, even for a ticket built for a wider operand (see check_index_range)
        ok = mask_k & (idx >= 0) & (idx < n_cols)
        v = tl.load(val_ptr + ks, mask=ok, other=0.0).to(ACC)
        d = tl.load(d_ptr + idx.to(tl.int64)[:, None] * stride_d_row + d_cols[None, :],
                    mask=ok[:, None] & mask_b[None, :], other=0.0).to(ACC)
        acc += v[:, None] * d
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + row).to(ACC)
    out = out_ptr + offs_b.to(tl.int64) * stride_out_b + row.to(tl.int64) * stride_out_row
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=mask_b)


def _rowsplit(dense_t: Tensor, values: Tensor, ptr: Tensor, idx: Tensor, bias: Optional[Tensor], B: int,
              n_rows: int) -> Tensor:
    """out [B, n_rows] = rows of the CSR (values, ptr, idx) applied to dense_t [n_cols, B]."""
    # Written transposed ([n_rows, B], each program storing a contiguous batch run) and turned
    # around once at the end: one streaming copy instead of n_rows·B scattered 4-byte stores.
    out_t = torch.empty((n_rows, B), dtype=values.dtype, device=values.device)
    order = heavy_rows_first(ptr)

    def grid(meta):
        return (n_rows * triton.cdiv(B, meta["BLOCK_B"]),)

    with on_device_of(values):
        _csr_dense_rowsplit_kernel[grid](
            dense_t, dense_t.stride(0), dense_t.stride(1),
            values, ptr, idx, order, bias if bias is not None else values,
            out_t, out_t.stride(1), out_t.stride(0),
            n_rows, B, values.numel(), dense_t.shape[0], nnz_bucket(values.numel(), n_rows),
            HAS_ORDER=True, HAS_BIAS=bias is not None, ACC=tl_dtype(values.dtype),
            **fp_fusion_kwargs(True),
        )
    return out_t.t().contiguous()


def _empty_product(B: int, n_rows: int, like: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Result of a product whose sparse operand has no entries (100% sparsity) or no batch."""
    out = torch.zeros((B, n_rows), dtype=like.dtype, device=like.device)
    if bias is not None and B > 0:
        out += bias
    return out


def triton_spmm(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """y = x Wᵀ + bias for a ticket W [O, I].

    x: [B, I] float32/float64; values: [nnz]; crow: [O+1] int32; col: [nnz] int32;
    bias: [O] or None -> y: [B, O] contiguous. Same meaning as ``reference_spmm``.
    """
    O = check_spmm(x, values, crow, col, bias)
    check_index_range(crow, col, x.shape[1], "crow", "col", "x's feature dimension (x.size(1))")
    B = x.shape[0]
    if B == 0 or O == 0 or values.numel() == 0:
        return _empty_product(B, O, x, bias)
    bias = bias.contiguous() if bias is not None else None
    return _rowsplit(feature_major(x), values.contiguous(), crow.contiguous(), col.contiguous(), bias, B, O)


def triton_sparse_linear(x, values, crow, col, ccol, row, perm, bias, active):
    """Forward of ``sparseticket::sparse_linear``: ``triton_spmm``; the rest is for backward."""
    O = check_spmm(x, values, crow, col, bias)
    check_active(active, O, x)
    # the CSC side is only used by backward, but a ticket of the wrong width must fail here
    _check_index("ccol", ccol)
    _check(x.shape[1] == ccol.shape[0] - 1,
           f"sparseticket: x has {x.shape[1]} features but the ticket expects in_features={ccol.shape[0] - 1}")
    return triton_spmm(x, values, crow, col, bias)


def triton_spmm_t(gy: Tensor, values: Tensor, ccol: Tensor, row: Tensor, perm: Tensor) -> Tensor:
    """gx = gy W for a ticket W [O, I], through its CSC structure.

    gy: [B, O]; values: [nnz] (row-major order); ccol: [I+1]; row, perm: [nnz] int32
    -> gx: [B, I] contiguous. Same meaning as ``reference_spmm_t``.
    """
    I = check_spmm_t(gy, values, ccol, row, perm)
    check_index_range(ccol, row, gy.shape[1], "ccol", "row", "gy's feature dimension (gy.size(1))")
    B = gy.shape[0]
    if B == 0 or I == 0 or values.numel() == 0:
        return _empty_product(B, I, gy, None)
    # values in column-major order once per call (nnz elements), so the kernel's inner loop
    # has one indirection (row) instead of two (perm, then values)
    values_t = values.index_select(0, perm)
    return _rowsplit(feature_major(gy), values_t, ccol.contiguous(), row.contiguous(), None, B, I)
