#!/usr/bin/env python
"""Benchmark of the direct sparse convolution against oneDNN's dense conv and the im2col path.

    python bench/bench_conv.py                       # Conv-4 shapes x sparsities 0..99%, 2 threads
    python bench/bench_conv.py --quick               # tiny shapes, seconds: checks the harness
    python bench/bench_conv.py --threads 1 --clock thread --ops fwd --sparsities 90,98

Shapes (batch N, in C, out O, spatial HxW; 3x3, stride 1, padding 1, fp32) are the conv
layers of Conv-4 on MNIST at batch 64: 64->64 @28x28, 64->128 and 128->128 @14x14. The
weight keeps exactly round((1-s)·O·C·9) entries at uniformly random positions.

Contenders, interleaved (common.bench_interleaved), each checked against a float64
reference first (the references of sparseticket/ops/reference.py):

* ``dense``   oneDNN ``F.conv2d`` / ``torch.nn.grad`` with the masked dense weight (baseline);
* ``im2col``  SparseConv2d's previous sparse path (blocked channels-last im2col + the
              ticket spmm/sddmm kernels; still used for groups > 1);
* ``direct``  ``sparseticket::sparse_conv2d`` and its gradient ops.

Ops: ``fwd`` (y), ``grad_input`` (gx from gy), ``grad_weight`` (kept-weight gradient;
dense: the full weight gradient), ``fwd_bwd`` (y, then gx and the weight gradient
through autograd), and ``conv4_step``: one training step (forward, cross-entropy,
backward, SGD with momentum 0.9) of the whole Conv-4 net (convs 1->64->64, pool,
64->128->128, pool, FC 6272->256->256->10) on a batch of 64 MNIST-sized inputs: dense
nn.Module + torch.optim.SGD vs ``sparsify(amount=s, scope='layerwise')`` (every layer at
sparsity s, mode 'auto', measured during warm-up) + MaskedSGD. Rows go to ``--csv`` (default bench/results/conv.csv) with the
common columns: B = batch, I = in channels, O = out channels, param = geometry.
"""
from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from early_threads import early_threads  # noqa: E402  (torch-free)

if __name__ == "__main__":
    early_threads(sys.argv[1:])

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from common import bench_interleaved, check_close, gflops  # noqa: E402

import sparseticket  # noqa: E402
from sparseticket.nn.conv import _BlockedSparseConv2d  # noqa: E402
from sparseticket.ops import reference as ref  # noqa: E402

SHAPES_FULL = [(64, 64, 64, 28, 28), (64, 64, 128, 14, 14), (64, 128, 128, 14, 14)]
SHAPES_QUICK = [(4, 8, 16, 9, 9), (3, 16, 8, 7, 5)]
SPARSITIES_FULL = [0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99]
SPARSITIES_QUICK = [0.0, 0.9, 1.0]
OPS = ["fwd", "grad_input", "grad_weight", "fwd_bwd"]
MODEL_OPS = ["conv4_step"]
KS, ST, PAD, DIL = (3, 3), (1, 1), (1, 1), (1, 1)


def make_ticket(C, O, sparsity, gen):
    """Dense masked weight [O, C, 3, 3] with exactly round((1-s)·numel) kept entries, and its ticket."""
    n = O * C * 9
    keep = round((1 - sparsity) * n)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:keep]] = True
    mask = mask.view(O, C, 3, 3)
    w = torch.randn(O, C, 3, 3, generator=gen) * mask
    ops = sparseticket.ops
    w2d, m2d = w.permute(0, 2, 3, 1).reshape(O, -1).contiguous(), mask.permute(0, 2, 3, 1).reshape(O, -1).contiguous()
    values, crow, col = ops.dense_to_ticket(w2d, m2d)
    ccol, row, perm = ops.ticket_transpose(crow, col, 9 * C)
    return w, m2d, values, (crow, col, ccol, row, perm)


