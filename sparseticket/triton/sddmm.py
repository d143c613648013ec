"""Kept-weight gradient (SDDMM) with frozen-row skipping.

    g[k] = Σ_b gy[b, row_k] · x[b, col_k]     for every kept weight k of a ticket W [O, I]

Work is split over the non-zeros, not the rows: program p owns entries
[p·BLOCK_K, (p+1)·BLOCK_K) in CSR order, so every program has the same amount of work
however unevenly the non-zeros are spread over rows (no host-side maximum, no sync). Each
entry finds its row by a binary search in ``crow`` (a few cached loads). Entries of frozen
rows (``active[row] == False``) are never loaded or multiplied, and a block whose rows are
all frozen skips the batch loop entirely: with a fraction f of neurons frozen, roughly a
fraction f of the work disappears.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._library import check_sddmm
from ._common import (autotune_configs, check_index_range, feature_major, fp_fusion_kwargs, on_device_of, search_steps,
                      tl_dtype)

# (BLOCK_K, BLOCK_B, num_warps, num_stages): the batch loop is the long one (B up to ~8k),
# so wide batch tiles amortise the per-entry row search and index loads.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_K": bk, "BLOCK_B": bb}, num_warps=w, num_stages=s)
    for bk, bb, w, s in [
        (16, 128, 4, 3), (32, 64, 4, 3), (32, 128, 4, 2), (64, 64, 8, 2),
        (16, 256, 8, 2), (64, 32, 4, 3), (8, 256, 4, 3),
    ]
]
_INTERP_CONFIG = triton.Config({"BLOCK_K": 16, "BLOCK_B": 8}, num_warps=1)


@triton.autotune(configs=autotune_configs(_GPU_CONFIGS, _INTERP_CONFIG), key=["nnz", "B"])
@triton.jit
def _sddmm_kernel(
    g_ptr, stride_g_row, stride_g_b,     # gy seen as G[O, B]
    x_ptr, stride_x_col, stride_x_b,     # x  seen as X[I, B]
    crow_ptr, col_ptr, active_ptr, out_ptr,
    nnz, n_rows, n_cols, B, n_search,
    HAS_ACTIVE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    ks = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = ks < nnz

    # row of entry k: the last r with crow[r] <= k (empty rows repeat a crow value, and the
    # last of the repeats is the row that owns k). Invariant: crow[lo] <= k < crow[hi].
    lo = tl.zeros((BLOCK_K,), dtype=tl.int32)
    hi = tl.zeros((BLOCK_K,), dtype=tl.int32) + n_rows
    for _ in range(n_search):
        mid = (lo + hi) // 2
        go_right = tl.load(crow_ptr + mid, mask=mask_k, other=0) <= ks
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    rows = lo

    live = mask_k
    if HAS_ACTIVE:
        live = live & (tl.load(active_ptr + rows, mask=mask_k, other=0) != 0)
    cols = tl.load(col_ptr + ks, mask=live, other=0)
    live = live & (cols >= 0) & (cols < n_cols)  # never read outside x (see check_index_range)
    g_rows = rows.to(tl.int64)[:, None] * stride_g_row
    x_rows = cols.to(tl.int64)[:, None] * stride_x_col

    acc = tl.zeros((BLOCK_K, BLOCK_B), dtype=ACC)
    if tl.max(live.to(tl.int32), axis=0) > 0:
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            m = live[:, None] & (offs_b < B)[None, :]
            ob = offs_b.to(tl.int64)[None, :]
            gv = tl.load(g_ptr + g_rows + ob * stride_g_b, mask=m, other=0.0).to(ACC)
            xv = tl.load(x_ptr + x_rows + ob * stride_x_b, mask=m, other=0.0).to(ACC)
            acc += gv * xv
    # frozen entries were never loaded: their accumulators are exact zeros
    tl.store(out_ptr + ks, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=mask_k)


def triton_sddmm(gy: Tensor, x: Tensor, crow: Tensor, col: Tensor, active: Optional[Tensor] = None) -> Tensor:
    """Gradient of the kept weights of a ticket W [O, I].

    gy: [B, O]; x: [B, I]; crow: [O+1] int32; col: [nnz] int32; active: [O] bool or None
    -> g: [nnz] with g[k] = Σ_b gy[b, row_k] x[b, col_k], 0 for rows with active False.
    Same meaning as ``reference_sddmm``.
    """
    check_sddmm(gy, x, crow, col, active)
    check_index_range(crow, col, x.shape[1], "crow", "col", "x's feature dimension (x.size(1))")
    nnz, B, O = col.numel(), gy.shape[0], crow.numel() - 1
    if nnz == 0 or B == 0:
        return torch.zeros(nnz, dtype=gy.dtype, device=gy.device)
    out = torch.empty(nnz, dtype=gy.dtype, device=gy.device)
    g_t, x_t = feature_major(gy), feature_major(x)

    def grid(meta):
        return (triton.cdiv(nnz, meta["BLOCK_K"]),)

    with on_device_of(gy):
        _sddmm_kernel[grid](
            g_t, g_t.stride(0), g_t.stride(1), x_t, x_t.stride(0), x_t.stride(1),
            crow.contiguous(), col.contiguous(), active.contiguous() if active is not None else crow, out,
            nnz, O, x.shape[1], B, search_steps(O),
            HAS_ACTIVE=active is not None, ACC=tl_dtype(gy.dtype),
            **fp_fusion_kwargs(True),
        )
    return out
