"""What the A/B scripts share: for the single-thread ones across builds (ab_thread_time.py
for the linear ops, ab_conv_thread_time.py for the direct conv) the per-case timing of a
worker process and the driver that alternates one worker process per build; for the
in-process ones (ab_step_paths.py, ab_serial_work.py) the interleaved block timing."""
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List


def thread_time_median(fn: Callable[[], object], samples: int, sample_s: float, warmup: int = 3) -> float:
    """Median seconds per call of ``fn`` over ``samples`` samples of this thread's CPU time,
    each of enough calls to last about ``sample_s``."""
    for _ in range(warmup):
        fn()
    t0 = time.thread_time_ns()
    fn()
    one = max(time.thread_time_ns() - t0, 1000)
    inner = max(1, int(sample_s * 1e9 / one))
    vals = []
    for _ in range(samples):
        t0 = time.thread_time_ns()
        for _ in range(inner):
            fn()
        vals.append((time.thread_time_ns() - t0) / inner / 1e9)
    return median(vals)


def interleaved_blocks(contenders: Dict[object, Callable[[], object]], rounds: int, steps: int,
                       warmup: int = 0, before: Callable[[object], None] = None) -> Dict[object, float]:
    """Median microseconds per call of each contender, timed in blocks of ``steps`` calls
    that alternate between the contenders, the order reversed every round (a drift of the
    machine lands on all of them). ``warmup`` untimed calls precede each block;
    ``before(key)`` runs before each block (e.g. to flip a run-time setting)."""
    keys = list(contenders)
    res = {k: [] for k in keys}
    for r in range(rounds):
        for k in (keys if r % 2 else keys[::-1]):
            if before is not None:
                before(k)
            f = contenders[k]
            for _ in range(warmup):
                f()
            t = time.perf_counter()
            for _ in range(steps):
                f()
            res[k].append((time.perf_counter() - t) / steps * 1e6)
    return {k: median_mean2(v) for k, v in res.items()}


def median_mean2(vals):
    """The median (the mean of the two middle values for an even count, as statistics.median)."""
    vals = sorted(vals)
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def median(vals):
    vals = sorted(vals)
    return vals[len(vals) // 2]


def run_alternating(script: str, pkgs: List[str], rounds: int, worker_args: Callable[[int], List[str]]
                    ) -> Dict[str, List[dict]]:
    """``rounds`` times, one ``script --worker --pkg P <worker_args(i)>`` process per build P
    (PYTHONPATH=P, in turn); each prints a JSON dict of case -> time. Returns {P: [dicts]}."""
    if len(set(pkgs)) != len(pkgs):
        sys.exit(f"--pkg must name different builds, got {pkgs}")
    res = {p: [] for p in pkgs}
    for rnd in range(rounds):
        for i, p in enumerate(pkgs):
            cmd = [sys.executable, os.path.abspath(script), "--worker", "--pkg", p] + worker_args(i)
            r = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=p), capture_output=True, text=True, cwd="/tmp")
            if r.returncode:
                sys.exit(r.stderr)
            res[p].append(json.loads(r.stdout))
            print(f"round {rnd} {p} done", file=sys.stderr)
    return res


def add_case_args(ap, shapes, dens, ops, shapes_help: str) -> None:
    """The arguments both scripts take besides their sample length: builds, rounds, cases."""
    ap.add_argument("--pkg", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")],
                    default=shapes, help=shapes_help)
    ap.add_argument("--dens", type=lambda s: [float(v) for v in s.split(",")], default=dens)
    ap.add_argument("--ops", type=lambda s: s.split(","), default=ops)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--dense", type=int, default=1)
    ap.add_argument("--json")


def case_argv(args, i: int, sample_flag: str, sample_value: float) -> List[str]:
    """The worker arguments for build number i (only the first build's workers time dense)."""
    return ["--samples", str(args.samples), sample_flag, str(sample_value), "--dense", "1" if i == 0 else "0",
            "--shapes", ",".join("x".join(map(str, s)) for s in args.shapes),
            "--dens", ",".join(map(str, args.dens)), "--ops", ",".join(args.ops)]
