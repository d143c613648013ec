"""bench/bench_imp.py speed end to end on the scikit-learn digits (one level, one epoch):
both contenders run, the CSV holds a row per level plus the total with the requested
seed, and the rounding control's per-level accuracies land in runs.json (a subprocess,
so the benchmark's thread pinning stays out of this test process)."""
import csv
import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_imp.py")


def test_bench_imp_speed_with_seed_and_rounding_control(tmp_path):
    out = tmp_path / "imp.csv"
    cmd = [sys.executable, BENCH, "speed", "--dataset", "digits", "--levels", "1", "--epochs", "1", "--threads", "1",
           "--seed", "3", "--control-threads", "2", "--csv", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = list(csv.DictReader(open(out)))
    assert [(r["what"], r["level"]) for r in rows] == [("speed", "0"), ("speed", "1"), ("speed_total", "-1")]
    assert {r["seed"] for r in rows} == {"3"}
    run = json.loads((tmp_path / "imp.runs.json").read_text())[rows[0]["run_id"]]
    ctrl = run["rounding_control"]
    assert ctrl["threads"] == 2 and [lvl[0] for lvl in ctrl["per_level"]] == [0, 1]
    dense = {int(r["level"]): float(r["dense_test_acc"]) for r in rows if r["what"] == "speed"}
    for level, dense_acc, control_acc, diff in ctrl["per_level"]:
        assert dense_acc == dense[level] and 0 < control_acc <= 1
        assert abs(diff - 100 * (control_acc - dense_acc)) < 1e-6
    assert ctrl["largest_pp"] == max(abs(lvl[3]) for lvl in ctrl["per_level"])
    assert "rounding control" in p.stdout
