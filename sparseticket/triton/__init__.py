"""Triton kernels for sparseticket's ops on NVIDIA GPUs.

Launch wrappers (plain functions; CUDA tensors on a GPU, CPU tensors under
``TRITON_INTERPRET=1``), each with the meaning of the reference of the same op:

=================================  =============================================================
``triton_spmm``                    y = x Wᵀ + b, ticket W (row-split CSR × dense)
``triton_sparse_linear``           forward of ``sparse_linear`` (= ``triton_spmm``)
``triton_spmm_t``                  gx = gy W through the CSC structure
``triton_sddmm``                   kept-weight gradient, frozen rows skipped
``triton_row_masked_grad_weight``  dense gW = gyᵀ x over the active rows only
``triton_masked_sgd_``             fused multi-tensor masked SGD step
``triton_masked_adamw_``           fused multi-tensor masked AdamW step (its
                                   reference in ``sparseticket.ops.reference``)
=================================  =============================================================

``register_cuda_backends`` wires them into the ``sparseticket`` namespace for CUDA tensors;
``sparseticket.ops`` calls it once at import. Importing this package never imports triton:
the kernels load on first use, so the package works (on the references) without it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from typing import Callable, Dict, Mapping, Optional

import torch

__all__ = ["available", "usable_on_cuda", "impls", "register", "register_cuda_backends", "CUDA_IMPLS",
           "TRITON_ERROR", "triton_spmm", "triton_sparse_linear", "triton_spmm_t", "triton_sddmm",
           "triton_row_masked_grad_weight", "triton_masked_sgd_", "triton_masked_adamw_"]

_WRAPPERS = {
    "triton_spmm": "spmm", "triton_sparse_linear": "spmm", "triton_spmm_t": "spmm",
    "triton_sddmm": "sddmm", "triton_row_masked_grad_weight": "grad_weight",
    "triton_masked_sgd_": "optim", "triton_masked_adamw_": "optim",
}
#: op name -> launch wrapper name, for the ops Triton serves
OP_TO_WRAPPER = {
    "spmm": "triton_spmm", "sparse_linear": "triton_sparse_linear", "spmm_t": "triton_spmm_t",
    "sddmm": "triton_sddmm", "row_masked_grad_weight": "triton_row_masked_grad_weight",
    "masked_sgd_": "triton_masked_sgd_", "masked_adamw_": "triton_masked_adamw_",
}
#: which implementation serves each sparseticket op for CUDA tensors ("cuda", "triton", "reference")
CUDA_IMPLS: Dict[str, str] = {}
#: why Triton is not serving CUDA tensors, if it is not
TRITON_ERROR: Optional[str] = None


def __getattr__(name: str):
    if name in _WRAPPERS:
        module = importlib.import_module(f"{__name__}.{_WRAPPERS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> bool:
    """Whether the triton package is installed (the kernels may still need a GPU to run)."""
    return importlib.util.find_spec("triton") is not None


def usable_on_cuda() -> Optional[str]:
    """None if Triton can serve CUDA tensors here, else the reason it cannot."""
    if os.environ.get("SPARSETICKET_NO_TRITON", "0") not in ("", "0"):
        return "disabled by SPARSETICKET_NO_TRITON"
    if not available():
        return "triton is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def impls() -> Dict[str, Callable]:
    """op name -> Triton launch wrapper (imports triton and compiles nothing yet)."""
    return {op: __getattr__(wrapper) for op, wrapper in OP_TO_WRAPPER.items()}


def register(lib: Optional[torch.library.Library] = None, skip=()) -> Dict[str, Callable]:
    """Register the Triton kernels as the CUDA implementations of the sparseticket ops.

    ``lib``: an existing ``torch.library.Library("sparseticket", ...)`` (the package's own
    DEF library); a new ``IMPL`` library is made if None. ``skip``: op names left alone.
    Returns the implementations registered.
    """
    if lib is None:
        lib = torch.library.Library("sparseticket", "IMPL")
        _KEEP_ALIVE.append(lib)  # registrations live as long as the Library object
    done = {}
    for op, fn in impls().items():
        if op not in skip:
            lib.impl(op, fn, "CUDA")
            done[op] = fn
    return done


_KEEP_ALIVE: list = []


def _has_compiled_cuda_kernel(op: str) -> bool:
    """True if sparseticket._C (built against a CUDA torch) registered a CUDA kernel for op."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparseticket::{op}", "CUDA")
    except Exception:  # private API moved: assume no compiled kernel rather than fail import
        return False


def register_cuda_backends(lib: torch.library.Library, fallback: Mapping[str, Callable]) -> str:
    """Choose and register the implementation of every op for CUDA tensors.

    Per op, in order: a CUDA C++ kernel already registered by the compiled extension is
    kept; else the Triton kernel, when triton is importable and a GPU is visible; else
    ``fallback[op]`` (the checked pure-PyTorch reference). Returns a one-word summary for
    ``sparseticket.BACKENDS["cuda"]``; the per-op choice is in ``CUDA_IMPLS``.
    """
    global TRITON_ERROR
    compiled = {op for op in fallback if _has_compiled_cuda_kernel(op)}
    TRITON_ERROR = usable_on_cuda()
    triton_fns: Dict[str, Callable] = {}
    if TRITON_ERROR is None:
        try:
            triton_fns = register(lib, skip=compiled)
        except Exception as e:  # broken triton install: keep the package importable
            TRITON_ERROR = f"{type(e).__name__}: {e}"
            warnings.warn(f"sparseticket: Triton kernels unavailable ({TRITON_ERROR}); CUDA tensors use the "
                          "reference path.", stacklevel=3)
    for op, fn in fallback.items():
        if op in compiled:
            CUDA_IMPLS[op] = "cuda"
        elif op in triton_fns:
            CUDA_IMPLS[op] = "triton"
        else:
            lib.impl(op, fn, "CUDA")
            CUDA_IMPLS[op] = "reference"
    served = CUDA_IMPLS.get("spmm", "reference")
    return served
