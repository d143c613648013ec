"""Choosing sparse or dense-masked execution per layer and shape, by measurement.

Like ``torch.backends.cudnn.benchmark``: the first time a layer meets a new shape key it
times both of its paths on the real input and caches the faster one in a module-level
dict shared by every layer of the same shape, so a model of identical layers measures
once. The key is bucketed (batch to a power of two, nnz to quarter octaves) so a ragged
last batch or a slightly different mask does not trigger a new measurement.

Precedence of the forced modes: a module's own ``mode`` ('sparse' / 'dense') beats the
global one set with :func:`set_mode`; a module in 'auto' follows the global mode, and
when that is 'auto' too, the measurement decides.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

MODES = ("auto", "sparse", "dense")

_GLOBAL_MODE = "auto"
#: key -> "sparse" | "dense"
_CHOICES: Dict[tuple, str] = {}
#: key -> (sparse seconds, dense seconds), for report()
_TIMINGS: Dict[tuple, Tuple[float, float]] = {}
#: bumped by clear_cache(), invalidating the modules' memos of _CHOICES
VERSION = [0]

# Density at or above which a layer never measured (under torch.compile, before any eager
# call) runs dense. Measured on the CPU kernels (2 threads, fp32, fwd+bwd): sparse wins
# below ~50% density at LeNet/1024-square sizes; the choice is only a fallback.
HEURISTIC_DENSITY = 0.4


def check_mode(mode: str, what: str = "mode") -> str:
    if mode not in MODES:
        raise ValueError(f"sparseticket: {what} must be one of {MODES}, got {mode!r}")
    return mode


def set_mode(mode: str) -> str:
    """Force every sparse layer in 'auto' to 'sparse' or 'dense' execution ('auto' measures).

    Returns the previous global mode.
    """
    global _GLOBAL_MODE
    check_mode(mode)
    prev, _GLOBAL_MODE = _GLOBAL_MODE, mode
    return prev


def get_mode() -> str:
    return _GLOBAL_MODE


@contextlib.contextmanager
def use_mode(mode: str) -> Iterator[None]:
    """``with sparseticket.nn.use_mode('dense'): ...`` forces the global mode temporarily."""
    prev = set_mode(mode)
    try:
        yield
    finally:
        set_mode(prev)


def clear_cache() -> None:
    """Forget every measured choice (e.g. after changing the thread count by hand)."""
    _CHOICES.clear()
    _TIMINGS.clear()
    VERSION[0] += 1


def batch_bucket(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length() if n > 0 else 0


def nnz_bucket(nnz: int) -> int:
    return int(round(4 * math.log2(nnz + 1)))


def common_key(dtype: torch.dtype, device: torch.device, grad: bool) -> tuple:
    return (str(dtype), device.type, torch.get_num_threads(), grad)


def _time_once(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


#: seconds (and at most how many interleaved repetitions) one measurement may spend; a
#: caller that decides once for a long run (the IMP runner, per level) raises them
MEASURE = {"budget_s": 0.02, "max_reps": 25}


#: measure() stops before its budget once more repetitions cannot change much (both from
#: SETTLE_REPS interleaved repetitions on): when one path is CLEAR times faster than the
#: other at the decision threshold (the min over that many runs moved by under 10% between
#: such measurements on the project's VMs), or when the two sit within CLOSE of the
#: threshold: either choice then costs that layer at most ~CLOSE, and repeating until the
#: budget only decides between two nearly equal paths. (LeNet-300-100's fc1 at 63% kept,
#: with the IMP runner's budget: 41 repetitions, ~35 ms, for ratios of 0.91-0.93 against
#: a threshold of 0.91; 11 with this rule.)
SETTLE_REPS = 11
CLEAR = 1.2
CLOSE = 0.08


def _settled(ts: float, td: float) -> bool:
    r = ts * SPARSE_MARGIN / max(td, 1e-12)  # < 1: sparse chosen
    return r < 1 / CLEAR or r > CLEAR or abs(r - 1) < CLOSE


def measure(sparse_fn: Callable[[], object], dense_fn: Callable[[], object],
            budget_s: Optional[float] = None, max_reps: Optional[int] = None) -> Tuple[float, float]:
    """Min time of each callable over interleaved repetitions (after one warm-up each):
    as many as ``budget_s`` allows, at most ``max_reps`` and at least 3, fewer when the
    outcome has settled (SETTLE_REPS).

    The minimum, not the median: on a shared machine interference only ever adds time.
    """
    sparse_fn(), dense_fn()  # warm-up: allocator, first-touch, lazy initialisation
    ts, td = _time_once(sparse_fn), _time_once(dense_fn)
    per = max(ts + td, 1e-7)
    budget_s = MEASURE["budget_s"] if budget_s is None else budget_s
    max_reps = MEASURE["max_reps"] if max_reps is None else max_reps
    reps = max(3, min(max_reps, int(budget_s / per)))
    for k in range(2, reps + 1):
        ts = min(ts, _time_once(sparse_fn))
        td = min(td, _time_once(dense_fn))
        if k >= SETTLE_REPS and _settled(ts, td):
            break
    return ts, td


#: the sparse path must measure this much faster than the dense one to be chosen. Near the
#: crossover both paths are within a one-shot measurement's noise of each other (~10% on
#: the project's VM), and the dense path is the safe side: the bench_modules layer sweep
#: flagged layers where the sparse path had won its measurement by 6% and then ran 12%
#: slower (run 20261122T053957-90681a).
SPARSE_MARGIN = 1.1


def decide(key: tuple, sparse_fn: Callable[[], object], dense_fn: Callable[[], object]) -> str:
    """The cached choice for ``key``, measuring both paths the first time."""
    choice = _CHOICES.get(key)
    if choice is None:
        with torch.random.fork_rng(devices=[]):  # measuring must not shift the user's RNG stream
            t_sparse, t_dense = measure(sparse_fn, dense_fn)
        choice = "sparse" if t_sparse * SPARSE_MARGIN <= t_dense else "dense"
        _CHOICES[key] = choice
        _TIMINGS[key] = (t_sparse, t_dense)
    return choice


def resolve(module_mode: str) -> Optional[str]:
    """The forced mode for a module, or None when the measurement should decide."""
    if module_mode != "auto":
        return module_mode
    if _GLOBAL_MODE != "auto":
        return _GLOBAL_MODE
    return None
