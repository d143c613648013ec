"""Helpers shared by the Triton kernels: config selection, layouts, row orders.

Nothing here imports triton, so the helpers can be used (and tested) without it.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import List, Sequence

import torch
from torch import Tensor


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_configs(gpu: Sequence, interp) -> List:
    """The autotune configs to register for a kernel.

    On a GPU: the full list, sized for A100/H100. Under the interpreter: the single small
    ``interp`` config, because the interpreter cannot time configs (it has no driver) and runs
    each program instance in Python, so small blocks keep tests fast.
    """
    return [interp] if interpreting() else list(gpu)


def fp_fusion_kwargs(enabled: bool) -> dict:
    """Launch option that pins FMA contraction explicitly (Triton 3.9 warns when it is left unset).

    Matmul kernels enable it (one rounding per multiply-add, fewer instructions); the optimizer
    kernels disable it and call ``tl.fma`` exactly where ATen's CUDA kernels contract, so their
    rounding does not depend on the compiler's choices.
    """
    return {} if interpreting() else {"enable_fp_fusion": enabled}


def on_device_of(t: Tensor):
    """Context that makes t's GPU current: Triton launches on the current device, not the tensor's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def feature_major(t: Tensor) -> Tensor:
    """t: [B, F] -> [F, B] with unit stride along B (a view if t already is column-major).

    The row-split kernels gather whole feature rows of the dense operand; with the batch
    contiguous those gathers are coalesced instead of one sector per element.
    """
    tt = t.t()
    if tt.stride(1) == 1 or tt.shape[1] <= 1:
        return tt
    return tt.contiguous()


#: validate ticket indices on CUDA tensors too (costs a host sync per call); on CPU tensors always
CHECK_INDICES = os.environ.get("SPARSETICKET_CHECK_INDICES", "0") not in ("", "0")


def check_index_range(ptr: Tensor, idx: Tensor, K: int, ptr_name: str, idx_name: str, operand: str) -> None:
    """The CSR structure (ptr, idx) addresses an operand with K rows: the same checks and
    messages as the C++ CPU kernels (``check_ptr`` and ``check_index_range``).

    Indices are sorted within each row (``ticket_transpose`` validates that once per mask), so
    each row's first and last index bound all of them. Reading the verdict needs the host, so
    on CUDA tensors this runs only with ``SPARSETICKET_CHECK_INDICES=1``; without it the GPU
    kernels still never read out of bounds (an out-of-range entry is skipped, not raised).
    """
    if ptr.is_cuda and not CHECK_INDICES:
        return
    nnz = idx.numel()
    first_last = ptr[[0, -1]].tolist()
    torch._check(first_last[0] == 0 and first_last[1] == nnz, lambda: (
        f"sparseticket: {ptr_name} must start at 0 and end at nnz={nnz}, got {first_last[0]} and {first_last[1]}"))
    lengths = ptr[1:] - ptr[:-1]
    if bool((lengths < 0).any()):
        r = int((lengths < 0).nonzero()[0])
        torch._check(False, lambda: f"sparseticket: row pointers of {idx_name} decrease at row {r}")
    rows = (lengths > 0).nonzero().flatten()
    if rows.numel() == 0:
        return
    lo = idx[ptr[rows].long()]
    hi = idx[(ptr[rows + 1] - 1).long()]
    bad = (lo < 0) | (hi >= K)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        value = int(lo[k]) if int(lo[k]) < 0 else int(hi[k])
        torch._check(False, lambda: (
            f"sparseticket: {idx_name} has index {value} in row {int(rows[k])} but {operand} has only {K} "
            "(is the ticket for a different in/out size?)"))


def search_steps(n_rows: int) -> int:
    """Binary-search iterations that find the row of an entry among ``n_rows`` CSR rows."""
    return max(1, int(n_rows).bit_length())


def nnz_bucket(nnz: int, n_rows: int) -> int:
    """log2 bucket of the mean row length: the autotune key that separates sparsity regimes."""
    return (nnz // max(n_rows, 1)).bit_length()


_ORDER_CACHE: "OrderedDict[tuple, Tensor]" = OrderedDict()
_ORDER_CACHE_SIZE = 64


def heavy_rows_first(ptr: Tensor) -> Tensor:
    """Row indices [n_rows] int32 sorted by decreasing row length (Gale et al.'s row swizzle).

    Long rows start first so the short ones fill the tail of the launch instead of one long
    row finishing alone. The order only affects speed: any permutation of the rows gives the
    same result, so the cache (keyed by the pointer array's address, length and version, all
    cheap to read) can never make a result wrong, at worst a stale order is slower.
    """
    key = (ptr.device, ptr.data_ptr(), ptr.numel(), ptr._version)
    order = _ORDER_CACHE.get(key)
    if order is None:
        lengths = ptr[1:] - ptr[:-1]
        order = torch.argsort(lengths, descending=True, stable=True).to(torch.int32)
        _ORDER_CACHE[key] = order
        if len(_ORDER_CACHE) > _ORDER_CACHE_SIZE:
            _ORDER_CACHE.popitem(last=False)
    else:
        _ORDER_CACHE.move_to_end(key)
    return order


def active_rows_first(active: Tensor):
    """(order [O] int32 with the active rows first, n_active [1] int32), without a host sync."""
    order = torch.argsort((~active).to(torch.uint8), stable=True).to(torch.int32)
    n_active = active.sum(dtype=torch.int32).reshape(1)
    return order, n_active


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return {torch.float32: tl.float32, torch.float64: tl.float64}[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching what torch would do for the same matmul.

    fp32 uses TF32 tensor cores only when torch is allowed to (``torch.backends.cuda.matmul
    .allow_tf32`` / ``set_float32_matmul_precision``), so switching between the reference and
    Triton never silently changes precision.
    """
    if dtype == torch.float32 and not interpreting() and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
