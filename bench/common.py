"""Timing, correctness and reporting utilities shared by sparseticket's benchmarks.

Method (STYLE.md item 10, after xformers ``benchmarks/utils.py`` and Liger-Kernel's
benchmark guidelines):

* threads are pinned (``pin_threads``) for torch, MKL and every OpenMP runtime loaded
  in the process (the peers ship their own), so every contender gets the same cores;
* every contender is checked against the dense result *before* it is timed
  (``check_close``): a wrong kernel is reported as such and never timed;
* contenders are **interleaved**: each repetition runs every contender once (in a
  rotating order), so frequency or load drift hits all of them alike; one sample is
  ``inner`` back-to-back calls, with ``inner`` calibrated so a sample lasts at least
  ``min_sample_ms`` (timer resolution and Python overhead stay negligible);
* we report the median and the inter-quartile range of the per-call time, FLOP/s and
  the ratio to the baseline measured **in the same run** (``baseline_ms / ms``, so
  >1 means faster than the baseline).

FLOP accounting (both are written to the CSV):

* ``gflops_executed``: FLOPs the contender actually performs / time (a sparse kernel
  doing 2·B·nnz multiply-adds is credited with 2·B·nnz), i.e. how well it uses the
  machine;
* ``gflops_dense_equiv``: the dense problem's FLOPs (2·B·I·O) / time, i.e. the
  "effective" throughput; its ratio between two contenders is their speedup.
"""
from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import socket
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

# ----------------------------------------------------------------------------- threads


def set_thread_env(n: int) -> None:
    """Set the thread-count variables. Only effective before an OpenMP/MKL runtime is
    loaded, so scripts call this before ``import torch`` (see bench_kernels.py)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)


def loaded_openmp_runtimes() -> List[str]:
    """Paths of the OpenMP runtimes mapped into this process (torch's libgomp, a peer's
    bundled copy, ...). Each keeps its own thread count."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if "/" in line else ""
                name = os.path.basename(path)
                if name.startswith(("libgomp", "libiomp", "libomp")) and ".so" in name:
                    libs.add(path)
    except OSError:
        pass
    return sorted(libs)


def pin_threads(n: int) -> Dict[str, int]:
    """Use ``n`` threads in torch (intra-op, MKL) and in every loaded OpenMP runtime.

    Call again after importing a library that brings its own runtime. Returns
    {runtime: omp_get_max_threads()} so the report shows what each one will use.
    """
    set_thread_env(n)
    torch.set_num_threads(n)
    seen = {"torch": torch.get_num_threads()}
    for path in loaded_openmp_runtimes():
        try:
            lib = ctypes.CDLL(path)
            lib.omp_set_num_threads(ctypes.c_int(n))
            seen[os.path.basename(path)] = int(lib.omp_get_max_threads())
        except (OSError, AttributeError):
            seen[os.path.basename(path)] = -1
    return seen


def add_malloc_arg(ap) -> None:
    ap.add_argument("--malloc", choices=["retain", "default"], default="retain",
                    help="glibc allocator for every contender alike: 'retain' keeps freed blocks for reuse "
                         "(sparseticket.runtime.retain_freed_memory: no per-step page faults), 'default' "
                         "leaves glibc's (the setting of runs before session 4)")


def apply_malloc(mode: str) -> str:
    """Set the allocator mode of this process (see add_malloc_arg); returns what is in effect."""
    try:
        from sparseticket import runtime
    except ImportError:  # the harness still measures torch and peers
        return "default"
    return runtime.set_malloc(mode)


def _malloc_mode() -> str:
    try:
        from sparseticket import runtime
        return runtime.malloc_mode()
    except ImportError:
        return "unknown"


# ----------------------------------------------------------------------------- timing


@dataclass
class Stats:
    """Per-call time of one contender, over ``reps`` samples of ``inner`` calls each."""

    median_ms: float
    p25_ms: float
    p75_ms: float
    reps: int
    inner: int

    @property
    def iqr_ms(self) -> float:
        return self.p75_ms - self.p25_ms


def _quartiles(xs: Sequence[float]):
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def _time_calls(fn: Callable[[], object], inner: int, clock: Callable[[], int] = time.perf_counter_ns) -> float:
    t0 = clock()
    for _ in range(inner):
        fn()
    return (clock() - t0) / 1e6 / inner


