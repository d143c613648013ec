"""What the single-thread A/B scripts share (ab_thread_time.py for the linear ops,
ab_conv_thread_time.py for the direct conv): the per-case timing of a worker process and
the driver that alternates one worker process per build."""
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


def median(vals):
    vals = sorted(vals)
    return vals[len(vals) // 2]


def run_alternating(script: str, pkgs: List[str], rounds: int, worker_args: Callable[[int], List[str]]
                    ) -> Dict[str, List[dict]]:
    """``rounds`` times, one ``script --worker --pkg P <worker_args(i)>`` process per build P
    (PYTHONPATH=P, in turn); each prints a JSON dict of case -> time. Returns {P: [dicts]}."""
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
