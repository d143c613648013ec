"""Fused multi-tensor masked optimizer steps: SGD (``masked_sgd_``) and AdamW.

One launch updates every parameter of a dtype: a device-side table holds, per tensor, the
addresses of the parameter, its gradient, its optimizer state and its masks, with its size
and mask layout; a chunk table maps each program to (tensor, first element). Programs then
stream their chunk once: parameters and state are read, updated and written in registers.

Masks, per element:
* keep False (pruned)   -> parameter and state are written as exact zeros;
* active False (frozen) -> nothing is loaded or stored: the old bits stay, by construction.
``active`` may be element-wise, per dim-0 row (a neuron's weights, or a bias), or per CSR row
of compact ticket values (``row_ptrs``; the row of an element is found by binary search).

The arithmetic follows torch.optim op for op; scalars are cast to the parameter dtype as
ATen does for ``alpha``/``value`` arguments, and ``tl.fma`` sits exactly where ATen's CUDA
kernels compute ``a + alpha * b`` (nvcc contracts those to one FMA), with automatic FMA
contraction turned off, so the rounding is pinned rather than left to the compiler.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..ops._library import check_masked_sgd
from ._common import fp_fusion_kwargs, interpreting, on_device_of, search_steps, tl_dtype
from .adamw_reference import check_masked_adamw

# per-tensor table columns (int64): addresses, then sizes, then flags
_P, _G, _S1, _S2, _S3, _KEEP, _ACT, _RPTR, _NUMEL, _ROWLEN, _NROWS, _FLAGS = range(12)
_NF = 12
_FRESH, _HAS_KEEP = 1, 2  # flag bits; bits 2-3 hold the active-mask mode
_ACT_NONE, _ACT_ELEM, _ACT_ROW, _ACT_CSR = 0, 1, 2, 3

# Not autotuned: the update is in place, so timing configs would apply it several times.
# 4 warps × 1024-element blocks × 4 iterations: 16 KB of fp32 parameters per program, enough
# bytes in flight per SM to saturate HBM on A100/H100 for this streaming kernel.
_BLOCK, _ITERS, _WARPS = (64, 2, 1) if interpreting() else (1024, 4, 4)


@triton.jit
def _sqrt(x):
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)  # tl.sqrt may be approximate; torch's sqrt is correctly rounded
    else:
        return tl.sqrt(x)


@triton.jit
def _div(a, b):
    if a.dtype == tl.float32:
        return tl.div_rn(a, b)  # IEEE division, as in torch (Triton's default fp32 `/` is approximate)
    else:
        return a / b


@triton.jit
def _scalar(x, DT: tl.constexpr):
    """A float64 scalar argument in the parameter dtype, rounded once (as ATen casts alpha).

    Built with tl.full so the value stays float64 under the interpreter too, which passes
    Python floats through untyped (tl.cast would go through float32 first).
    """
    return tl.full((), x, tl.float64).to(DT)


@triton.jit
def _chunk_setup(meta_ptr, chunk_ptr):
    """Locate this program's tensor and chunk; returns (table row, first element, numel, flags)."""
    c = tl.program_id(0)
    t = tl.load(chunk_ptr + 2 * c)
    start = tl.load(chunk_ptr + 2 * c + 1)
    row = meta_ptr + t * 12
    return row, start, tl.load(row + 8), tl.load(row + 11)


@triton.jit
def _live_elements(row, offs, numel, flags, n_search, BLOCK: tl.constexpr):
    """In-bounds and not frozen: the elements this step may touch."""
    inb = offs < numel
    mode = (flags >> 2) & 3
    # flags are broadcast before they meet a vector: the interpreter mis-types `vector & scalar_bool`
    uses_mask = (tl.zeros_like(offs) + mode) != 0
    a_idx = offs
    if mode == 2:  # one flag per dim-0 row
        a_idx = offs // tl.load(row + 9)
    if mode == 3:  # one flag per CSR row of compact values: last r with row_ptr[r] <= i
        rp = tl.load(row + 7).to(tl.pointer_type(tl.int32))
        lo = tl.zeros((BLOCK,), dtype=tl.int64)
        hi = tl.zeros((BLOCK,), dtype=tl.int64) + tl.load(row + 10)
        for _ in range(n_search):
            mid = (lo + hi) // 2
            go_right = tl.load(rp + mid, mask=inb, other=0) <= offs
            lo = tl.where(go_right, mid, lo)
            hi = tl.where(go_right, hi, mid)
        a_idx = lo
    act_ptr = tl.load(row + 6).to(tl.pointer_type(tl.int8))
    active = tl.load(act_ptr + a_idx, mask=inb & uses_mask, other=1) != 0
    return inb & active


