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
import subprocess
import sys

SHAPES = [(60, 784, 300), (60, 300, 100), (256, 784, 300), (256, 1024, 1024), (1000, 784, 300)]
DENS = [0.1, 0.2, 0.35, 0.5, 0.65]
OPS = ["forward", "spmm_t", "sddmm"]


def worker(args):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import time
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
            fns = {
                "forward": (lambda: ops.spmm(x, t.values, t.crow, t.col, b), lambda: F.linear(x, W, b)),
                "spmm_t": (lambda: ops.spmm_t(gy, t.values, t.ccol, t.row, t.perm), lambda: gy @ W),
                "sddmm": (lambda: ops.sddmm(gy, x, t.crow, t.col, None), lambda: gy.t() @ x),
            }
            for op in args.ops:
                for kind, fn in zip(("sparse", "dense"), fns[op]):
                    if kind == "dense" and not args.dense:
                        continue
                    for _ in range(3):
                        fn()
                    t0 = time.thread_time_ns(); fn(); one = max(time.thread_time_ns() - t0, 1000)
                    inner = max(1, int(args.sample_us * 1000 / one))
                    samples = []
                    for _ in range(args.samples):
                        t0 = time.thread_time_ns()
                        for _ in range(inner):
                            fn()
                        samples.append((time.thread_time_ns() - t0) / inner / 1000)
                    samples.sort()
                    out[f"{B}x{I}x{O}|{d}|{op}|{kind}"] = samples[len(samples) // 2]
    json.dump(out, sys.stdout)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pkg", action="append", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=15)
    ap.add_argument("--sample-us", type=float, default=3000)
    ap.add_argument("--shapes", type=lambda s: [tuple(int(v) for v in t.split("x")) for t in s.split(",")],
                    default=SHAPES)
    ap.add_argument("--dens", type=lambda s: [float(v) for v in s.split(",")], default=DENS)
    ap.add_argument("--ops", type=lambda s: s.split(","), default=OPS)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--dense", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    res = {p: [] for p in args.pkg}
    for rnd in range(args.rounds):
        for i, p in enumerate(args.pkg):
            cmd = [sys.executable, __file__, "--worker", "--pkg", p, "--samples", str(args.samples),
                   "--sample-us", str(args.sample_us), "--dense", "1" if i == 0 else "0",
                   "--shapes", ",".join("x".join(map(str, s)) for s in args.shapes),
                   "--dens", ",".join(map(str, args.dens)), "--ops", ",".join(args.ops)]
            env = dict(os.environ, PYTHONPATH=p)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/tmp")
            if r.returncode:
                sys.exit(r.stderr)
            res[p].append(json.loads(r.stdout))
            print(f"round {rnd} {p} done", file=sys.stderr)

    def med(vals):
        vals = sorted(vals)
        return vals[len(vals) // 2]

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
