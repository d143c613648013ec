#!/usr/bin/env python
"""Benchmark of the 2x2, stride-2 max-pool: aten's NCHW kernel against sparseticket's.

    python bench/bench_pool.py                  # the pools of Conv-4/6 and VGG-11 at batch 64, 2 threads
    python bench/bench_pool.py --quick          # tiny shapes, seconds: checks the harness

Contenders, interleaved (common.bench_interleaved), on the same activations (ReLU of
normal noise: half the elements 0, so ties and unpredictable maxima, as in a real net):

* ``aten``     ``F.max_pool2d(x, 2)`` forward, or ``max_pool2d_with_indices_backward`` (baseline);
* ``sparseticket``  ``torch.ops.sparseticket.max_pool2x2`` / ``max_pool2x2_backward``.

Both results are checked bit for bit against aten's before timing. Ops: ``pool_fwd``
and ``pool_bwd``. Rows go to ``--csv`` (default bench/results/pool.csv) with the common
columns: B = batch, I = O = channels, param = HxW; no FLOPs (a pool is memory-bound).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from early_threads import early_threads  # noqa: E402  (torch-free)

if __name__ == "__main__":
    early_threads(sys.argv[1:])

import argparse  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparseticket  # noqa: E402

# (N, C, H, W): Conv-4/6 on MNIST (28 -> 14 -> 7) and CIFAR (32 -> 16 -> 8), and an ImageNet-sized one
SHAPES_FULL = [(64, 64, 28, 28), (64, 128, 14, 14), (64, 64, 32, 32), (64, 128, 16, 16), (64, 256, 8, 8),
               (16, 64, 112, 112)]
SHAPES_QUICK = [(2, 3, 9, 8), (4, 8, 14, 14)]


def run_shape(args, writer, shape, results):
    N, C, H, W = shape
    x = torch.relu(torch.randn(shape))
    ST = torch.ops.sparseticket
    y, where = ST.max_pool2x2(x)
    y_ref, idx = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
    gy = torch.randn(y.shape)
    ok_fwd = torch.equal(y, y_ref)
    gx_ref = torch.ops.aten.max_pool2d_with_indices_backward(gy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx)
    ok_bwd = torch.equal(ST.max_pool2x2_backward(gy, where, list(x.shape)), gx_ref)
    clock = time.thread_time_ns if args.clock == "thread" else time.perf_counter_ns
    cases = {
        "pool_fwd": ({"aten": lambda: F.max_pool2d(x, 2), "sparseticket": lambda: ST.max_pool2x2(x)}, ok_fwd),
        "pool_bwd": ({"aten": lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                          gy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, idx),
                      "sparseticket": lambda: ST.max_pool2x2_backward(gy, where, list(x.shape))}, ok_bwd),
    }
    for op, (contenders, ok) in cases.items():
        if op not in args.ops:
            continue
        stats = common.bench_interleaved(contenders, reps=args.reps, warmup=args.warmup,
                                         min_sample_ms=args.min_sample_ms, clock=clock)
        base = stats["aten"].median_ms
        print(f"{op:9s} {N}x{C}x{H}x{W}")
        for name, st in stats.items():
            ratio = base / st.median_ms if st.median_ms > 0 else None
            correct = "ok" if (name == "aten" or ok) else "MISMATCH"
            row = writer.write(op=op, B=N, I=C, O=C, sparsity=0.0, param=f"{H}x{W}", contender=name,
                               variant=args.clock, baseline="aten", correct=correct, median_ms=st.median_ms,
                               p25_ms=st.p25_ms, p75_ms=st.p75_ms, iqr_ms=st.p75_ms - st.p25_ms, reps=st.reps,
                               inner=st.inner, ratio_vs_baseline=ratio)
            results.append(row)
            print(f"  {name:13s} {st.median_ms:8.3f} ms  IQR {st.p75_ms - st.p25_ms:6.3f}  "
                  f"{common.fmt_ratio(ratio):>7s} vs aten  {correct}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    common.add_malloc_arg(p)
    p.add_argument("--ops", type=lambda s: s.split(","), default=["pool_fwd", "pool_bwd"])
    p.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")],
                   default=None, help="NxCxHxW,...")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-sample-ms", type=float, default=20.0)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="thread: this thread's CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "pool.csv"))
    args = p.parse_args(argv)
    bad = [o for o in args.ops if o not in ("pool_fwd", "pool_bwd")]
    if bad:
        p.error(f"unknown ops {bad}; choose from pool_fwd, pool_bwd")
    common.apply_malloc(args.malloc)
    seen = common.pin_threads(args.threads)
    shapes = args.shapes or (SHAPES_QUICK if args.quick else SHAPES_FULL)
    if args.quick:
        args.reps, args.min_sample_ms = min(args.reps, 3), min(args.min_sample_ms, 2.0)
    run_id = common.new_run_id()
    writer = common.CsvWriter(args.csv, run_id, dict(backend=sparseticket.ops.BACKENDS.get("cpu"),
                                                     torch_version=torch.__version__, threads=args.threads))
    info = common.system_info(args.threads, {"threads_seen": seen})
    print(common.format_system_info(info))
    results = []
    for shape in shapes:
        run_shape(args, writer, shape, results)
    common.update_runs_json(args.csv, run_id, command=common.command_line(argv), system=info, clock=args.clock)
    return results


if __name__ == "__main__":
    main()