@triton.jit
def _masked_sgd_kernel(
    meta_ptr, chunk_ptr,
    lr: tl.float64, momentum: tl.float64, dampening_complement: tl.float64, weight_decay: tl.float64,
    n_search,
    DT: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    row, start, numel, flags = _chunk_setup(meta_ptr, chunk_ptr)
    p_ptr = tl.load(row + 0).to(tl.pointer_type(DT))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DT))
    buf_ptr = tl.load(row + 2).to(tl.pointer_type(DT))
    keep_ptr = tl.load(row + 5).to(tl.pointer_type(tl.int8))
    fresh_bit = tl.zeros((BLOCK,), dtype=tl.int64) + (flags & 1)  # vectors: see _live_elements
    fresh = fresh_bit != 0
    stale = fresh_bit == 0
    has_keep = (tl.zeros((BLOCK,), dtype=tl.int64) + (flags & 2)) != 0
    neg_lr = -_scalar(lr, DT)
    mom = _scalar(momentum, DT)
    damp_c = _scalar(dampening_complement, DT)
    wd = _scalar(weight_decay, DT)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        live = _live_elements(row, offs, numel, flags, n_search, BLOCK)
        p = tl.load(p_ptr + offs, mask=live, other=0.0)
        g = tl.load(g_ptr + offs, mask=live, other=0.0)
        d = g
        if MAXIMIZE:
            d = -g
        if HAS_WD:
            d = tl.fma(wd, p, d)                               # d.add(p, alpha=wd)
        if HAS_MOMENTUM:
            old = tl.load(buf_ptr + offs, mask=live & stale, other=0.0)
            buf = tl.where(fresh, d, tl.fma(damp_c, d, old * mom))  # buf.mul_(m).add_(d, alpha=1-damp)
            if NESTEROV:
                d = tl.fma(mom, buf, d)                        # d.add(buf, alpha=m)
            else:
                d = buf
        p = tl.fma(neg_lr, d, p)                               # p.add_(d, alpha=-lr)
        keep = tl.load(keep_ptr + offs, mask=live & has_keep, other=1) != 0
        tl.store(p_ptr + offs, tl.where(keep, p, 0.0), mask=live)
        if HAS_MOMENTUM:
            tl.store(buf_ptr + offs, tl.where(keep, buf, 0.0), mask=live)


@triton.jit
def _masked_adamw_kernel(
    meta_ptr, chunk_ptr,
    decay: tl.float64, lerp_weight: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64,
    neg_step_size: tl.float64, bias_correction2_sqrt: tl.float64, eps: tl.float64,
    n_search,
    DT: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_WD: tl.constexpr,
    LERP_SMALL: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    row, start, numel, flags = _chunk_setup(meta_ptr, chunk_ptr)
    p_ptr = tl.load(row + 0).to(tl.pointer_type(DT))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(DT))
    m_ptr = tl.load(row + 2).to(tl.pointer_type(DT))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(DT))
    vmax_ptr = tl.load(row + 4).to(tl.pointer_type(DT))
    keep_ptr = tl.load(row + 5).to(tl.pointer_type(tl.int8))
    has_keep = (tl.zeros((BLOCK,), dtype=tl.int64) + (flags & 2)) != 0  # a vector: see _live_elements
    decay_ = _scalar(decay, DT)
    w = _scalar(lerp_weight, DT)
    b2 = _scalar(beta2, DT)
    c2 = _scalar(one_minus_beta2, DT)
    neg_step = _scalar(neg_step_size, DT)
    bc2s = _scalar(bias_correction2_sqrt, DT)
    eps_ = _scalar(eps, DT)
    for it in range(ITERS):
        offs = start + it * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        live = _live_elements(row, offs, numel, flags, n_search, BLOCK)
        p = tl.load(p_ptr + offs, mask=live, other=0.0)
        g = tl.load(g_ptr + offs, mask=live, other=0.0)
        m = tl.load(m_ptr + offs, mask=live, other=0.0)
        v = tl.load(v_ptr + offs, mask=live, other=0.0)
        if MAXIMIZE:
            g = -g
        if HAS_WD:
            p = p * decay_                                     # p.mul_(1 - lr * wd)
        diff = g - m                                           # m.lerp_(g, 1 - beta1), as ATen's lerp
        if LERP_SMALL:
            m = tl.fma(w, diff, m)
        else:
            m = tl.fma(-diff, 1.0 - w, g)
        v = tl.fma(c2 * g, g, v * b2)                          # v.mul_(b2).addcmul_(g, g, value=1-b2)
        if AMSGRAD:
            vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=live, other=0.0), v)
            denom = _div(_sqrt(vmax), bc2s) + eps_
        else:
            denom = _div(_sqrt(v), bc2s) + eps_
        p = tl.fma(neg_step, _div(m, denom), p)                # p.addcdiv_(m, denom, value=-step_size)
        keep = tl.load(keep_ptr + offs, mask=live & has_keep, other=1) != 0
        tl.store(p_ptr + offs, tl.where(keep, p, 0.0), mask=live)
        tl.store(m_ptr + offs, tl.where(keep, m, 0.0), mask=live)
        tl.store(v_ptr + offs, tl.where(keep, v, 0.0), mask=live)
        if AMSGRAD:
            tl.store(vmax_ptr + offs, tl.where(keep, vmax, 0.0), mask=live)


