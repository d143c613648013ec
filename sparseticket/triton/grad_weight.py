"""Neuron-skipping dense weight gradient: gW = gyᵀ x, computing only the active rows.

A tiled GEMM (``tl.dot``) over the output [O, I] whose row tiles are taken from a compacted
row order: the active rows first, then the frozen ones (a stable argsort of the mask, on
the device, so no host sync). Row tiles past the number of active rows do no arithmetic and
only write zeros; with a fraction f of neurons frozen the GEMM does (1 − f) of the dense
FLOPs. Frozen rows are exact zeros, never computed, so a NaN in a frozen neuron's gradient
cannot leak.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._library import check_row_masked_grad_weight
from ._common import active_rows_first, autotune_configs, dot_precision, fp_fusion_kwargs, on_device_of, tl_dtype

# (BLOCK_O, BLOCK_I, BLOCK_B, GROUP_O, num_warps, num_stages): the usual fp32/TF32 GEMM tiles
# for A100 (164 KB shared memory) and H100 (228 KB); the largest use 144 KB over 3 stages.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_O": bo, "BLOCK_I": bi, "BLOCK_B": bb, "GROUP_O": 8}, num_warps=w, num_stages=s)
    for bo, bi, bb, w, s in [
        (128, 128, 32, 4, 3), (128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4), (64, 64, 32, 4, 4), (128, 128, 16, 8, 4), (64, 256, 32, 4, 3),
    ]
]
_INTERP_CONFIG = triton.Config({"BLOCK_O": 16, "BLOCK_I": 16, "BLOCK_B": 16, "GROUP_O": 2}, num_warps=1)


def _prune_for_dtype(configs, named_args, **kwargs):
    """fp64 tiles are twice the bytes: keep the ones that fit registers and shared memory."""
    if named_args["gy_ptr"].dtype == torch.float64:
        small = [c for c in configs if c.kwargs.get("BLOCK_O", 0) * c.kwargs.get("BLOCK_I", 0) <= 128 * 64]
        return small or configs
    return configs


@triton.autotune(configs=autotune_configs(_GPU_CONFIGS, _INTERP_CONFIG), key=["O", "I", "B"],
                 prune_configs_by={"early_config_prune": _prune_for_dtype})
@triton.jit
def _row_masked_grad_weight_kernel(
    gy_ptr, stride_gy_b, stride_gy_o,
    x_ptr, stride_x_b, stride_x_i,
    order_ptr, n_active_ptr,
    out_ptr, stride_out_o, stride_out_i,
    O, I, B,
    HAS_ACTIVE: tl.constexpr, ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_B: tl.constexpr, GROUP_O: tl.constexpr,
):
    pid = tl.program_id(0)
    n_o = tl.cdiv(O, BLOCK_O)
    n_i = tl.cdiv(I, BLOCK_I)
    # grouped launch order: GROUP_O row tiles sweep the column tiles together, so each tile of
    # x is reused from L2 by several row tiles
    per_group = GROUP_O * n_i
    first_o = (pid // per_group) * GROUP_O
    group_size = tl.minimum(n_o - first_o, GROUP_O)
    pid_o = first_o + (pid % per_group) % group_size
    pid_i = (pid % per_group) // group_size

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    if HAS_ACTIVE:
        n_live = tl.load(n_active_ptr)
        rows = tl.load(order_ptr + offs_o, mask=mask_o, other=0)
    else:
        n_live = O
        rows = offs_o
    live = offs_o < n_live
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < I
    rows64 = rows.to(tl.int64)

    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=ACC)
    if pid_o * BLOCK_O < n_live:
        for b0 in range(0, B, BLOCK_B):
            offs_b = b0 + tl.arange(0, BLOCK_B)
            mask_b = offs_b < B
            ob = offs_b.to(tl.int64)
            a = tl.load(gy_ptr + ob[None, :] * stride_gy_b + rows64[:, None] * stride_gy_o,
                        mask=live[:, None] & mask_b[None, :], other=0.0)
            xb = tl.load(x_ptr + ob[:, None] * stride_x_b + offs_i[None, :] * stride_x_i,
                         mask=mask_b[:, None] & mask_i[None, :], other=0.0)
            acc = tl.dot(a, xb, acc, input_precision=INPUT_PRECISION)
    # rows past n_live are frozen: acc is still exactly zero there
    out = out_ptr + rows64[:, None] * stride_out_o + offs_i[None, :] * stride_out_i
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_o[:, None] & mask_i[None, :])


def triton_row_masked_grad_weight(gy: Tensor, x: Tensor, active: Optional[Tensor] = None) -> Tensor:
    """gW = gyᵀ x with frozen rows never computed.

    gy: [B, O]; x: [B, I]; active: [O] bool or None -> gW: [O, I] contiguous, rows with
    active False exactly 0. Same meaning as ``reference_row_masked_grad_weight``.
    """
    check_row_masked_grad_weight(gy, x, active)
    B, O = gy.shape
    I = x.shape[1]
    if O == 0 or I == 0 or B == 0:
        return torch.zeros((O, I), dtype=gy.dtype, device=gy.device)
    out = torch.empty((O, I), dtype=gy.dtype, device=gy.device)
    if active is not None:
        order, n_active = active_rows_first(active.contiguous())
    else:
        order = n_active = out  # unused placeholders

    def grid(meta):
        return (triton.cdiv(O, meta["BLOCK_O"]) * triton.cdiv(I, meta["BLOCK_I"]),)

    with on_device_of(gy):
        _row_masked_grad_weight_kernel[grid](
            gy, gy.stride(0), gy.stride(1), x, x.stride(0), x.stride(1),
            order, n_active, out, out.stride(0), out.stride(1),
            O, I, B,
            HAS_ACTIVE=active is not None, ACC=tl_dtype(gy.dtype), INPUT_PRECISION=dot_precision(gy.dtype),
            **fp_fusion_kwargs(True),
        )
    return out
