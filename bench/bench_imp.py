#!/usr/bin/env python
"""End-to-end IMP benchmarks (issue 4): accelerated vs dense-masked runs, the lottery-ticket
effect against its random-reinit control, and kill/resume.

    python bench/bench_imp.py speed --model lenet_300_100 --levels 15            # vs --baseline dense
    python bench/bench_imp.py speed --seed 1 --control-threads 1                  # + rounding control
    python bench/bench_imp.py speed --model conv4 --levels 10 --batch-size 64 --epochs 2
    python bench/bench_imp.py lottery --seeds 0,1,2                               # tickets vs random reinit
    python bench/bench_imp.py kill --kills 5                                      # SIGKILL at random points

``speed`` runs the same hyperparameters twice per repeat, sparse and ``--baseline dense``,
each in a fresh folder (nothing reused), in one process with their levels interleaved
(sparse level 0, dense level 0, dense level 1, sparse level 1, ...: the order flips at
every level and repeat); a contender's total is the time spent in its own levels and
between them (pruning, results). Per level it reports the median seconds of each and
their ratio, and the accuracy difference. With --control-threads the dense baseline runs
once more, untimed, at another thread count: the same experiment with other summation
orders, whose accuracy difference to the timed dense run (in imp.runs.json) is the size
of a difference that rounding alone makes. CSV:
bench/results/imp.csv (+ imp.runs.json with the machine and the command).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (add_malloc_arg, apply_malloc, command_line, new_run_id, pin_threads, read_csv, system_info,  # noqa: E402
                    update_runs_json)

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["run_id", "what", "model", "dataset", "seed", "level", "remaining", "sparse_s", "dense_s", "ratio",
          "sparse_test_acc", "dense_test_acc", "acc_diff_pp", "modes", "repeats", "threads"]


def _imp_args(a) -> list:
    args = ["--model", a.model, "--dataset", a.dataset, "--levels", str(a.levels), "--epochs", str(a.epochs),
            "--progress", "false", "--plots", "false", "--malloc", a.malloc]
    if a.batch_size:
        args += ["--batch-size", str(a.batch_size)]
    if a.lr is not None:
        args += ["--lr", str(a.lr)]
    return args + list(a.extra)


def _hp(a, out, **changes):
    from sparseticket.lottery.hparams import IMPHparams, add_arguments, from_args
    p = argparse.ArgumentParser()
    add_arguments(p)
    seed = [] if a.what != "speed" else ["--init-seed", str(a.seed), "--data-seed", str(a.seed)]
    hp = from_args(p.parse_args(_imp_args(a) + seed + ["--out", str(out)]))
    return hp.replace(**changes) if changes else hp


def _write_csv(rows, path: Path):
    import csv
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(r)


def speed(a) -> int:
    from sparseticket.lottery.runner import IMPRun
    run_id = new_run_id()
    per = {"sparse": [], "dense": []}
    # warm-up, untimed: the first run of a process pays oneDNN's kernel JIT and first-touch
    # costs (seconds on Conv-4), which would land on whichever contender goes first
    for baseline in ("sparse", "dense"):
        out = Path(tempfile.mkdtemp(prefix="bench_imp_warmup_"))
        IMPRun(_hp(a, out, baseline=baseline, levels=1, epochs=1)).run()
        shutil.rmtree(out, ignore_errors=True)
    for rep in range(a.repeats):
        outs = {b: Path(tempfile.mkdtemp(prefix=f"bench_imp_{b}_")) for b in ("sparse", "dense")}
        runs = {b: IMPRun(_hp(a, outs[b], baseline=b)).levels() for b in outs}
        rows = {b: [] for b in outs}
        wall = {b: 0.0 for b in outs}
        try:
            # level by level, the order flipping at every level and repeat: a slow phase of the
            # shared machine lands on both contenders instead of on whichever ran through it
            level, live = 0, set(outs)
            while live:
                order = ["sparse", "dense"] if (rep + level) % 2 == 0 else ["dense", "sparse"]
                for b in order:
                    if b not in live:
                        continue
                    gc.collect()  # the other contender's garbage is not this one's cost
                    t0 = time.perf_counter()
                    row = next(runs[b], None)
                    wall[b] += time.perf_counter() - t0
                    if row is None:
                        live.discard(b)
                    else:
                        rows[b].append(row)
                level += 1
        finally:
            for b in outs:
                runs[b].close()
                shutil.rmtree(outs[b], ignore_errors=True)
        for b in outs:
            per[b].append((rows[b], wall[b]))
            print(f"repeat {rep}: {b:6s} {wall[b]:8.1f} s", flush=True)
    levels = [r["level"] for r in per["sparse"][0][0]]
    out_rows = []
    for i, level in enumerate(levels):
        s = statistics.median(r[i]["seconds"] for r, _ in per["sparse"])
        d = statistics.median(r[i]["seconds"] for r, _ in per["dense"])
        sa = statistics.median(r[i]["test_acc"] for r, _ in per["sparse"])
        da = statistics.median(r[i]["test_acc"] for r, _ in per["dense"])
        first = per["sparse"][0][0][i]
        out_rows.append(dict(run_id=run_id, what="speed", model=a.model, dataset=a.dataset, seed=a.seed, level=level,
                             remaining=round(first["remaining"], 3), sparse_s=round(s, 4), dense_s=round(d, 4),
                             ratio=round(d / s, 3), sparse_test_acc=sa, dense_test_acc=da,
                             acc_diff_pp=round(100 * (sa - da), 2),
                             modes=" ".join(f"{k}:{v[0]}" for k, v in first["modes"].items()),
                             repeats=a.repeats, threads=a.threads))
    ts = statistics.median(w for _, w in per["sparse"])
    td = statistics.median(w for _, w in per["dense"])
    out_rows.append(dict(run_id=run_id, what="speed_total", model=a.model, dataset=a.dataset, seed=a.seed, level=-1,
                         remaining=None, sparse_s=round(ts, 3), dense_s=round(td, 3), ratio=round(td / ts, 3),
                         acc_diff_pp=max(abs(r["acc_diff_pp"]) for r in out_rows), repeats=a.repeats,
                         threads=a.threads))
    _report(out_rows)
    control = _rounding_control(a, out_rows) if a.control_threads else None
    _save(a, run_id, out_rows, rounding_control=control)
    return 0


def _rounding_control(a, rows) -> dict:
    """The dense baseline once more, untimed, at --control-threads threads: the same
    experiment with other floating-point summation orders (MKL and oneDNN split their
    sums by thread). Its accuracy difference to the timed dense run is how far two runs
    that differ only by rounding drift apart: the yardstick for the accelerated run's."""
    import torch
    from sparseticket.lottery.runner import IMPRun
    out = Path(tempfile.mkdtemp(prefix="bench_imp_control_"))
    before = torch.get_num_threads()
    torch.set_num_threads(a.control_threads)
    try:
        ctrl = IMPRun(_hp(a, out, baseline="dense")).run()
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(out, ignore_errors=True)
    dense = {r["level"]: r["dense_test_acc"] for r in rows if r["what"] == "speed"}
    per = [[c["level"], dense[c["level"]], c["test_acc"], round(100 * (c["test_acc"] - dense[c["level"]]), 2)]
           for c in ctrl if c["level"] in dense]
    worst = max(abs(p[3]) for p in per)
    print(f"rounding control (the dense baseline at {a.control_threads} thread(s) against {a.threads}): "
          f"per-level accuracy differences {' '.join(f'{p[3]:+.1f}' for p in per)} pp; largest {worst:.2f} pp")
    return dict(threads=a.control_threads, per_level=per, columns=["level", "dense_acc", "control_acc", "diff_pp"],
                largest_pp=worst)