def bench_interleaved(contenders: Dict[str, Callable[[], object]], reps: int = 15, warmup: int = 3,
                      min_sample_ms: float = 20.0, max_inner: int = 1000,
                      clock: Callable[[], int] = time.perf_counter_ns) -> Dict[str, Stats]:
    """Time ``contenders`` (name -> zero-argument callable) round-robin.

    Each contender is warmed up (``warmup`` calls), then ``inner`` is calibrated so a
    sample lasts >= ``min_sample_ms``; then for each of ``reps`` repetitions every
    contender is sampled once, the starting contender rotating per repetition.
    ``clock`` (ns) is wall time by default; ``time.thread_time_ns`` counts only this
    thread's CPU time, which other processes on a shared machine disturb far less (only
    meaningful with one thread).
    """
    names = list(contenders)
    inner: Dict[str, int] = {}
    for name in names:
        fn = contenders[name]
        for _ in range(warmup):
            fn()
        t = max(_time_calls(fn, 1, clock), 1e-4)
        inner[name] = int(min(max_inner, max(1, math.ceil(min_sample_ms / t))))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one contender's sample would bill it alone
    try:
        for r in range(reps):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                samples[name].append(_time_calls(contenders[name], inner[name], clock))
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {}
    for name in names:
        p25, med, p75 = _quartiles(samples[name])
        out[name] = Stats(med, p25, p75, reps, inner[name])
    return out


def gflops(flops: Optional[float], ms: Optional[float]) -> Optional[float]:
    if flops is None or ms is None or ms <= 0 or (isinstance(ms, float) and math.isnan(ms)):
        return None
    return flops / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- correctness


def check_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4, atol_scale: float = 1e-4) -> Optional[str]:
    """None if ``out`` matches ``ref``; else a one-line reason.

    The absolute tolerance scales with ``max|ref|`` (fp32 sums over thousands of terms
    in a different order differ by ~1e-6 of that), which still flags any wrong index,
    missing row or dropped term: those are O(1) relative errors.
    """
    if out is None:
        return "returned None"
    if tuple(out.shape) != tuple(ref.shape):
        return f"shape {tuple(out.shape)} != expected {tuple(ref.shape)}"
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if not torch.isfinite(out).all():
        return "non-finite values"
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    atol = atol_scale * max(scale, 1e-30)
    err = (out - ref).abs()
    bad = err > atol + rtol * ref.abs()
    if bool(bad.any()):
        return f"max abs err {float(err.max()):.3g} (max|ref| {scale:.3g}, {int(bad.sum())} bad of {ref.numel()})"
    return None


# ----------------------------------------------------------------------------- system info


ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
             "avx512_bf16", "amx_tile", "neon", "asimd")


def _cpu_model_and_flags():
    model, flags, ident = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = val.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(val.split())
                elif key in ("cpu family", "model", "stepping") and key not in ident:
                    ident[key] = val.strip()
    except OSError:
        pass
    # (a VM's model name can be just "AMD EPYC": family/model tell Zen 1 from Zen 4)
    if ident:
        model += f" (family {ident.get('cpu family', '?')}, model {ident.get('model', '?')}, " \
                 f"stepping {ident.get('stepping', '?')})"
    return model, [f for f in ISA_FLAGS if f in flags]


def _git_state() -> Optional[dict]:
    """The checkout the run measured: HEAD and whether tracked files (other than the
    results themselves) differ from it."""
    import subprocess
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                  ".", ":!bench/results"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": bool(changed.strip())} if head else None


def system_info(threads: int, extra: Optional[dict] = None) -> dict:
    """What a reader needs to judge the numbers: CPU, ISA, torch, threads, load."""
    model, isa = _cpu_model_and_flags()
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        cap = "unknown"
    info = {
        "cpu": model,
        "isa": isa,
        "cores_online": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": cap,
        "torch_blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "threads": threads,
        "torch_threads": torch.get_num_threads(),
        "malloc": _malloc_mode(),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "git": _git_state(),
        "loadavg_1m_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        # the knobs that change how OpenMP/MKL threads wait or which kernels they pick
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("OMP_", "MKL_", "GOMP_", "KMP_", "OPENBLAS_", "ATEN_", "SPARSETICKET_"))},
    }
    try:
        import sparseticket
        info["sparseticket"] = getattr(sparseticket, "__version__", "?")
        info["sparseticket_backend_cpu"] = sparseticket.BACKENDS.get("cpu")
        info["sparseticket_extension_error"] = sparseticket.ops.EXTENSION_ERROR
    except Exception as e:  # the harness still reports dense/torch.sparse/peers
        info["sparseticket"] = f"import failed: {e}"
    if extra:
        info.update(extra)
    return info


