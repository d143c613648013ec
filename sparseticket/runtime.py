"""Process-wide settings that change how fast training runs, not what it computes.

``retain_freed_memory()``: glibc's malloc serves large blocks (from 128 KB, its threshold
then grows with the sizes it sees) with ``mmap`` and gives the memory back to the kernel
when the block is freed, and trims the top of its heap when enough is free there. PyTorch's
CPU allocator frees every tensor when its last reference dies, so a training step that
allocates the same activations and gradients every iteration page-faults them in again
every iteration: a Conv-4 step at batch 64 took 10-13 thousand minor faults (40-50 MB of
fresh zeroed pages), about a tenth of its time. With the mmap threshold at glibc's
maximum (32 MB) and trimming off, freed blocks are kept and reused: 0 faults per step.
The cost is that the process keeps its peak heap until it exits.

This is a process-wide setting for programs (the IMP runner applies it unless told
``--malloc default``; the benchmarks apply it to every contender alike); the library never
applies it on import.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Optional

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc caps the mmap threshold at HEAP_MAX_SIZE / 2 (32 MB on 64-bit); larger blocks stay mmapped
MMAP_THRESHOLD_MAX = 32 << 20
#: no trimming in practice (glibc takes an int; this is its largest)
TRIM_THRESHOLD_MAX = 2 ** 31 - 1

MODES = ("retain", "default")
_applied: Optional[str] = None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None


def retain_freed_memory() -> bool:
    """Keep freed blocks below 32 MB in the process for reuse instead of returning them to
    the kernel (see the module docstring). Returns whether the setting took effect
    (False when the C library is not glibc). Calling it again is harmless."""
    global _applied
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                       TRIM_THRESHOLD_MAX))
    if ok:
        _applied = "retain"
    return ok


def set_malloc(mode: str) -> str:
    """Apply an allocator mode by name: 'retain' (``retain_freed_memory``) or 'default'
    (leave glibc as it is). Returns what is in effect: 'retain', 'default', or
    'default (not glibc)' when 'retain' could not be applied."""
    if mode not in MODES:
        raise ValueError(f"sparseticket: malloc mode must be one of {MODES}, got {mode!r}")
    if mode == "retain":
        return "retain" if retain_freed_memory() else "default (not glibc)"
    return malloc_mode()


def malloc_mode() -> str:
    """'retain' if this process applied ``retain_freed_memory``, 'env' if glibc's
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ variables set it, else 'default'."""
    if _applied:
        return _applied
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return "env"
    return "default"


def set_serial_work(work: int) -> int:
    """Set the work (multiply-adds of one op call) below which the compiled CPU kernels run
    on the calling thread instead of the thread pool; returns the previous value.

    Waking the pool costs a few microseconds per parallel region, more than a second
    thread saves on LeNet-sized layers (see ``csrc/cpu/parallel.h`` for the measurements).
    The default is 2**19; ``SPARSETICKET_SERIAL_WORK`` sets it at start-up; 0 puts every
    op on the pool. Raises RuntimeError when the compiled kernels are not loaded.
    """
    from . import ops
    if ops._C is None:
        raise RuntimeError("sparseticket: the compiled kernels are not loaded (see python -m sparseticket.info)")
    return int(ops._C.set_serial_work(int(work)))


def set_batch_shards(on: bool) -> bool:
    """Turn batch shards on or off for the compiled CPU linear kernels; returns the previous
    setting.

    A call of ``spmm``, ``spmm_t``, ``sddmm`` or ``sparse_linear_backward`` shards its batch
    when (see ``batch_shards`` in ``csrc/cpu/ops_cpu.cpp``): the batch makes a whole
    number of packed panels per thread, at least one each (float32 on AVX-512: 256 or 512
    rows with 2 threads, not 384); the ticket's indices and values take at most 1 MB; the
    call goes to the thread pool (``set_serial_work``); and it is not made from inside a
    parallel region. Each thread then packs and multiplies its own rows of the batch,
    instead of every thread reading every panel. The forward and the input gradient are
    bit-identical either way; the kept-weight gradient is a sum of one partial result per
    thread, so its rounding depends on the thread count. A call that does not shard may
    compute a dense enough ticket's kept-weight gradient by dense tiles instead
    (``kept_grad_tiles`` in ops_cpu.cpp), so turning shards off can also change that
    choice. On by default;
    ``SPARSETICKET_BATCH_SHARDS=0`` turns it off at start-up. Raises RuntimeError when
    the compiled kernels are not loaded.
    """
    from . import ops
    if ops._C is None:
        raise RuntimeError("sparseticket: the compiled kernels are not loaded (see python -m sparseticket.info)")
    return bool(ops._C.set_batch_shards(bool(on)))
