#!/usr/bin/env python
"""Single-thread CPU-time A/B of the direct sparse conv ops across builds (for kernel work on
a shared machine, where wall-clock is unreliable); the conv counterpart of ab_thread_time.py.

    python bench/ab_conv_thread_time.py --pkg /work/main --pkg /work/wt-convcache --rounds 3

Each --pkg is a directory holding a built ``sparseticket`` package; every round runs one
process per package (alternating), each timing every case with time.thread_time_ns under
torch.set_num_threads(1). Cases (batch 64, 3x3, stride 1, padding 1, fp32, Conv-4 shapes):
``fwd`` (sparse_conv2d), ``gin`` (sparse_conv2d_grad_input), ``gw``
(sparse_conv2d_grad_weight) and ``bwd`` (gin + gw). dense = oneDNN (F.conv2d,
aten.convolution_backward for the input / weight gradient) from the first package's
processes. The table shows the median over rounds of each process's median per call (ms).
"""
import argparse
import json
import os
import sys

from ab_common import add_case_args, case_argv, median, run_alternating, thread_time_median

SHAPES = [(64, 64, 28), (64, 128, 14), (128, 128, 14)]
DENS = [0.5, 0.2]
OPS = ["fwd", "gin", "gw", "bwd"]


def worker(args):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    import torch.nn.functional as F
    import sparseticket
    torch.set_num_threads(1)
    assert os.path.abspath(sparseticket.__file__).startswith(os.path.abspath(args.pkg[0])), sparseticket.__file__
    ops = torch.ops.sparseticket
    conf = ((3, 3), (1, 1), (1, 1), (1, 1))

    def timeit(fn):  # ms
        return 1e3 * thread_time_median(fn, args.samples, args.sample_ms / 1e3, warmup=2)

    out = {}
    for (C, O, H) in args.shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(64, C, H, H, generator=gen)
        gy = torch.randn(64, O, H, H, generator=gen)
        b = torch.randn(O, generator=gen)
        for d in args.dens:
            n = O * C * 9
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=gen)[:round(d * n)]] = True
            mask = mask.view(O, C, 3, 3)
            w = torch.randn(O, C, 3, 3, generator=gen) * mask
            w2d = w.permute(0, 2, 3, 1).reshape(O, -1).contiguous()
            m2d = mask.permute(0, 2, 3, 1).reshape(O, -1).contiguous()
            v, crow, col = sparseticket.ops.dense_to_ticket(w2d, m2d)
            ccol, row, perm = sparseticket.ops.ticket_transpose(crow, col, 9 * C)
            gin = lambda: ops.sparse_conv2d_grad_input(gy, v, crow, col, list(x.shape), *conf)  # noqa: E731
            gw = lambda: ops.sparse_conv2d_grad_weight(gy, x, ccol, row, perm, None, *conf)  # noqa: E731
            fns = {"fwd": lambda: ops.sparse_conv2d(x, v, crow, col, ccol, row, perm, b, None, *conf),
                   "gin": gin, "gw": gw, "bwd": lambda: (gin(), gw())}
            for op in args.ops:
                out[f"{C}->{O}@{H}|{d}|{op}|sparse"] = timeit(fns[op])
            if args.dense:
                cb = torch.ops.aten.convolution_backward
                dense = {"fwd": lambda: F.conv2d(x, w, b, 1, 1),
                         "gin": lambda: cb(gy, x, w, [O], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, (True, False, False)),
                         "gw": lambda: cb(gy, x, w, [O], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, (False, True, False)),
                         "bwd": lambda: cb(gy, x, w, [O], [1, 1], [1, 1], [1, 1], False, [0, 0], 1, (True, True, False))}
                for op in args.ops:
                    out[f"{C}->{O}@{H}|{d}|{op}|dense"] = timeit(dense[op])
    json.dump(out, sys.stdout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_case_args(ap, SHAPES, DENS, OPS, "CxOxH,...")
    ap.add_argument("--samples", type=int, default=11)
    ap.add_argument("--sample-ms", type=float, default=25)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    res = run_alternating(__file__, args.pkg, args.rounds, lambda i: case_argv(args, i, "--sample-ms", args.sample_ms))
    med = median

    names = [os.path.basename(p.rstrip("/")) for p in args.pkg]
    hdr = "| shape | density | op | dense ms | " + " | ".join(f"{n} ms" for n in names)
    hdr += " | new/old | dense/new |" if len(names) > 1 else " | dense/sparse |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    table = {}
    for k in [k for k in res[args.pkg[0]][0] if k.endswith("|sparse")]:
        shape, d, op, _ = k.split("|")
        dense = med([r[f"{shape}|{d}|{op}|dense"] for r in res[args.pkg[0]]])
        vals = [med([r[k] for r in res[p]]) for p in args.pkg]
        table[k] = {"dense": dense, **dict(zip(args.pkg, vals))}
        line = f"| {shape} | {d} | {op} | {dense:.2f} | " + " | ".join(f"{v:.2f}" for v in vals)
        line += f" | {vals[-1] / vals[0]:.3f} | {dense / vals[-1]:.2f}x |" if len(vals) > 1 else f" | {dense / vals[0]:.2f}x |"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