def format_system_info(info: dict) -> str:
    lines = [
        f"CPU: {info.get('cpu')} ({info.get('cores_online')} cores online); ISA: {' '.join(info.get('isa', []))}",
        f"torch {info.get('torch')} (kernels: {info.get('torch_cpu_capability')}, BLAS: {info.get('torch_blas')}); "
        f"threads: {info.get('threads')}; malloc: {info.get('malloc')}; python {info.get('python')}",
        f"sparseticket {info.get('sparseticket')} backend: {info.get('sparseticket_backend_cpu')}"
        + (f" ({info['sparseticket_extension_error']})" if info.get("sparseticket_extension_error") else ""),
    ]
    if info.get("git"):
        lines.append(f"checkout: {info['git']['commit'][:12]}" + (" with uncommitted changes" if info["git"]["dirty"] else ""))
    if info.get("env"):
        lines.append("environment: " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    if info.get("openmp_threads"):
        lines.append("OpenMP runtimes -> threads: " + ", ".join(f"{k}={v}" for k, v in info["openmp_threads"].items()))
    if info.get("loadavg_1m_at_start") is not None:
        end = info.get("loadavg_1m_at_end")
        lines.append(f"load average (1 min) at start: {info['loadavg_1m_at_start']:.2f}"
                     + (f", at end: {end:.2f}" if end is not None else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CSV + run metadata

CSV_FIELDS = [
    "run_id", "timestamp", "op", "B", "I", "O", "sparsity", "param", "contender", "variant", "baseline", "correct",
    "median_ms", "p25_ms", "p75_ms", "iqr_ms", "reps", "inner",
    "flops_executed", "flops_dense_equiv", "gflops_executed", "gflops_dense_equiv", "ratio_vs_baseline",
    "backend", "torch_version", "threads",
]


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def command_line(argv: Optional[Sequence[str]] = None) -> str:
    """The command as it could be re-typed, with the environment switches that matter."""
    argv = list(sys.argv if argv is None else argv)
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("SPARSETICKET_NO_EXT", "PYTHONPATH") if os.environ.get(k)]
    return " ".join(env + ["python"] + [shlex.quote(a) for a in argv])


def runs_json_path(csv_path) -> Path:
    """Sidecar with one entry per run (command line, system info, crossovers)."""
    p = Path(csv_path)
    return p.with_name(p.stem + ".runs.json")


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return str(v)


class CsvWriter:
    """Appends result rows to ``path`` (header written once), flushing each row so an
    interrupted run keeps what it measured."""

    def __init__(self, path, run_id: str, common: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.common = dict(common)
        self.rows: List[dict] = []
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, newline="") as f:
                header = next(csv.reader(f), [])
            if header != CSV_FIELDS:
                raise SystemExit(f"bench: {self.path} has another column layout; pass --csv with a new path "
                                 f"(or move the old file away)")
            self._new = False
        else:
            self._new = True

    def write(self, **row) -> dict:
        full = {k: None for k in CSV_FIELDS}
        full.update(self.common)
        full.update(run_id=self.run_id, timestamp=_dt.datetime.now().isoformat(timespec="seconds"))
        full.update(row)
        unknown = set(full) - set(CSV_FIELDS)
        if unknown:
            raise KeyError(f"unknown CSV columns {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            if self._new:
                w.writeheader()
                self._new = False
            w.writerow({k: _fmt(v) for k, v in full.items()})
        self.rows.append(full)
        return full


def update_runs_json(csv_path, run_id: str, **fields) -> None:
    """Create or update this run's entry in the sidecar JSON."""
    path = runs_json_path(csv_path)
    runs = {}
    if path.exists():
        try:
            runs = json.loads(path.read_text())
        except json.JSONDecodeError:
            runs = {}
    entry = runs.setdefault(run_id, {"run_id": run_id})
    entry.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(runs, indent=1, default=str))
    tmp.replace(path)


def read_csv(path) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_runs_json(csv_path) -> dict:
    path = runs_json_path(csv_path)
    return json.loads(path.read_text()) if path.exists() else {}


# ----------------------------------------------------------------------------- printing


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence], align: Optional[str] = None) -> str:
    """``align``: one char per column, 'l' or 'r' (default: first left, rest right)."""
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    align = align or ("l" + "r" * (len(headers) - 1))
    sep = ["---" if a == "l" else "---:" for a in align]
    out = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def fmt_ms(ms) -> str:
    if ms is None or (isinstance(ms, float) and math.isnan(ms)):
        return "–"
    ms = float(ms)
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_ratio(r) -> str:
    if r is None or r == "" or (isinstance(r, float) and math.isnan(r)):
        return "–"
    return f"{float(r):.2f}x"