# ----------------------------------------------------------------------------- tables


class _Staged:
    """Contiguous stand-ins for strided tensors; written back after the kernel."""

    def __init__(self):
        self.write_back: List[Tuple[Tensor, Tensor]] = []

    def inout(self, t: Tensor) -> Tensor:
        if t.is_contiguous():
            return t
        c = t.contiguous()
        self.write_back.append((t, c))
        return c

    def finish(self):
        for dst, src in self.write_back:
            dst.copy_(src)


_TABLE_CACHE: "OrderedDict[tuple, Tuple[Tensor, Tensor]]" = OrderedDict()
_TABLE_CACHE_SIZE = 32


def _device_tables(rows: List[Tuple[int, ...]], device: torch.device) -> Tuple[Tensor, Tensor]:
    """(meta [n, 12] int64, chunks [n_chunks, 2] int64) on ``device``.

    The tables contain only addresses and sizes, so a cached table is valid whenever the
    key (its exact content) matches: parameters keep their storage from step to step, and
    the host-to-device copy is paid once, not per step.
    """
    chunk = _BLOCK * _ITERS
    key = (device, chunk, tuple(rows))
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        _TABLE_CACHE.move_to_end(key)
        return hit
    meta = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), _NF)
    numel = meta[:, _NUMEL]
    n_chunks = (numel + chunk - 1) // chunk
    tensor_of_chunk = torch.repeat_interleave(torch.arange(len(rows)), n_chunks)
    first = torch.repeat_interleave(torch.cumsum(n_chunks, 0) - n_chunks, n_chunks)
    start = (torch.arange(tensor_of_chunk.numel()) - first) * chunk
    chunks = torch.stack([tensor_of_chunk, start], 1).contiguous()
    if device.type != "cpu":
        meta = meta.pin_memory().to(device, non_blocking=True)
        chunks = chunks.pin_memory().to(device, non_blocking=True)
    _TABLE_CACHE[key] = (meta, chunks)
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return meta, chunks


