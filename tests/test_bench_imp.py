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


def test_bench_imp_table_from_csv(tmp_path):
    """`table --run` prints a recorded speed run's per-level table and total, and a lottery
    run's per-seed table with the <= 10% summary, from the CSV alone."""
    out = tmp_path / "imp.csv"
    fields = ["run_id", "what", "model", "dataset", "seed", "level", "remaining", "sparse_s", "dense_s", "ratio",
              "sparse_test_acc", "dense_test_acc", "acc_diff_pp", "modes", "repeats", "threads"]
    rows = [dict(run_id="S", what="speed", level=0, remaining=100.0, sparse_s=1.0, dense_s=1.0, ratio=1.0,
                 sparse_test_acc=0.95, dense_test_acc=0.95, acc_diff_pp=0.0, modes=""),
            dict(run_id="S", what="speed", level=1, remaining=8.0, sparse_s=0.25, dense_s=1.0, ratio=4.0,
                 sparse_test_acc=0.94, dense_test_acc=0.93, acc_diff_pp=1.0, modes="fc1:s fc2:d"),
            dict(run_id="S", what="speed_total", level=-1, sparse_s=1.25, dense_s=2.0, ratio=1.6, acc_diff_pp=1.0)]
    rows += [dict(run_id="L", what="lottery", seed=s, level=lvl, remaining=rem, sparse_test_acc=0.94,
                  dense_test_acc=acc, acc_diff_pp=round(100 * (0.94 - acc), 2))
             for s in (0, 1) for lvl, rem, acc in ((1, 80.0, 0.95), (2, 9.0, 0.92 + 0.03 * s))]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    speed = subprocess.run([sys.executable, BENCH, "table", "--run", "S", "--csv", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert speed.returncode == 0, speed.stderr[-3000:]
    assert "| 1 | 8.0 | 0.25 | 1.00 | 4.00x | 94.0 / 93.0 | +1.0 | fc1:s fc2:d |" in speed.stdout
    assert "| total | | 1.2 | 2.0 | **1.60x** |" in speed.stdout or "| total | | 1.3 | 2.0 | **1.60x** |" in speed.stdout
    lot = subprocess.run([sys.executable, BENCH, "table", "--run", "L", "--csv", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert lot.returncode == 0, lot.stderr[-3000:]
    assert "| 2 | 9.0 | 94.0 / 92.0 (+2.0) | 94.0 / 95.0 (-1.0) |" in lot.stdout
    assert "in 1 of 2 (level, seed) pairs, by +0.50 pp on average" in lot.stdout
    missing = subprocess.run([sys.executable, BENCH, "table", "--run", "nope", "--csv", str(out)],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0 and "no rows of run nope" in missing.stderr