def lottery(a) -> int:
    """Rewound tickets vs the same masks with fresh random weights, over seeds."""
    if a.plot_run:  # redraw the figure of an earlier run from the CSV
        rows = [dict(r, level=int(r["level"]), remaining=float(r["remaining"]),
                     sparse_test_acc=float(r["sparse_test_acc"]), dense_test_acc=float(r["dense_test_acc"]))
                for r in read_csv(a.csv) if r["run_id"] == a.plot_run and r["what"] == "lottery"]
        if not rows:
            raise SystemExit(f"no lottery rows of run {a.plot_run} in {a.csv}")
        a.seeds = sorted({r["seed"] for r in rows})
        _lottery_plot(a, rows)
        return 0
    from sparseticket.lottery.runner import IMPRun
    run_id = new_run_id()
    out = Path(tempfile.mkdtemp(prefix="bench_lottery_"))
    rows = []
    for seed in a.seeds:
        hp = _hp(a, out).replace(init_seed=seed, data_seed=seed)
        ticket = IMPRun(hp).run()
        reinit = {r["level"]: r for r in IMPRun(hp.replace(control="random_reinit")).run()}
        for r in ticket[1:]:
            c = reinit[r["level"]]
            rows.append(dict(run_id=run_id, what="lottery", model=a.model, dataset=a.dataset, seed=seed,
                             level=r["level"], remaining=round(r["remaining"], 3), sparse_test_acc=r["test_acc"],
                             dense_test_acc=c["test_acc"], acc_diff_pp=round(100 * (r["test_acc"] - c["test_acc"]), 2),
                             threads=a.threads))
    shutil.rmtree(out, ignore_errors=True)
    print(f"{'level':>5} {'remaining':>9} " + " ".join(f"{'seed ' + str(s) + ' ticket/reinit':>22}" for s in a.seeds))
    for level in sorted({r["level"] for r in rows}):
        lr = [r for r in rows if r["level"] == level]
        print(f"{level:5d} {lr[0]['remaining']:8.2f}% " + " ".join(
            f"{100 * r['sparse_test_acc']:10.2f} /{100 * r['dense_test_acc']:6.2f} ({r['acc_diff_pp']:+.1f})" for r in lr))
    low = [r for r in rows if r["remaining"] <= 10.0]
    wins = sum(r["acc_diff_pp"] > 0 for r in low)
    print(f"at <= 10% remaining: the ticket beats random reinit in {wins}/{len(low)} (level, seed) pairs; "
          f"mean margin {statistics.mean(r['acc_diff_pp'] for r in low):+.2f} pp" if low else "no level <= 10%")
    _lottery_plot(a, rows)
    _save(a, run_id, rows)
    return 0


