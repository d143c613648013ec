#!/usr/bin/env python
"""GPU benchmarks of sparseticket's Triton and CUDA kernels against cuBLAS and cuSPARSE.

    python bench/bench_gpu.py                      # the full grid on the first GPU (minutes)
    python bench/bench_gpu.py --quick              # small shapes: checks the harness in seconds
    python bench/bench_gpu.py --ops forward --sparsities 90 --shapes 4096x4096x4096
    python bench/bench_gpu.py --tf32               # let cuBLAS (and the Triton GEMM) use TF32

Without a GPU (``torch.cuda.is_available()`` is False) it prints "no GPU: skipped" and exits 0.

What is measured (fp32; a shape is (batch B, in_features I, out_features O); W is [O, I] with
exactly round((1-s)·O·I) kept entries at uniformly random positions):

* ``forward``    y = x Wᵀ + b: dense ``F.linear`` on the masked weight (cuBLAS, the baseline),
                 ``torch.mm`` with a CSR weight (cuSPARSE SpMM through torch.sparse),
                 ``triton_spmm`` and the CUDA C++ kernel (``torch.ops.sparseticket.spmm`` when
                 the extension was built against a CUDA torch);
* ``spmm_t``     gx = gy W: dense ``gy @ W``, cuSPARSE with the CSR of Wᵀ, ``triton_spmm_t``, CUDA;
* ``sddmm``      kept-weight gradient: dense ``gyᵀ x`` (all O·I entries), cuSPARSE
                 ``torch.sparse.sampled_addmm``, ``triton_sddmm`` and CUDA, with a fraction
                 ``--frozen`` of the neurons frozen for the sparseticket kernels;
* ``neq_grad``   dense weight gradient with a fraction f of rows frozen: dense ``gyᵀ x`` vs
                 ``triton_row_masked_grad_weight`` and the CUDA op (cuBLAS on the gathered rows);
                 the ideal time ratio is (1 − f);
* ``optimizer``  one SGD (momentum 0.9, weight decay 5e-4) and one AdamW step for the layer:
                 ``torch.optim`` (``foreach``/``fused``) on the dense masked weight + re-masking, vs
                 the fused masked kernels on the compact ticket values (Triton, and CUDA for SGD).

Every contender is checked against a float64 reference before it is timed (``check_close``
from bench/common.py); a wrong contender is reported (``correct=False``) and not timed. Timing
uses CUDA events over ``inner`` back-to-back calls, contenders interleaved round-robin, median
and inter-quartile range over ``--reps`` samples; Triton kernels are autotuned during warm-up.
Rows go to ``--csv`` (default bench/results/gpu.csv) with GFLOP/s executed (2·B·nnz for a sparse
kernel), GFLOP/s dense-equivalent (2·B·I·O / time) and the speedup over the dense baseline of
the same run.

Published anchors (for orientation, not comparable numbers: other GPUs, shapes and sparsity):

* Gale, Zaharia, Young, Elsen, "Sparse GPU Kernels for Deep Learning" (SC 2020): row-split
  SpMM and SDDMM kernels (the design followed here: one warp per output row tile, batch
  tiled, rows scheduled longest first) reach 27% of single-precision peak on a V100, and give
  1.2-2.1x end-to-end speedups on sparse Transformer and MobileNet models.

Goal of this project: at least 2x over dense (cuBLAS ``F.linear``) at 90% sparsity on one
H100, for the (4096, 4096) layer at batch 4096, forward. The summary line of each run says
whether the best sparseticket contender meets it. Nothing in this file has been run on a GPU
by the authors yet: the kernels are verified numerically (Triton interpreter) and compiled
(nvcc, Triton AOT for sm_80/sm_90) in CI, not timed; the first GPU run is what fills the table.
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))
sys.path.insert(0, str(_HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

CSV_FIELDS = ["run_id", "timestamp", "gpu", "torch", "triton", "cuda", "op", "contender", "B", "I", "O", "sparsity",
              "frozen", "dtype", "tf32", "correct", "error", "median_ms", "p25_ms", "p75_ms", "inner",
              "gflops_executed", "gflops_dense_equiv", "speedup_vs_dense"]
DEFAULT_SHAPES = ["4096x4096x4096", "1024x4096x4096", "4096x1024x4096", "256x4096x16384"]
DEFAULT_SPARSITIES = [50, 70, 80, 90, 95, 98, 99]
OPS = ("forward", "spmm_t", "sddmm", "neq_grad", "optimizer")
GOAL = dict(op="forward", B=4096, I=4096, O=4096, sparsity=0.9, speedup=2.0)


# ----------------------------------------------------------------------------- timing


def _time_cuda(fn: Callable[[], object], inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


def bench_cuda(contenders: Dict[str, Callable[[], object]], reps: int, warmup: int = 3,
               min_sample_ms: float = 10.0) -> Dict[str, dict]:
    """Per-call ms (median, quartiles) of each contender; samples interleaved round-robin."""
    names = list(contenders)
    inner = {}
    for n in names:
        for _ in range(warmup):  # includes Triton's autotuning on the first call
            contenders[n]()
        torch.cuda.synchronize()
        t = max(_time_cuda(contenders[n], 1), 1e-3)
        inner[n] = int(min(1000, max(1, math.ceil(min_sample_ms / t))))
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            samples[n].append(_time_cuda(contenders[n], inner[n]))
    out = {}
    for n in names:
        xs = sorted(samples[n])
        q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
        out[n] = dict(median_ms=q[1], p25_ms=q[0], p75_ms=q[2], inner=inner[n])
    return out


# ----------------------------------------------------------------------------- problems


def make_problem(B, I, O, sparsity, dtype, device, seed=0):
    from sparseticket import Ticket

    g = torch.Generator(device=device).manual_seed(seed)
    n = O * I
    keep = n - int(round(sparsity * n))
    flat = torch.zeros(n, dtype=torch.bool, device=device)
    flat[torch.randperm(n, generator=g, device=device)[:keep]] = True
    mask = flat.view(O, I)
    w = torch.randn(O, I, generator=g, device=device, dtype=dtype) * mask
    x = torch.randn(B, I, generator=g, device=device, dtype=dtype)
    gy = torch.randn(B, O, generator=g, device=device, dtype=dtype)
    b = torch.randn(O, generator=g, device=device, dtype=dtype)
    return dict(w=w, mask=mask, x=x, gy=gy, b=b, ticket=Ticket.from_dense(w, mask))


def frozen_mask(O, frozen, device, seed=1):
    g = torch.Generator(device=device).manual_seed(seed)
    active = torch.ones(O, dtype=torch.bool, device=device)
    active[torch.randperm(O, generator=g, device=device)[: int(round(frozen * O))]] = False
    return active


def cuda_op_available(op: str) -> bool:
    import sparseticket.triton as stt

    return stt.CUDA_IMPLS.get(op) == "cuda"


def contenders_for(op, P, frozen, args):
    """name -> (callable, fp64 reference result or None, executed FLOPs); the dense baseline first."""
    import sparseticket.triton as stt

    w, x, gy, b, t = P["w"], P["x"], P["gy"], P["b"], P["ticket"]
    B, I = x.shape
    O = w.shape[0]
    nnz = t.nnz
    ST = torch.ops.sparseticket
    c: Dict[str, tuple] = {}
    d = torch.float64
    if op == "forward":
        expected = F.linear(x.to(d), w.to(d), b.to(d))
        w_csr = w.to_sparse_csr()
        c["dense (cuBLAS)"] = (lambda: F.linear(x, w, b), expected, 2 * B * I * O)
        c["torch.sparse CSR (cuSPARSE)"] = (lambda: torch.addmm(b[:, None], w_csr, x.t()).t(), expected, 2 * B * nnz)
        c["triton_spmm"] = (lambda: stt.triton_spmm(x, t.values, t.crow, t.col, b), expected, 2 * B * nnz)
        if cuda_op_available("spmm"):
            c["cuda spmm"] = (lambda: ST.spmm(x, t.values, t.crow, t.col, b), expected, 2 * B * nnz)
    elif op == "spmm_t":
        expected = gy.to(d) @ w.to(d)
        wt_csr = w.t().contiguous().to_sparse_csr()
        c["dense (cuBLAS)"] = (lambda: gy @ w, expected, 2 * B * I * O)
        c["torch.sparse CSR (cuSPARSE)"] = (lambda: torch.mm(wt_csr, gy.t()).t(), expected, 2 * B * nnz)
        c["triton_spmm_t"] = (lambda: stt.triton_spmm_t(gy, t.values, t.ccol, t.row, t.perm), expected, 2 * B * nnz)
        if cuda_op_available("spmm_t"):
            c["cuda spmm_t"] = (lambda: ST.spmm_t(gy, t.values, t.ccol, t.row, t.perm), expected, 2 * B * nnz)
    elif op == "sddmm":
        active = frozen_mask(O, frozen, x.device) if frozen else None
        from sparseticket.ops import reference as ref

        expected = ref.reference_sddmm(gy.to(d), x.to(d), t.crow, t.col, active)
        pattern = torch.sparse_csr_tensor(t.crow.long(), t.col.long(), torch.zeros_like(t.values), (O, I))
        live = nnz if active is None else int((active.long().repeat_interleave((t.crow[1:] - t.crow[:-1]).long())).sum())
        c["dense (cuBLAS)"] = (lambda: gy.t() @ x, None, 2 * B * I * O)
        if frozen == 0:
            c["torch.sparse sampled_addmm (cuSPARSE)"] = (
                lambda: torch.sparse.sampled_addmm(pattern, gy.t(), x, beta=0.0).values(), expected, 2 * B * nnz)
        c["triton_sddmm"] = (lambda: stt.triton_sddmm(gy, x, t.crow, t.col, active), expected, 2 * B * live)
        if cuda_op_available("sddmm"):
            c["cuda sddmm"] = (lambda: ST.sddmm(gy, x, t.crow, t.col, active), expected, 2 * B * live)
    elif op == "neq_grad":
        active = frozen_mask(O, frozen, x.device)
        from sparseticket.ops import reference as ref

        expected = ref.reference_row_masked_grad_weight(gy.to(d), x.to(d), active)
        n_live = int(active.sum())
        c["dense (cuBLAS)"] = (lambda: gy.t() @ x, None, 2 * B * I * O)
        c["triton_row_masked_grad_weight"] = (lambda: stt.triton_row_masked_grad_weight(gy, x, active), expected,
                                              2 * B * I * n_live)
        if cuda_op_available("row_masked_grad_weight"):
            c["cuda row_masked_grad_weight"] = (lambda: ST.row_masked_grad_weight(gy, x, active), expected,
                                                2 * B * I * n_live)
    elif op == "optimizer":
        c.update(optimizer_contenders(P))
    return c


def optimizer_contenders(P):
    """Timed for speed only (correctness of these steps is in tests/test_triton.py). The
    baseline is torch.optim on the dense masked weight, then re-masking, as pruning code does."""
    import sparseticket.triton as stt

    w, mask, b, t = P["w"], P["mask"], P["b"], P["ticket"]
    dense_params = [w.clone().requires_grad_(), b.clone().requires_grad_()]
    for p in dense_params:
        p.grad = torch.randn_like(p)
    sgd = torch.optim.SGD(dense_params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)
    adamw = torch.optim.AdamW([p.detach().clone().requires_grad_() for p in dense_params], lr=1e-3, fused=True)
    for p, q in zip(adamw.param_groups[0]["params"], dense_params):
        p.grad = q.grad.clone()

    def dense_sgd():
        sgd.step()
        with torch.no_grad():
            dense_params[0].mul_(mask)

    def dense_adamw():
        adamw.step()
        with torch.no_grad():
            adamw.param_groups[0]["params"][0].mul_(mask)

    values, bias = t.values.clone(), b.clone()
    params = [values, bias]
    grads = [torch.randn_like(values), torch.randn_like(bias)]
    bufs = [torch.zeros_like(values), torch.zeros_like(bias)]
    m = [torch.zeros_like(values), torch.zeros_like(bias)]
    v = [torch.zeros_like(values), torch.zeros_like(bias)]
    none = [None, None]
    steps = [1.0, 1.0]
    n = 2 * (w.numel() + b.numel())  # nominal "flops": 2 per dense element, for the ratio columns only
    c = {
        "torch.optim.SGD(foreach) + mask": (dense_sgd, None, n),
        "torch.optim.AdamW(fused) + mask": (dense_adamw, None, n),
        "triton_masked_sgd_ (compact)": (
            lambda: stt.triton_masked_sgd_(params, grads, bufs, none, none, none, [False, False], 0.01, 0.9, 0.0,
                                           5e-4, False, False), None, n),
        "triton_masked_adamw_ (compact)": (
            lambda: stt.triton_masked_adamw_(params, grads, m, v, [], none, none, none, steps, 1e-3, 0.9, 0.999,
                                             1e-8, 0.01, False, False), None, n),
    }
    if cuda_op_available("masked_sgd_"):
        c["cuda masked_sgd_ (compact)"] = (
            lambda: torch.ops.sparseticket.masked_sgd_(params, grads, bufs, none, none, none, [False, False], 0.01,
                                                       0.9, 0.0, 5e-4, False, False), None, n)
    return c


# ----------------------------------------------------------------------------- main


def gpu_summary() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return dict(gpu=f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs)",
                torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda or "")


def parse_shape(s: str):
    B, I, O = (int(v) for v in s.lower().split("x"))
    return B, I, O


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma list of BxIxO")
    ap.add_argument("--sparsities", default=",".join(map(str, DEFAULT_SPARSITIES)), help="percent, comma list")
    ap.add_argument("--frozen", default="0,50,90", help="percent of neurons frozen (sddmm, neq_grad), comma list")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in cuBLAS and the Triton GEMM (default: fp32)")
    ap.add_argument("--quick", action="store_true", help="small shapes and few reps (harness check)")
    ap.add_argument("--csv", default=str(_HERE / "results" / "gpu.csv"))
    args = ap.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_gpu: no GPU: skipped (torch.cuda.is_available() is False)")
        return 0

    from common import check_close, gflops, new_run_id  # bench/common.py, shared with the CPU benchmarks

    import sparseticket
    import sparseticket.triton as stt

    if stt.TRITON_ERROR and stt.TRITON_ERROR != "no CUDA device":
        print(f"bench_gpu: Triton kernels unavailable: {stt.TRITON_ERROR}")
    torch.backends.cuda.matmul.allow_tf32 = bool(args.tf32)
    if args.quick:
        args.shapes, args.sparsities, args.reps = "256x512x384", "90", 3
    shapes = [parse_shape(s) for s in args.shapes.split(",") if s]
    sparsities = [float(s) / 100 for s in args.sparsities.split(",") if s]
    frozens = [float(f) / 100 for f in args.frozen.split(",") if f]
    ops = [o for o in args.ops.split(",") if o]
    info = gpu_summary()
    print(f"bench_gpu: {info['gpu']}; torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}; "
          f"backends {dict(sparseticket.BACKENDS)}; per op {stt.CUDA_IMPLS}; tf32={args.tf32}")

    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_file = not path.exists() or path.stat().st_size == 0
    run_id = new_run_id()
    goal_result: Optional[str] = None
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new_file:
            w.writeheader()
        for B, I, O in shapes:
            for s in sparsities:
                P = make_problem(B, I, O, s, torch.float32, "cuda")
                for op in ops:
                    for fr in (frozens if op in ("sddmm", "neq_grad") else [0.0]):
                        if op == "neq_grad" and fr == 0:
                            continue
                        if op == "neq_grad" and s != sparsities[0]:
                            continue  # neq_grad does not depend on the weight's sparsity
                        cont = contenders_for(op, P, fr, args)
                        errors = {}
                        for name, (fn, expected, _) in cont.items():
                            if expected is not None:
                                out = fn()
                                torch.cuda.synchronize()
                                errors[name] = check_close(out, expected)
                        timed = {n: c[0] for n, c in cont.items() if errors.get(n) is None}
                        stats = bench_cuda(timed, args.reps)
                        baseline = next(iter(cont))  # each op lists its dense baseline first
                        base = stats.get(baseline, {}).get("median_ms")
                        print(f"\n{op} B={B} I={I} O={O} sparsity={s:.0%} frozen={fr:.0%}")
                        for name, (fn, expected, flops) in cont.items():
                            st = stats.get(name)
                            ms = st["median_ms"] if st else None
                            speedup = base / ms if (base and ms) else None
                            row = dict(run_id=run_id, timestamp=_dt.datetime.now().isoformat(timespec="seconds"),
                                       op=op, contender=name, B=B, I=I, O=O, sparsity=s, frozen=fr, dtype="float32",
                                       tf32=args.tf32, correct=errors.get(name) is None, error=errors.get(name) or "",
                                       median_ms=ms, p25_ms=st and st["p25_ms"], p75_ms=st and st["p75_ms"],
                                       inner=st and st["inner"], gflops_executed=gflops(flops, ms),
                                       gflops_dense_equiv=gflops(2 * B * I * O, ms), speedup_vs_dense=speedup, **info)
                            w.writerow(row)
                            f.flush()
                            if ms is None:
                                print(f"  {name:42s} WRONG: {errors.get(name)}")
                            else:
                                print(f"  {name:42s} {ms:9.3f} ms  [{st['p25_ms']:.3f}, {st['p75_ms']:.3f}]"
                                      f"  {gflops(flops, ms) or 0:8.1f} GFLOP/s"
                                      + (f"  {speedup:5.2f}x vs {baseline}" if speedup else ""))
                        if (op, B, I, O) == (GOAL["op"], GOAL["B"], GOAL["I"], GOAL["O"]) and \
                                abs(s - GOAL["sparsity"]) < 1e-9 and base:
                            best = max(((base / stats[n]["median_ms"], n) for n in stats if n.startswith(("triton", "cuda"))),
                                       default=None)
                            if best:
                                met = "MET" if best[0] >= GOAL["speedup"] else "NOT met"
                                goal_result = (f"goal (>= {GOAL['speedup']}x over dense, forward, 4096x4096 at batch "
                                               f"4096, 90% sparsity): {met}, best {best[1]} at {best[0]:.2f}x on "
                                               f"{info['gpu']}")
                del P
                torch.cuda.empty_cache()
    print(f"\nbench_gpu: rows appended to {path} (run {run_id})")
    if goal_result:
        print(goal_result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