def _table_row(p, g, states, keep, active, row_ptr, fresh, keep_alive: list):
    """One table row for parameter p (already staged) and the search depth it needs."""
    g = g.contiguous()
    keep_alive.append(g)
    addr = [p.data_ptr(), g.data_ptr()] + [s.data_ptr() for s in states] + [p.data_ptr()] * (3 - len(states))
    mode, row_len, n_rows, a_addr, rp_addr, n_search = _ACT_NONE, 1, 0, p.data_ptr(), p.data_ptr(), 1
    if active is not None:
        active = active.contiguous()
        keep_alive.append(active)
        a_addr = active.data_ptr()
        if row_ptr is not None:
            row_ptr = row_ptr.contiguous()
            keep_alive.append(row_ptr)
            mode, rp_addr, n_rows = _ACT_CSR, row_ptr.data_ptr(), row_ptr.numel() - 1
            n_search = search_steps(n_rows)
        elif active.shape == p.shape:
            mode = _ACT_ELEM
        else:
            mode, row_len = _ACT_ROW, max(1, p.numel() // p.shape[0])
    k_addr = p.data_ptr()
    if keep is not None:
        keep = keep.contiguous()
        keep_alive.append(keep)
        k_addr = keep.data_ptr()
    flags = (_FRESH if fresh else 0) | (_HAS_KEEP if keep is not None else 0) | (mode << 2)
    return tuple(addr) + (k_addr, a_addr, rp_addr, p.numel(), row_len, n_rows, flags), n_search


def _grouped_rows(params, grads, state_lists, keeps, actives, row_ptrs, fresh, extra_key, staged, keep_alive):
    """Table rows grouped by (device, dtype, extra_key): one kernel launch per group."""
    groups: Dict[tuple, list] = {}
    for j, p in enumerate(params):
        if p.numel() == 0:
            continue
        pc = staged.inout(p)
        states = [staged.inout(s[j]) for s in state_lists]
        row, n_search = _table_row(pc, grads[j], states, keeps[j], actives[j], row_ptrs[j], fresh[j], keep_alive)
        key = (p.device, p.dtype, extra_key(j))
        rows, depth = groups.get(key, ([], 1))
        rows.append(row)
        groups[key] = (rows, max(depth, n_search))
    return groups


# ----------------------------------------------------------------------------- launch wrappers


def triton_masked_sgd_(
    params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Sequence[Tensor],
    keep_masks: Sequence[Optional[Tensor]], active_masks: Sequence[Optional[Tensor]],
    row_ptrs: Sequence[Optional[Tensor]], fresh: Sequence[bool],
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
) -> None:
    """One fused step of torch.optim.SGD over all ``params`` in place; same meaning (and
    arguments) as ``reference_masked_sgd_``."""
    check_masked_sgd(params, grads, momentum_buffers, keep_masks, active_masks, row_ptrs, fresh, momentum)
    staged, keep_alive = _Staged(), []
    states = [momentum_buffers] if momentum != 0 else []
    groups = _grouped_rows(params, grads, states, keep_masks, active_masks, row_ptrs, fresh, lambda j: None,
                           staged, keep_alive)
    for (device, dtype, _), (rows, n_search) in groups.items():
        meta, chunks = _device_tables(rows, device)
        with on_device_of(meta):
            _masked_sgd_kernel[(chunks.shape[0],)](
                meta, chunks, float(lr), float(momentum), 1.0 - float(dampening), float(weight_decay), n_search,
                DT=tl_dtype(dtype), HAS_MOMENTUM=momentum != 0, NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize),
                HAS_WD=weight_decay != 0, BLOCK=_BLOCK, ITERS=_ITERS, num_warps=_WARPS,
                **fp_fusion_kwargs(False),
            )
    staged.finish()


def triton_masked_adamw_(
    params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor], keep_masks: Sequence[Optional[Tensor]],
    active_masks: Sequence[Optional[Tensor]], row_ptrs: Sequence[Optional[Tensor]], steps: Sequence[float],
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
) -> None:
    """One fused step of torch.optim.AdamW over all ``params`` in place; same meaning (and
    arguments) as ``adamw_reference.reference_masked_adamw_``. Tensors sharing a step count
    (normally all of them) share a launch."""
    check_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, keep_masks, active_masks, row_ptrs,
                       steps, amsgrad)
    staged, keep_alive = _Staged(), []
    states = [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    groups = _grouped_rows(params, grads, states, keep_masks, active_masks, row_ptrs, [False] * len(params),
                           lambda j: float(steps[j]), staged, keep_alive)
    lerp_weight = 1.0 - beta1
    for (device, dtype, step), (rows, n_search) in groups.items():
        # ATen's lerp picks its formula from |weight| < 0.5 with the weight in the tensor's dtype
        lerp_small = abs(torch.tensor(lerp_weight, dtype=dtype).item()) < 0.5
        meta, chunks = _device_tables(rows, device)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        with on_device_of(meta):
            _masked_adamw_kernel[(chunks.shape[0],)](
                meta, chunks, 1.0 - lr * weight_decay, lerp_weight, float(beta2), 1.0 - beta2,
                -(lr / bias_correction1), bias_correction2 ** 0.5, float(eps), n_search,
                DT=tl_dtype(dtype), AMSGRAD=bool(amsgrad), MAXIMIZE=bool(maximize), HAS_WD=weight_decay != 0,
                LERP_SMALL=lerp_small, BLOCK=_BLOCK, ITERS=_ITERS, num_warps=_WARPS,
                **fp_fusion_kwargs(False),
            )
    staged.finish()
