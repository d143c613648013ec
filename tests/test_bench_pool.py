"""bench/bench_pool.py --quick end to end: both ops on both contenders, each checked bit
for bit against aten before it is timed, rows in the CSV and the run in runs.json.
(A subprocess with one thread, as tests/test_bench_modules.py.)"""
import csv
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_pool.py")


def test_bench_pool_quick(tmp_path):
    from sparseticket import ops
    if ops.BACKENDS.get("cpu") != "c++":
        pytest.skip("compiled kernels not built")
    out = tmp_path / "pool.csv"
    p = subprocess.run([sys.executable, BENCH, "--quick", "--threads", "1", "--csv", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["op"], r["B"], r["I"], r["param"], r["contender"]) for r in rows}
    want = {(op, str(n), str(c), f"{h}x{w}", who) for op in ("pool_fwd", "pool_bwd") for (n, c, h, w) in
            ((2, 3, 9, 8), (4, 8, 14, 14)) for who in ("aten", "sparseticket")}
    assert got == want
    assert all(r["correct"] == "ok" and float(r["median_ms"]) > 0 for r in rows)
    runs = json.loads((tmp_path / "pool.runs.json").read_text())
    assert len(runs) == 1 and "bench_pool.py" in next(iter(runs.values()))["command"]
