#!/usr/bin/env python
"""Single-thread CPU-time A/B of the ticket kernels against dense torch (for kernel work on a
shared machine, where wall-clock is unreliable).

    python bench/ab_thread_time.py --pkg /tmp/base --pkg /work/wt-spmm --rounds 3

Each --pkg is a directory holding a built ``sparseticket`` package; every round runs one
process per package (alternating), each timing every case with time.thread_time_ns under
torch.set_num_threads(1). Per case the table shows the median over rounds of each process's
median per-call time (us), and dense (F.linear / gy @ W / gy.T @ x) from the first package.
"""
import argparse
import json
import os
import sys

from ab_common import add_case_args, case_argv, median, run_alternating, thread_time_median

SHAPES = [(60, 784, 300), (60, 300, 100), (256, 784, 300), (256, 1024, 1024), (1000, 784, 300)]
DENS = [0.1, 0.2, 0.35, 0.5, 0.65]
OPS = ["forward", "spmm_t", "sddmm"]  # also: expand, compress (the dense path's bitmap ops)


def worker(args):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch
    import torch.nn.functional as F
    import sparseticket
    from sparseticket import Ticket
    torch.set_num_threads(1)
    assert os.path.abspath(sparseticket.__file__).startswith(os.path.abspath(args.pkg[0])), sparseticket.__file__
    out = {}
    for (B, I, O) in args.shapes:
        for d in args.dens:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(B, I, generator=gen)
            gy = torch.randn(B, O, generator=gen)
            n = O * I
            mask = torch.zeros(n, dtype=torch.bool)
            mask[torch.randperm(n, generator=gen)[:int(round(d * n))]] = True
            mask = mask.view(O, I)
            W = torch.randn(O, I, generator=gen) * mask
            b = torch.randn(O, generator=gen)
            t = Ticket.from_dense(W, mask)
            ops = torch.ops.sparseticket
            bits = ops.ticket_bitmap(t.crow, t.col, I)
            fns = {
                "forward": (lambda: ops.spmm(x, t.values, t.crow, t.col, b), lambda: F.linear(x, W, b)),
                "spmm_t": (lambda: ops.spmm_t(gy, t.values, t.ccol, t.row, t.perm), lambda: gy @ W),
                "sddmm": (lambda: ops.sddmm(gy, x, t.crow, t.col, None), lambda: gy.t() @ x),
                # dense path of a sparse layer: W from the ticket, its gradient back to the
                # kept entries; dense = what the plain layer does instead (one masking multiply)
                "expand": (lambda: ops.ticket_expand(t.values, t.crow, bits, I), lambda: W.mul(mask)),
                "compress": (lambda: ops.ticket_compress(W, t.crow, bits, t.nnz), lambda: W.mul(mask)),
            }
            for op in args.ops:
                for kind, fn in zip(("sparse", "dense"), fns[op]):
                    if kind == "dense" and not args.dense:
                        continue
                    out[f"{B}x{I}x{O}|{d}|{op}|{kind}"] = 1e6 * thread_time_median(fn, args.samples,
                                                                                    args.sample_us / 1e6)
    json.dump(out, sys.stdout)


def main():
    ap = argparse.ArgumentParser()
    add_case_args(ap, SHAPES, DENS, OPS, "BxIxO,...")
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--sample-us", type=float, default=3000)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    res = run_alternating(__file__, args.pkg, args.rounds, lambda i: case_argv(args, i, "--sample-us", args.sample_us))
    med = median

    keys = [k for k in res[args.pkg[0]][0] if k.endswith("|sparse")]
    table = {}
    hdr = f"{'shape':>14} {'dens':>5} {'op':>8} {'dense':>9} " + " ".join(f"{os.path.basename(p.rstrip('/')):>10}" for p in args.pkg)
    if len(args.pkg) > 1:
        hdr += "   new/old"
    print(hdr)
    for k in keys:
        shape, d, op, _ = k.split("|")
        dk = f"{shape}|{d}|{op}|dense"
        dense = med([r[dk] for r in res[args.pkg[0]]])
        vals = [med([r[k] for r in res[p]]) for p in args.pkg]
        table[k] = {"dense": dense, **{p: v for p, v in zip(args.pkg, vals)}}
        line = f"{shape:>14} {d:>5} {op:>8} {dense:9.1f} " + " ".join(f"{v:10.1f}" for v in vals)
        if len(vals) > 1:
            line += f"   {vals[-1] / vals[0]:6.2f}"
        print(line, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