def _lottery_plot(a, rows):
    from sparseticket.lottery import results as res
    levels = sorted({r["level"] for r in rows})
    mean = lambda key: [dict(level=l, remaining=statistics.mean(r["remaining"] for r in rows if r["level"] == l),
                             test_acc=statistics.mean(r[key] for r in rows if r["level"] == l)) for l in levels]
    png = res.plot_accuracy({f"rewound ticket (mean of {len(a.seeds)} seeds)": mean("sparse_test_acc"),
                             "random reinit": mean("dense_test_acc")},
                            Path(a.csv).with_name(f"lottery_{a.model}.png"), f"{a.model} on {a.dataset}")
    if png:
        print(f"plot: {png}")


def kill(a) -> int:
    """SIGKILL the CLI at random moments, resume each time; compare with an uninterrupted run."""
    rng = random.Random(a.kill_seed)
    base = Path(tempfile.mkdtemp(prefix="bench_kill_"))
    # a checkpoint after every epoch, so that kills land mid-level and resume from there
    cmd = [sys.executable, "-m", "sparseticket", "imp"] + _imp_args(a) + ["--kernels", "sparse",
                                                                         "--checkpoint-every", "0"]
    # the reference run, timed, and when it wrote its first checkpoint (the start-up before it:
    # imports, data, the first epoch)
    t0 = time.perf_counter()
    ref_p = subprocess.Popen(cmd + ["--out", str(base / "ref")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    startup = None
    while ref_p.poll() is None:
        if startup is None and any((base / "ref").glob("imp_*/level_*/checkpoint.pt")):
            startup = time.perf_counter() - t0
        time.sleep(0.01)
    full = time.perf_counter() - t0
    if ref_p.returncode != 0:
        raise SystemExit(f"reference run failed: {ref_p.stderr.read().decode()[-2000:]}")
    startup = full if startup is None else startup
    total_epochs = (a.levels + 1) * a.epochs
    killed = 0
    landed = []  # per kill: seconds after the (re)start, epochs checkpointed when it landed
    while True:
        p = subprocess.Popen(cmd + ["--out", str(base / "cut")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if killed < a.kills:
            # a random point of the next share of what is left of the run, so that the
            # kills spread over it (a resumed run skips the epochs done: delays drawn from
            # the whole run's length let the resumed runs finish before their kill)
            left = max(0.05, 1.0 - _epochs_done(base / "cut") / total_epochs)
            share = max(full - startup, 0.0) * left / (a.kills - killed + 1)
            delay = startup + rng.uniform(0.2, 1.0) * share
            try:
                p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait()
                killed += 1
                done = _epochs_done(base / "cut")
                landed.append([round(delay, 2), done])
                print(f"killed after {delay:.1f} s; {done} epochs checkpointed", flush=True)
                continue
        if p.wait() != 0:
            raise SystemExit("resumed run failed")
        break
    ref = json.loads(next((base / "ref").glob("imp_*/results.json")).read_text())
    cut = json.loads(next((base / "cut").glob("imp_*/results.json")).read_text())
    keys = ("level", "remaining", "train_acc", "test_acc", "steps")
    same = [{k: r[k] for k in keys} for r in ref] == [{k: r[k] for k in keys} for r in cut]
    import torch
    masks_same = all(all(torch.equal(torch.load(p / "mask.pt")[n], torch.load(q / "mask.pt")[n])
                         for n in torch.load(p / "mask.pt"))
                     for p, q in zip(sorted(next((base / "ref").glob("imp_*")).glob("level_*")),
                                     sorted(next((base / "cut").glob("imp_*")).glob("level_*"))))
    print(f"{killed} SIGKILLs; results identical: {same}; masks identical: {masks_same}")
    shutil.rmtree(base, ignore_errors=True)
    # recorded in runs.json (no CSV rows): what the kills hit and the verdict
    _save(a, new_run_id(), [], kill=dict(kills=killed, total_epochs=total_epochs,
                                         landed=landed, columns=["seconds_after_start", "epochs_checkpointed"],
                                         results_identical=same, masks_identical=masks_same))
    return 0 if same and masks_same else 1


def _epochs_done(root: Path) -> int:
    import torch
    n = 0
    for ck in root.glob("imp_*/level_*/checkpoint.pt"):
        try:
            n += len(torch.load(ck, weights_only=False)["log"])
        except Exception:
            pass
    return n


def _report(rows):
    print(f"{'level':>5} {'remaining':>9} {'sparse s':>9} {'dense s':>9} {'speedup':>8} {'acc diff':>9}  modes")
    for r in rows:
        if r["what"] == "speed":
            print(f"{r['level']:5d} {r['remaining']:8.2f}% {r['sparse_s']:9.2f} {r['dense_s']:9.2f} "
                  f"{r['ratio']:7.2f}x {r['acc_diff_pp']:+8.2f}pp  {r['modes']}")
        else:
            print(f"total wall-clock: {r['sparse_s']:.1f} s vs {r['dense_s']:.1f} s dense: {r['ratio']:.2f}x; "
                  f"largest accuracy difference {r['acc_diff_pp']:.2f} pp")


def _save(a, run_id, rows, **extra):
    path = Path(a.csv)
    _write_csv(rows, path)
    update_runs_json(path, run_id, command=command_line(), system=system_info(a.threads), what=a.what,
                     **{k: v for k, v in extra.items() if v is not None})
    print(f"run {run_id} -> {path}")


def table(a) -> int:
    """A recorded speed or lottery run as markdown (the tables BENCHMARKS.md quotes)."""
    if not a.run:
        raise SystemExit("table: give --run RUN_ID")
    if not os.path.exists(a.csv):
        raise SystemExit(f"table: no CSV at {a.csv}")
    rows = [r for r in read_csv(a.csv) if r["run_id"] == a.run]
    if not rows:
        raise SystemExit(f"table: no rows of run {a.run} in {a.csv}")
    speed = [r for r in rows if r["what"] == "speed"]
    if speed:
        print("| level | % weights left | sparse s | dense s | speedup | test acc sparse / dense | diff pp | "
              "layer paths (s: sparse, d: dense) |")
        print("| ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |")
        for r in speed:
            print(f"| {r['level']} | {float(r['remaining']):.1f} | {float(r['sparse_s']):.2f} | "
                  f"{float(r['dense_s']):.2f} | {float(r['ratio']):.2f}x | {100 * float(r['sparse_test_acc']):.1f} / "
                  f"{100 * float(r['dense_test_acc']):.1f} | {float(r['acc_diff_pp']):+.1f} | {r['modes']} |")
        for r in rows:
            if r["what"] == "speed_total":
                print(f"| total | | {float(r['sparse_s']):.1f} | {float(r['dense_s']):.1f} | **{float(r['ratio']):.2f}x** "
                      f"| largest difference | {float(r['acc_diff_pp']):.1f} | |")
    lot = [r for r in rows if r["what"] == "lottery"]
    if lot:
        seeds = sorted({int(r["seed"]) for r in lot})
        print("| level | % weights left | " + " | ".join(f"seed {s}: ticket / reinit (pp)" for s in seeds) + " |")
        print("| ---: | ---: | " + " | ".join("---" for _ in seeds) + " |")
        for level in sorted({int(r["level"]) for r in lot}):
            lr = {int(r["seed"]): r for r in lot if int(r["level"]) == level}
            first = next(iter(lr.values()))
            print(f"| {level} | {float(first['remaining']):.1f} | " + " | ".join(
                f"{100 * float(lr[s]['sparse_test_acc']):.1f} / {100 * float(lr[s]['dense_test_acc']):.1f} "
                f"({float(lr[s]['acc_diff_pp']):+.1f})" if s in lr else "–" for s in seeds) + " |")
        low = [r for r in lot if float(r["remaining"]) <= 10.0]
        if low:
            wins = sum(float(r["acc_diff_pp"]) > 0 for r in low)
            print(f"\nAt <= 10% of weights left the rewound ticket beats random reinitialisation in {wins} of "
                  f"{len(low)} (level, seed) pairs, by {statistics.mean(float(r['acc_diff_pp']) for r in low):+.2f} "
                  "pp on average.")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["speed", "lottery", "kill", "table"],
                    help="table: print a recorded run's markdown table (--run) from --csv; runs nothing")
    ap.add_argument("--run", help="table: the run id")
    ap.add_argument("--model", default="lenet_300_100")
    ap.add_argument("--dataset", default="mnist5k")
    ap.add_argument("--levels", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="speed: sparse/dense pairs (order alternates)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                    help="lottery: the seeds")
    ap.add_argument("--seed", type=int, default=0, help="speed: the initial weights' and data order's seed")
    ap.add_argument("--control-threads", type=int, default=0,
                    help="speed: also run the dense baseline once, untimed, at this many threads (other "
                         "summation orders) and report its accuracy difference to the timed one (0: no)")
    ap.add_argument("--plot-run", help="lottery: only redraw the figure of this run id from --csv")
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--kill-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    add_malloc_arg(ap)
    ap.add_argument("--csv", default=str(RESULTS / "imp.csv"))
    a, extra = ap.parse_known_args(argv)  # anything else is passed on to `sparseticket imp`
    a.extra = [x for x in extra if x != "--"]
    if a.what == "table":
        return table(a)
    apply_malloc(a.malloc)
    pin_threads(a.threads)
    return {"speed": speed, "lottery": lottery, "kill": kill}[a.what](a)


if __name__ == "__main__":
    sys.exit(main())
