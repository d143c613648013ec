"""bench/bench_modules.py --quick end to end on tiny batches: every part runs, every contender
passes its correctness check and is timed, and the CSV / runs.json hold the expected rows.

A subprocess, so the benchmark's thread pinning and sparse-layer choice cache stay out of
this test process; one thread, so another job on the machine does not turn every OpenMP
barrier into a wait (a few seconds in all).
"""
import csv
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_modules.py")


def test_bench_modules_quick(tmp_path):
    out = tmp_path / "modules.csv"
    cmd = [sys.executable, BENCH, "--quick", "--threads", "1", "--reps", "2", "--warmup-steps", "1",
           "--models", "lenet_300_100,conv4", "--batch", "2",
           "--layers", "fc300x100,conv128x128@14", "--layer-batch", "2", "--csv", str(out), "--markdown"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["part"], r["model"] or r["layer"], float(r["sparsity"]), r["contender"]) for r in rows}
    want = set()
    for m in ("lenet_300_100", "conv4"):
        want |= {("train_step", m, 0.9, c) for c in ("dense", "sparseticket", "sparseticket_sparse")}
        want |= {("neq_backward", m, 0.0, c) for c in ("dense", "dense_forward", "neq", "neq_forward",
                                                       "dense_backward", "neq_backward", "nowgrad",
                                                       "nowgrad_forward", "nowgrad_backward")}
    # the NEq LeNet runs as one chain node; its per-layer-node twin is a contender too
    want |= {("neq_backward", "lenet_300_100", 0.0, c) for c in ("neq_modules", "neq_modules_forward",
                                                                 "neq_modules_backward")}
    want.add(("train_step", "lenet_300_100", 0.9, "floor"))
    want.add(("train_step", "lenet_300_100", 0.9, "sparseticket_mlpstep"))
    for layer in ("fc300x100", "conv128x128@14"):
        want |= {("layer_step", layer, 0.9, c) for c in ("dense", "sparseticket")}
    assert got == want
    assert len(rows) == len(want)
    assert len({r["run_id"] for r in rows}) == 1

    for r in rows:
        assert r["correct"] == "ok", r
        assert float(r["median_ms"]) > 0 or r["contender"].endswith("_backward"), r
        assert r["threads"] == "1" and r["backend"]
        if r["contender"] != r["baseline"] and r["median_ms"] and "no bound" not in r["param"]:
            assert float(r["ratio_vs_baseline"]) > 0
    by = {(r["part"], r["model"] or r["layer"], r["contender"]): r for r in rows}
    for m in ("lenet_300_100", "conv4"):
        st = by[("train_step", m, "sparseticket")]
        assert st["target"] == ">=2x" and st["met"] in ("yes", "no")
        assert "fc1=" in st["layer_paths"] and "auto" not in st["layer_paths"]  # every layer chose a path
        assert float(st["flops_executed"]) < float(st["flops_dense_equiv"])
        assert by[("train_step", m, "sparseticket_sparse")]["layer_paths"].count("=sparse") >= 3
        neq = by[("neq_backward", m, "neq_backward")]
        assert float(neq["wgrad_flops_ratio"]) == 0.5  # every layer (output too) has an even width
        assert float(by[("neq_backward", m, "dense_backward")]["wgrad_flops_ratio"]) == 1.0
        assert neq["met"] in ("yes", "no")
        nw = by[("neq_backward", m, "nowgrad_backward")]
        assert float(nw["wgrad_flops_executed"]) == 0
        db, nb = float(by[("neq_backward", m, "dense_backward")]["median_ms"]), float(nw["median_ms"])
        if db > 0 and nb >= 0:  # differences of medians: two reps may make them anything
            assert float(nw["ratio_vs_baseline"]) == pytest.approx(db / (0.5 * nb + 0.5 * db), rel=1e-3)  # CSV: 6 digits
    assert float(by[("neq_backward", "lenet_300_100", "neq_modules_backward")]["wgrad_flops_ratio"]) == 0.5
    assert "a node per layer" in p.stdout
    for layer in ("fc300x100", "conv128x128@14"):
        assert by[("layer_step", layer, "sparseticket")]["met"] in ("yes", "no")

    runs = json.loads((tmp_path / "modules.runs.json").read_text())
    (entry,) = runs.values()
    assert "bench_modules.py" in entry["command"] and "--quick" in entry["command"]
    assert entry["system"]["threads"] == 1 and entry["finished"] and entry["failed"] == []
    git = entry["system"]["git"]  # the checkout measured (None only outside a git checkout)
    assert git is None or (len(git["commit"]) == 40 and isinstance(git["dirty"], bool))
    for heading in ("Whole training step", "NEq, half of each layer", "One layer's training step"):
        assert heading in p.stdout

    # the same tables again from the CSV alone (what BENCHMARKS.md quotes), and a clear
    # error for a run the CSV does not hold
    again = subprocess.run([sys.executable, BENCH, "--markdown-run", rows[0]["run_id"], "--csv", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    printed = p.stdout[p.stdout.index("### Whole training step"):]
    assert again.stdout.count("\n|") == printed.count("\n|") > 10
    for heading in ("Whole training step", "NEq, half of each layer", "One layer's training step"):
        assert heading in again.stdout
    missing = subprocess.run([sys.executable, BENCH, "--markdown-run", "no-such-run", "--csv", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no rows of run 'no-such-run'" in missing.stderr