def run_shape(args, writer, shape, sparsity, results):
    N, C, O, H, W = shape
    gen = torch.Generator().manual_seed(0)
    w, m2d, values, t = make_ticket(C, O, sparsity, gen)
    crow, col, ccol, row, perm = t
    nnz = values.numel()
    x = torch.randn(N, C, H, W, generator=gen)
    bias = torch.randn(O, generator=gen)
    conf = (KS, ST, PAD, DIL)
    v64 = values.double()
    y64 = ref.reference_sparse_conv2d(x.double(), v64, *t, bias.double(), None, *conf)
    oh, ow = y64.shape[2:]
    gy = torch.randn(N, O, oh, ow, generator=gen)
    gx64 = ref.reference_sparse_conv2d_grad_input(gy.double(), v64, crow, col, list(x.shape), *conf)
    gv64 = ref.reference_sparse_conv2d_grad_weight(gy.double(), x.double(), ccol, row, perm, None, *conf)
    geom = (KS, ST, PAD, DIL, oh, ow)
    op_ = torch.ops.sparseticket
    dense_flops = 2.0 * N * oh * ow * O * C * 9
    sparse_flops = 2.0 * N * oh * ow * nnz
    param = f"{H}x{W} k3 s1 p1"

    def fwd_bwd(run, leaves):
        def go():
            for leaf in leaves:
                leaf.grad = None
            run().backward(gy)
        return go

    xg = x.clone().requires_grad_()
    wg = w.clone().requires_grad_()
    vg = values.clone().requires_grad_()
    bg = bias.clone().requires_grad_()
    groups = {
        "fwd": dict(
            dense=(lambda: F.conv2d(x, w, bias, ST, PAD, DIL), dense_flops),
            im2col=(lambda: _BlockedSparseConv2d.apply(x, values, bias, crow, col, ccol, row, perm, None, geom),
                    sparse_flops),
            direct=(lambda: op_.sparse_conv2d(x, values, *t, bias, None, KS, ST, PAD, DIL), sparse_flops)),
        "grad_input": dict(
            dense=(lambda: torch.nn.grad.conv2d_input(x.shape, w, gy, ST, PAD, DIL), dense_flops),
            direct=(lambda: op_.sparse_conv2d_grad_input(gy, values, crow, col, list(x.shape), KS, ST, PAD, DIL),
                    sparse_flops)),
        "grad_weight": dict(
            dense=(lambda: torch.nn.grad.conv2d_weight(x, w.shape, gy, ST, PAD, DIL), dense_flops),
            direct=(lambda: op_.sparse_conv2d_grad_weight(gy, x, ccol, row, perm, None, KS, ST, PAD, DIL),
                    sparse_flops)),
        "fwd_bwd": dict(
            dense=(fwd_bwd(lambda: F.conv2d(xg, wg, bg, ST, PAD, DIL), (xg, wg, bg)), 3 * dense_flops),
            im2col=(fwd_bwd(lambda: _BlockedSparseConv2d.apply(xg, vg, bg, crow, col, ccol, row, perm, None, geom),
                            (xg, vg, bg)), 3 * sparse_flops),
            direct=(fwd_bwd(lambda: op_.sparse_conv2d(xg, vg, *t, bg, None, KS, ST, PAD, DIL), (xg, vg, bg)),
                    3 * sparse_flops)),
    }
    def kept(g):  # dense weight gradient [O, C, 3, 3] -> its kept entries in ticket order
        return g.permute(0, 2, 3, 1).reshape(O, -1)[m2d]

    checks = {"fwd": lambda out: check_close(out, y64), "grad_input": lambda out: check_close(out, gx64),
              "grad_weight": lambda out: check_close(out if out.dim() == 1 else kept(out), gv64),
              "fwd_bwd": lambda name: (check_close(xg.grad, gx64) or
                                       check_close(vg.grad if name != "dense" else kept(wg.grad), gv64))}
    for op in args.ops:
        cont = {k: v for k, v in groups[op].items() if not (k == "im2col" and args.no_im2col)}
        status = {}
        for name, (fn, _) in cont.items():
            try:
                if op == "fwd_bwd":
                    fn()
                    status[name] = checks[op](name)
                else:
                    with torch.no_grad():
                        status[name] = checks[op](fn())
            except Exception as e:
                status[name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                if args.verbose:
                    traceback.print_exc()
        good = {n: f for n, (f, _) in cont.items() if status[n] is None}
        t0 = time.perf_counter()
        grad_ctx = torch.enable_grad() if op == "fwd_bwd" else torch.no_grad()
        with grad_ctx:
            stats = bench_interleaved(good, reps=args.reps, warmup=args.warmup, min_sample_ms=args.min_sample_ms,
                                      clock=time.thread_time_ns if args.clock == "thread" else time.perf_counter_ns)
        base = stats.get("dense")
        print(f"\n{op}  N={N} C={C} O={O} {param}  sparsity={100 * sparsity:g}% nnz={nnz}  "
              f"[{time.perf_counter() - t0:.1f} s]")
        for name, (fn, fl) in cont.items():
            s = stats.get(name)
            ratio = base.median_ms / s.median_ms if (base and s) else None
            r = writer.write(op=op, B=N, I=C, O=O, sparsity=sparsity, param=param, contender=name, variant=args.clock,
                             baseline="dense", correct="ok" if status[name] is None else status[name],
                             median_ms=s.median_ms if s else None, p25_ms=s.p25_ms if s else None,
                             p75_ms=s.p75_ms if s else None, iqr_ms=s.iqr_ms if s else None,
                             reps=s.reps if s else None, inner=s.inner if s else None, flops_executed=fl,
                             flops_dense_equiv=dense_flops * (3 if op == "fwd_bwd" else 1),
                             gflops_executed=gflops(fl, s.median_ms) if s else None,
                             gflops_dense_equiv=gflops(dense_flops * (3 if op == "fwd_bwd" else 1), s.median_ms)
                             if s else None, ratio_vs_baseline=ratio)
            results.append(r)
            ge = r["gflops_executed"]
            print(f"  {name:8s} {common.fmt_ms(s.median_ms) if s else '–':>10s} IQR {common.fmt_ms(s.iqr_ms) if s else '–':>8s}"
                  f"  {(f'{ge:.1f}' if ge else '–'):>7s} GFLOP/s exec"
                  f"  {common.fmt_ratio(ratio):>8s} vs dense  "
                  f"{'ok' if status[name] is None else 'FAILED: ' + status[name]}")


def conv4():
    from torch import nn
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(128, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(128 * 7 * 7, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def run_model(args, writer, sparsity, results):
    """Conv-4 training step, dense vs sparsified at ``sparsity`` (see the module docstring)."""
    import copy

    import sparseticket.nn as stnn
    from sparseticket.optim import MaskedSGD

    torch.manual_seed(0)
    N = 2 if args.quick else 64
    x, target = torch.randn(N, 1, 28, 28), torch.randint(0, 10, (N,))
    dense = conv4()
    sparse = stnn.sparsify(copy.deepcopy(dense), amount=sparsity, scope="layerwise")
    opts = {"dense": torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9),
            "direct": MaskedSGD(sparse.parameters(), lr=0.01, momentum=0.9)}
    models = {"dense": dense, "direct": sparse}

    def step(name):
        def go():
            opts[name].zero_grad()
            F.cross_entropy(models[name](x), target).backward()
            opts[name].step()
        return go

    with torch.no_grad():  # the sparse net computes its own densified twin's function
        status = {"dense": None, "direct": check_close(sparse(x), stnn.densify(copy.deepcopy(sparse))(x))}
    fns = {n: step(n) for n in models}
    for _ in range(3):  # 'auto' measures each layer's paths on its first calls
        for fn in fns.values():
            fn()
    stats = bench_interleaved(fns, reps=args.reps, warmup=args.warmup, min_sample_ms=args.min_sample_ms,
                              clock=time.thread_time_ns if args.clock == "thread" else time.perf_counter_ns)
    paths = [m.last_path for m in sparse.modules() if hasattr(m, "last_path")]
    base = stats["dense"]
    print(f"\nconv4_step  N={N}  sparsity={100 * sparsity:g}%  sparse layers ran: {paths}")
    for name in fns:
        s = stats[name]
        ratio = base.median_ms / s.median_ms
        results.append(writer.write(op="conv4_step", B=N, I=1, O=10, sparsity=sparsity, param="Conv-4 MNIST",
                                    contender=name, variant=args.clock, baseline="dense",
                                    correct="ok" if status[name] is None else status[name], median_ms=s.median_ms,
                                    p25_ms=s.p25_ms, p75_ms=s.p75_ms, iqr_ms=s.iqr_ms, reps=s.reps, inner=s.inner,
                                    ratio_vs_baseline=ratio))
        print(f"  {name:8s} {common.fmt_ms(s.median_ms):>10s} IQR {common.fmt_ms(s.iqr_ms):>8s}  "
              f"{common.fmt_ratio(ratio):>8s} vs dense  {'ok' if status[name] is None else 'FAILED: ' + status[name]}")


def markdown_summary(rows) -> str:
    """Speedup over dense per (shape, sparsity) and op for one run's CSV rows (dicts)."""
    def f(v):
        return None if v in (None, "") else float(v)

    cell = {}
    shapes, sps = [], []
    model = [r for r in rows if r["op"] in MODEL_OPS]
    rows = [r for r in rows if r["op"] not in MODEL_OPS]
    for r in rows:
        key = (int(r["B"]), int(r["I"]), int(r["O"]), r["param"])
        sp = f(r["sparsity"])
        if key not in shapes:
            shapes.append(key)
        if sp not in sps:
            sps.append(sp)
        cell[(key, sp, r["op"], r["contender"])] = (f(r["median_ms"]), f(r["ratio_vs_baseline"]))
    out = []
    for key in shapes:
        N, C, O, param = key
        clock = "this thread's CPU time" if rows[0]["variant"] == "thread" else "wall time"
        out.append(f"\n**N={N}, {C}->{O}, {param}**, {rows[0]['threads']} thread(s) (ms: median {clock}; "
                   f"x: dense time / this time)\n")
        head = ["sparsity"]
        for op in OPS:
            head += [f"{op} dense ms", f"{op} direct", f"{op} im2col"] if op in ("fwd", "fwd_bwd") else \
                    [f"{op} dense ms", f"{op} direct"]
        body = []
        for sp in sorted(sps):
            line = [f"{100 * sp:g}%"]
            for op in OPS:
                d = cell.get((key, sp, op, "dense"), (None, None))[0]
                line.append(common.fmt_ms(d) if d else "–")
                names = ["direct", "im2col"] if op in ("fwd", "fwd_bwd") else ["direct"]
                for name in names:
                    ms, ratio = cell.get((key, sp, op, name), (None, None))
                    line.append(f"{ms:.3g} ms ({ratio:.2f}x)" if ms and ratio else "–")
            body.append(line)
        out.append(common.markdown_table(head, body))
    if model:
        clock = "this thread's CPU time" if model[0]["variant"] == "thread" else "wall time"
        out.append(f"\n**Conv-4 training step**, batch {model[0]['B']}, {model[0]['threads']} thread(s) "
                   f"(ms: median {clock})\n")
        by = {}
        for r in model:
            by.setdefault(f(r["sparsity"]), {})[r["contender"]] = r
        body = [[f"{100 * sp:g}%", common.fmt_ms(f(c["dense"]["median_ms"])),
                 f"{common.fmt_ms(f(c['direct']['median_ms']))} ({f(c['direct']['ratio_vs_baseline']):.2f}x)"]
                for sp, c in sorted(by.items()) if "dense" in c and "direct" in c]
        out.append(common.markdown_table(["sparsity", "dense ms", "sparse ms (x dense)"], body))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    common.add_malloc_arg(p)
    p.add_argument("--ops", type=lambda s: s.split(","), default=OPS + MODEL_OPS)
    p.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")],
                   default=None, help="NxCxOxHxW,...")
    p.add_argument("--sparsities", type=lambda s: [float(v) / 100 for v in s.split(",")], default=None,
                   help="percent, e.g. 90,98")
    p.add_argument("--reps", type=int, default=11)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-sample-ms", type=float, default=20.0)
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="thread: this thread's CPU time (use with --threads 1 on a shared machine)")
    p.add_argument("--no-im2col", action="store_true", help="skip the (slow) im2col contender")
    p.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "conv.csv"))
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--table", action="store_true", help="print the last run in --csv as markdown and exit")
    args = p.parse_args(argv)
    if args.table:
        rows = common.read_csv(args.csv)
        last = rows[-1]["run_id"]
        print(markdown_summary([r for r in rows if r["run_id"] == last]))
        return []
    bad = [o for o in args.ops if o not in OPS + MODEL_OPS]
    if bad:
        p.error(f"unknown ops {bad}; choose from {OPS + MODEL_OPS}")
    requested = list(args.ops)
    common.apply_malloc(args.malloc)
    seen = common.pin_threads(args.threads)
    shapes = args.shapes or (SHAPES_QUICK if args.quick else SHAPES_FULL)
    sparsities = args.sparsities or (SPARSITIES_QUICK if args.quick else SPARSITIES_FULL)
    if args.quick:
        args.reps, args.min_sample_ms = min(args.reps, 3), min(args.min_sample_ms, 2.0)
    run_id = common.new_run_id()
    writer = common.CsvWriter(args.csv, run_id, dict(backend=sparseticket.ops.BACKENDS.get("cpu"),
                                                     torch_version=torch.__version__, threads=args.threads))
    info = common.system_info(args.threads, {"threads_seen": seen})
    print(common.format_system_info(info))
    results = []
    args.ops = [o for o in requested if o in OPS]
    if args.ops:
        for shape in shapes:
            for s in sparsities:
                run_shape(args, writer, shape, s, results)
    if "conv4_step" in requested:
        for s in sparsities:
            run_model(args, writer, s, results)
    common.update_runs_json(args.csv, run_id, command=common.command_line(argv), system=info, clock=args.clock)
    return results


if __name__ == "__main__":
    main()
