#!/usr/bin/env python
"""Microbenchmarks of sparseticket's CPU kernels against dense torch, torch.sparse and peers.

    python bench/bench_kernels.py                 # the full grid (minutes; run on a quiet machine)
    python bench/bench_kernels.py --quick         # tiny shapes, a few seconds: checks the harness
    python bench/bench_kernels.py --ops forward --shapes 128x4096x4096 --sparsities 90,95,98 --markdown
    python bench/bench_to_md.py                   # tables for BENCHMARKS.md from the CSV

What is measured (fp32, shapes are (batch B, in_features I, out_features O), the weight W is
[O, I] with an exactly ``round((1-s)·O·I)`` kept entries at uniformly random positions):

* ``forward``     y = x Wᵀ + b: sparseticket.sparse_linear and torch.ops.sparseticket.spmm vs
                  dense F.linear with the masked weight (baseline), torch.sparse with a CSR
                  weight (the fastest formulation, chosen per shape by a probe, or all with
                  ``--torch-sparse all``), and the peers sparseprop / sparselab when importable;
* ``spmm_t``      gx = gy W: sparseticket.spmm_t vs dense gy @ W, torch.sparse (CSR of Wᵀ);
* ``sddmm``       kept-weight gradient vs the dense weight gradient gyᵀ x, torch.sparse.sampled_addmm;
* ``neq_grad``    dense weight gradient with a fraction f of rows (neurons) frozen:
                  sparseticket.row_masked_grad_weight vs dense gyᵀ x (and torch index_select+mm);
                  the time ratio is compared with (1 - f);
* ``train_step``  one layer's whole step (forward, input gradient, weight gradient, SGD with
                  momentum 0.9): sparseticket (sparse_linear + masked_sgd_ on the compact values)
                  vs the dense masked step (F.linear, backward, SGD(foreach) step, W.mul_(mask))
                  vs the peers' modules stepped by torch.optim.SGD(foreach);
* ``masked_sgd``  one masked SGD step over ResNet-18's 62 parameters (11,689,512 values; momentum
                  0.9, weight decay 5e-4, conv/fc weights pruned): sparseticket.masked_sgd_ with
                  keep masks on dense storage, and on compact ticket values, vs
                  torch.optim.SGD(foreach=True).step() + re-masking the weights.

Every contender is checked against a float64 dense reference before it is timed; a contender that
fails is reported (CSV column ``correct``) and not timed. Results are appended to ``--csv``; the
command line, system info and crossovers of each run go to the sidecar ``<csv stem>.runs.json``.
"""
from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from early_threads import early_threads  # noqa: E402  (torch-free)

if __name__ == "__main__":
    early_threads(sys.argv[1:])

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib.metadata  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402
from bench_to_md import crossover  # noqa: E402
from common import Stats, bench_interleaved, check_close, gflops  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

SHAPES_FULL = [(128, 4096, 4096), (256, 1024, 1024), (256, 784, 300), (64, 3072, 768)]
SPARSITIES_FULL = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99]
NEQ_SHAPES_FULL = [(256, 1024, 1024)]
SHAPES_QUICK = [(32, 256, 256), (16, 196, 75)]
SPARSITIES_QUICK = [0.0, 0.9, 0.99]  # full ticket, typical, near-empty rows
NEQ_SHAPES_QUICK = [(32, 256, 256)]
FROZEN_FRACTIONS = [0.25, 0.5, 0.75]
OPS = ["forward", "spmm_t", "sddmm", "neq_grad", "train_step", "masked_sgd"]
PEERS = ["sparseprop", "sparselab"]

LR = 0.01
MOMENTUM = 0.9
SGD_LR = 0.1
SGD_WEIGHT_DECAY = 5e-4

# ResNet-18 (torchvision, 1000 classes): the shapes of its 62 parameters, 11,689,512 values.
RESNET18_SHAPES: List[Tuple[str, Tuple[int, ...]]] = [("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)),
                                                       ("bn1.bias", (64,))]
for _layer, (_cin, _cout) in enumerate([(64, 64), (64, 128), (128, 256), (256, 512)], start=1):
    for _blk in range(2):
        _in = _cin if _blk == 0 else _cout
        _p = f"layer{_layer}.{_blk}."
        RESNET18_SHAPES += [(_p + "conv1.weight", (_cout, _in, 3, 3)), (_p + "bn1.weight", (_cout,)),
                            (_p + "bn1.bias", (_cout,)), (_p + "conv2.weight", (_cout, _cout, 3, 3)),
                            (_p + "bn2.weight", (_cout,)), (_p + "bn2.bias", (_cout,))]
        if _blk == 0 and _cin != _cout:
            RESNET18_SHAPES += [(_p + "downsample.0.weight", (_cout, _in, 1, 1)),
                                (_p + "downsample.1.weight", (_cout,)), (_p + "downsample.1.bias", (_cout,))]
RESNET18_SHAPES += [("fc.weight", (1000, 512)), ("fc.bias", (1000,))]
RESNET18_NUMEL = 11_689_512
assert len(RESNET18_SHAPES) == 62 and sum(math.prod(s) for _, s in RESNET18_SHAPES) == RESNET18_NUMEL


# ----------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """One way of computing the op.  ``fn()`` is what is timed; ``check()`` returns None
    when the result is right, else the reason (by default ``fn()`` is compared with the
    group's float64 reference)."""

    name: str
    fn: Callable[[], object]
    flops: Optional[float] = None
    variant: str = ""
    check: Optional[Callable[[], Optional[str]]] = None


@dataclass
class Ctx:
    args: argparse.Namespace
    writer: common.CsvWriter
    peers: Dict[str, object]
    torch_sparse_choice: Dict[str, dict] = field(default_factory=dict)
    results: List[dict] = field(default_factory=list)


def run_group(ctx: Ctx, op: str, shape, sparsity, param, contenders: List[Contender], ref: Optional[torch.Tensor],
              flops_dense: Optional[float], baseline: str = "dense") -> Dict[str, dict]:
    """Check every contender, time the correct ones interleaved, write and print rows."""
    args = ctx.args
    t0 = time.perf_counter()
    B, I, O = shape if shape else (None, None, None)
    status: Dict[str, Optional[str]] = {}
    for c in contenders:
        try:
            with torch.no_grad() if c.check is None else contextlib.nullcontext():
                status[c.name] = c.check() if c.check is not None else check_close(c.fn(), ref, rtol=args.rtol,
                                                                                 atol_scale=args.rtol)
        except Exception as e:  # a crash is a failed check, reported, not fatal
            status[c.name] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if args.verbose:
                traceback.print_exc()
    good = [c for c in contenders if status[c.name] is None]
    stats: Dict[str, Stats] = {}
    for attempt in range(2):
        try:
            if good:
                stats = bench_interleaved({c.name: c.fn for c in good}, reps=args.reps, warmup=args.warmup,
                                          min_sample_ms=args.min_sample_ms)
            break
        except Exception:  # a contender that passed its check crashed later: find it, time the rest
            if attempt:
                raise
            for c in list(good):
                try:
                    c.fn()
                    c.fn()
                except Exception as e:
                    status[c.name] = f"error while timing: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    good.remove(c)
    base = stats.get(baseline)
    title = f"{op}  " + (f"B={B} I={I} O={O}  " if shape else "") + \
        (f"sparsity={100 * sparsity:g}%  " if sparsity is not None else "") + (param or "")
    print(f"\n{title}  [checked and timed in {time.perf_counter() - t0:.2f} s]")
    print(f"  {'contender':22s} {'median ms':>10s} {'IQR ms':>9s} {'GFLOP/s exec':>13s} {'GFLOP/s dense-eq':>17s} "
          f"{'x ' + baseline:>9s}  check")
    out = {}
    for c in contenders:
        s = stats.get(c.name)
        ratio = (base.median_ms / s.median_ms) if (base and s) else None
        row = ctx.writer.write(
            op=op, B=B, I=I, O=O, sparsity=sparsity, param=param, contender=c.name, variant=c.variant,
            baseline=baseline, correct="ok" if status[c.name] is None else status[c.name],
            median_ms=s.median_ms if s else None, p25_ms=s.p25_ms if s else None, p75_ms=s.p75_ms if s else None,
            iqr_ms=s.iqr_ms if s else None, reps=s.reps if s else None, inner=s.inner if s else None,
            flops_executed=c.flops, flops_dense_equiv=flops_dense,
            gflops_executed=gflops(c.flops, s.median_ms) if s else None,
            gflops_dense_equiv=gflops(flops_dense, s.median_ms) if s else None, ratio_vs_baseline=ratio)
        ctx.results.append(row)
        out[c.name] = row
        g1, g2 = row["gflops_executed"], row["gflops_dense_equiv"]
        print(f"  {c.name:22s} {common.fmt_ms(s.median_ms) if s else '–':>10s} "
              f"{common.fmt_ms(s.iqr_ms) if s else '–':>9s} {(f'{g1:.1f}' if g1 else '–'):>13s} "
              f"{(f'{g2:.1f}' if g2 else '–'):>17s} {common.fmt_ratio(ratio):>9s}  "
              f"{'ok' if status[c.name] is None else 'FAILED: ' + status[c.name]}")
    return out


# ----------------------------------------------------------------------------- problems


def exact_mask(O: int, I: int, sparsity: float, gen: torch.Generator) -> torch.Tensor:
    """[O, I] bool with exactly round((1 - sparsity)·O·I) True entries at random positions."""
    n = O * I
    keep = n - int(round(sparsity * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[:keep]] = True
    return mask.view(O, I)


@dataclass
class Problem:
    B: int
    I: int
    O: int
    sparsity: float
    x: torch.Tensor      # [B, I]
    gy: torch.Tensor     # [B, O]
    W: torch.Tensor      # [O, I], zero where pruned
    mask: torch.Tensor   # [O, I] bool
    b: torch.Tensor      # [O]

    @property
    def nnz(self) -> int:
        return int(self.mask.sum())

    @property
    def shape(self):
        return (self.B, self.I, self.O)


def make_problem(B, I, O, sparsity, seed) -> Problem:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, I, generator=gen)
    gy = torch.randn(B, O, generator=gen)
    mask = exact_mask(O, I, sparsity, gen)
    W = torch.randn(O, I, generator=gen).div_(math.sqrt(I)) * mask
    b = torch.randn(O, generator=gen).mul_(0.1)
    return Problem(B, I, O, sparsity, x, gy, W, mask, b)


def _d(t):
    return t.detach().to(torch.float64)


def _ref():
    """sparseticket's pure-PyTorch references: the definition of each op, shared with the
    tests (STYLE.md item 10). Run in float64 they are the ground truth every contender,
    dense baseline included, is checked against."""
    from sparseticket.ops import reference
    return reference


def _ticket64(p: "Problem"):
    """(values [nnz] float64, crow, col, ccol, row, perm) of p's weight, built by the reference."""
    R = _ref()
    values, crow, col = R.reference_dense_to_ticket(_d(p.W), p.mask)
    ccol, row, perm = R.reference_ticket_transpose(crow, col, p.I)
    return values, crow, col, ccol, row, perm


# ----------------------------------------------------------------------------- peers


def load_peers(requested: List[str]) -> Tuple[Dict[str, object], Dict[str, str]]:
    """Import the requested peers; returns ({name: module}, {name: status line})."""
    mods, status = {}, {}
    for name in requested:
        try:
            if name == "sparseprop":
                import sparseprop  # noqa: F401  (also imports its top-level `backend` extension)
                from sparseprop.modules import SparseLinear  # noqa: F401
                mod = sparseprop
            elif name == "sparselab":
                import sparselab
                mod = sparselab
            else:
                raise ValueError(f"unknown peer {name!r} (known: {', '.join(PEERS)})")
            mods[name] = mod
            status[name] = f"{name} {importlib.metadata.version(name)}"
        except Exception as e:
            status[name] = f"{name}: not available ({type(e).__name__}: {e})"
    return mods, status


class SparsepropLinear:
    """sparseprop.modules.SparseLinear (CSR, AVX2 kernels, OpenMP) built from our masked weight."""

    def __init__(self, p: Problem):
        from sparseprop.modules import SparseLinear
        self.shape = (p.O, p.I)
        self.module = SparseLinear(dense_weight=p.W.clone(), bias=torch.nn.Parameter(p.b.clone()))
        # sparseprop takes the kept set from W != 0; W is non-zero wherever the mask keeps it
        assert self.module.W_val.numel() == p.nnz

    def dense_weight(self):
        from sparseprop.modules.utils import from_csr_2d
        return from_csr_2d(self.module.W_val.detach(), self.module.W_idx, shape=self.shape)


class SparselabLinear:
    """sparselab.SparseLinear (PaddedCSR) with its random weight replaced by our ticket.

    ``padding_ratio=0``: a static ticket never inserts connections, so no spare slots.
    """

    def __init__(self, p: Problem):
        import numpy as np
        import sparselab
        self.csr = sparselab.PaddedCSR.from_dense(p.W, padding_ratio=0.0)
        assert self.csr.nnz == p.nnz
        self.module = sparselab.SparseLinear(p.I, p.O, bias=True, sparsity=min(p.sparsity, 0.99))
        self.module._csr = self.csr
        # the Parameter aliases the C++ value buffer, as in sparselab.SparseLinear itself
        self.module._values = torch.nn.Parameter(torch.from_numpy(np.asarray(self.csr.values)))
        with torch.no_grad():
            self.module.bias.copy_(p.b)

    def forward_nograd(self, x):
        import sparselab
        return sparselab.spmm(self.csr, x.t()).t()  # public op; bias added by the caller

    def dense_weight(self):
        return self.csr.to_dense()


# ----------------------------------------------------------------------------- torch.sparse


def torch_sparse_forward_formulations(p: Problem) -> Dict[str, Callable[[], torch.Tensor]]:
    """Ways of computing x Wᵀ + b with torch.sparse and a CSR weight, all returning [B, O]."""
    x, b = p.x, p.b
    Wc = p.W.to_sparse_csr()
    WtC = p.W.t().contiguous().to_sparse_csr()
    bcol = b[:, None]
    return {
        "addmm(b, W_csr, x.t()).t()": lambda: torch.addmm(bcol, Wc, x.t()).t(),
        "sparse.mm(W_csr, x.t()).t() + b": lambda: torch.sparse.mm(Wc, x.t()).t() + b,
        "sparse.mm(W_csr, x.t().contiguous()).t() + b": lambda: torch.sparse.mm(Wc, x.t().contiguous()).t() + b,
        "F.linear(x, W_csr, b)": lambda: F.linear(x, Wc, b),
        "addmm(b, x, Wt_csr)": lambda: torch.addmm(b, x, WtC),
    }


def choose_torch_sparse(ctx: Ctx, shape) -> str:
    """Probe the formulations on one problem of this shape (90% sparse) and keep the fastest."""
    key = "x".join(map(str, shape))
    if key in ctx.torch_sparse_choice:
        return ctx.torch_sparse_choice[key]["chosen"]
    p = make_problem(*shape, 0.9, ctx.args.seed)
    ref = F.linear(_d(p.x), _d(p.W), _d(p.b))
    forms = torch_sparse_forward_formulations(p)
    ok = {}
    for name, fn in forms.items():
        try:
            with torch.no_grad():
                if check_close(fn(), ref, rtol=ctx.args.rtol, atol_scale=ctx.args.rtol) is None:
                    ok[name] = fn
        except Exception:
            pass
    with torch.no_grad():
        st = bench_interleaved(ok, reps=max(3, ctx.args.reps // 3), warmup=1,
                               min_sample_ms=ctx.args.min_sample_ms / 2)
    chosen = min(st, key=lambda n: st[n].median_ms)
    ctx.torch_sparse_choice[key] = {"chosen": chosen, "probe_sparsity": 0.9,
                                    "probe_ms": {n: round(s.median_ms, 4) for n, s in st.items()},
                                    "failed": sorted(set(forms) - set(ok))}
    print(f"torch.sparse forward on {key} (probe at 90%): fastest is `{chosen}` "
          + ", ".join(f"{n}: {s.median_ms:.3f} ms" for n, s in sorted(st.items(), key=lambda kv: kv[1].median_ms)))
    return chosen


# ----------------------------------------------------------------------------- benches


def bench_forward(ctx: Ctx, p: Problem):
    import sparseticket
    from sparseticket import Ticket
    x, b = p.x, p.b
    v64, crow64, col64, *_ = _ticket64(p)
    ref = _ref().reference_spmm(_d(x), v64, crow64, col64, _d(b))
    fd = 2.0 * p.B * p.I * p.O
    fs = 2.0 * p.B * p.nnz
    t = Ticket.from_dense(p.W, p.mask)
    spmm = torch.ops.sparseticket.spmm
    cs = [Contender("dense", lambda: F.linear(x, p.W, b), fd, "F.linear(x, W*mask, b)"),
          Contender("sparseticket", lambda: sparseticket.sparse_linear(x, t, b), fs, "sparseticket.sparse_linear"),
          Contender("sparseticket_spmm", lambda: spmm(x, t.values, t.crow, t.col, b), fs,
                    "torch.ops.sparseticket.spmm")]
    forms = torch_sparse_forward_formulations(p)
    if ctx.args.torch_sparse == "all":
        for i, (name, fn) in enumerate(forms.items()):
            cs.append(Contender(f"torch_sparse_{i}", fn, fs, name))
    elif ctx.args.torch_sparse != "none":
        name = choose_torch_sparse(ctx, p.shape) if ctx.args.torch_sparse == "auto" else ctx.args.torch_sparse
        cs.append(Contender("torch_sparse", forms[name], fs, name))
    if "sparseprop" in ctx.peers:
        sp = _peer(SparsepropLinear, p)
        if sp is not None:
            cs.append(Contender("sparseprop", lambda: sp.module(x), fs, "sparseprop.modules.SparseLinear"))
    if "sparselab" in ctx.peers:
        sl = _peer(SparselabLinear, p)
        if sl is not None:
            cs.append(Contender("sparselab", lambda: sl.forward_nograd(x) + b, fs, "sparselab.spmm(W, x.t()).t() + b"))
    with torch.no_grad():
        return run_group(ctx, "forward", p.shape, p.sparsity, "", cs, ref, fd)


def _peer(cls, p):
    try:
        return cls(p)
    except Exception as e:
        print(f"  {cls.__name__}: could not be built ({type(e).__name__}: {e})")
        return None


def bench_spmm_t(ctx: Ctx, p: Problem):
    from sparseticket import Ticket
    gy = p.gy
    v64, _, _, ccol64, row64, perm64 = _ticket64(p)
    ref = _ref().reference_spmm_t(_d(gy), v64, ccol64, row64, perm64)
    fd, fs = 2.0 * p.B * p.I * p.O, 2.0 * p.B * p.nnz
    t = Ticket.from_dense(p.W, p.mask)
    spmm_t = torch.ops.sparseticket.spmm_t
    WtC = p.W.t().contiguous().to_sparse_csr()  # built once per mask, like the ticket's CSC
    cs = [Contender("dense", lambda: gy @ p.W, fd, "gy @ (W*mask)"),
          Contender("sparseticket", lambda: spmm_t(gy, t.values, t.ccol, t.row, t.perm), fs,
                    "torch.ops.sparseticket.spmm_t"),
          Contender("torch_sparse", lambda: torch.sparse.mm(WtC, gy.t()).t(), fs, "sparse.mm(Wt_csr, gy.t()).t()")]
    with torch.no_grad():
        return run_group(ctx, "spmm_t", p.shape, p.sparsity, "", cs, ref, fd)


def bench_sddmm(ctx: Ctx, p: Problem):
    from sparseticket import Ticket
    gy, x = p.gy, p.x
    _, crow64, col64, *_ = _ticket64(p)
    ref = _ref().reference_sddmm(_d(gy), _d(x), crow64, col64, None)  # [nnz], row-major like ticket values
    ref_dense = _ref().reference_row_masked_grad_weight(_d(gy), _d(x), None)
    fd, fs = 2.0 * p.B * p.I * p.O, 2.0 * p.B * p.nnz
    t = Ticket.from_dense(p.W, p.mask)
    sddmm = torch.ops.sparseticket.sddmm
    pattern = p.mask.to(torch.float32).to_sparse_csr()
    cs = [Contender("dense", lambda: gy.t() @ x, fd, "gy.t() @ x (dense weight gradient)",
                    check=lambda: check_close(gy.t() @ x, ref_dense, ctx.args.rtol, ctx.args.rtol)),
          Contender("sparseticket", lambda: sddmm(gy, x, t.crow, t.col, None), fs, "torch.ops.sparseticket.sddmm"),
          Contender("torch_sparse", lambda: torch.sparse.sampled_addmm(pattern, gy.t(), x, beta=0.0), fs,
                    "sparse.sampled_addmm(mask_csr, gy.t(), x, beta=0)",
                    check=lambda: check_close(torch.sparse.sampled_addmm(pattern, gy.t(), x, beta=0.0).values(), ref,
                                              ctx.args.rtol, ctx.args.rtol))]
    with torch.no_grad():
        return run_group(ctx, "sddmm", p.shape, p.sparsity, "", cs, ref, fd)


def bench_neq_grad(ctx: Ctx, shape, f: float):
    B, I, O = shape
    p = make_problem(B, I, O, 0.0, ctx.args.seed)
    gy, x = p.gy, p.x
    gen = torch.Generator().manual_seed(ctx.args.seed + 1)
    n_frozen = int(round(f * O))
    active = torch.ones(O, dtype=torch.bool)
    active[torch.randperm(O, generator=gen)[:n_frozen]] = False
    idx = active.nonzero().squeeze(1)
    ref = _ref().reference_row_masked_grad_weight(_d(gy), _d(x), active)
    fd = 2.0 * B * I * O
    fe = 2.0 * B * I * (O - n_frozen)
    rmg = torch.ops.sparseticket.row_masked_grad_weight

    def torch_index():
        out = x.new_zeros(O, I)
        return out.index_copy_(0, idx, gy.index_select(1, idx).t() @ x)

    cs = [Contender("dense", lambda: gy.t() @ x, fd, "gy.t() @ x (all rows)",
                    check=lambda: check_close((gy.t() @ x) * active[:, None], ref, ctx.args.rtol, ctx.args.rtol)),
          Contender("sparseticket", lambda: rmg(gy, x, active), fe, "torch.ops.sparseticket.row_masked_grad_weight"),
          Contender("torch_index", torch_index, fe, "index_select + mm + index_copy_")]
    with torch.no_grad():
        rows = run_group(ctx, "neq_grad", shape, 0.0, f"frozen={f:g}", cs, ref, fd)
    st = rows["sparseticket"]
    if st["ratio_vs_baseline"]:
        tr = 1.0 / st["ratio_vs_baseline"]
        print(f"  time ratio sparseticket/dense = {tr:.3f} (ideal {1 - f:.2f}, target <= {1 - f + 0.1:.2f}: "
              f"{'met' if tr <= 1 - f + 0.1 else 'MISSED'})")
    return rows


class _TrainContender:
    """One layer stepped repeatedly; ``check`` runs two steps and compares with float64 maths."""

    def __init__(self, p: Problem):
        self.p = p
        self.x = p.x.clone().requires_grad_(True)

    def step(self):
        raise NotImplementedError

    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def bias(self) -> torch.Tensor:
        raise NotImplementedError

    def check(self, rtol: float) -> Optional[str]:
        """Two steps from the same state: the first creates the momentum buffer (buf = g),
        the second uses it (buf = 0.9 g + g). For a linear layer gW = gyᵀx does not depend
        on W, so the expected weights are W - lr·(1 + 1.9)·gW at kept positions, 0 elsewhere."""
        p = self.p
        gW = (_d(p.gy).t() @ _d(p.x)) * p.mask
        gb = _d(p.gy).sum(0)
        W1 = _d(p.W) - LR * gW
        self.step()
        self.step()
        W2 = _d(p.W) - LR * (1 + 1 + MOMENTUM) * gW
        b2 = _d(p.b) - LR * (1 + 1 + MOMENTUM) * gb
        gx2 = _d(p.gy) @ W1  # the second step's input gradient sees the once-updated weight
        for what, got, want in (("weight", self.weight(), W2), ("bias", self.bias(), b2),
                                ("input grad", self.x.grad, gx2)):
            err = check_close(got, want, rtol, rtol)
            if err:
                return f"{what}: {err}"
        if bool((self.weight()[~p.mask] != 0).any()):
            return "a pruned weight is non-zero after two steps"
        return None


class DenseMaskedStep(_TrainContender):
    """What pruning code does today: dense layer, dense optimizer, multiply by the mask."""

    def __init__(self, p: Problem):
        super().__init__(p)
        self.W = torch.nn.Parameter(p.W.clone())
        self.b = torch.nn.Parameter(p.b.clone())
        self.maskf = p.mask.to(torch.float32)
        self.opt = torch.optim.SGD([self.W, self.b], lr=LR, momentum=MOMENTUM, foreach=True)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        self.x.grad = None
        F.linear(self.x, self.W, self.b).backward(self.p.gy)
        self.opt.step()
        with torch.no_grad():
            self.W.mul_(self.maskf)

    def weight(self):
        return self.W.detach()

    def bias(self):
        return self.b.detach()


class SparseticketStep(_TrainContender):
    """sparse_linear forward/backward, then one fused masked_sgd_ over (values, bias)."""

    def __init__(self, p: Problem):
        super().__init__(p)
        from sparseticket import Ticket
        self.t = Ticket.from_dense(p.W, p.mask)
        self.values = self.t.values.clone().requires_grad_(True)
        self.b = p.b.clone().requires_grad_(True)
        self.bufs = [torch.zeros_like(self.values), torch.zeros_like(self.b)]
        self.fresh = True

    def step(self):
        import sparseticket
        self.values.grad = self.b.grad = self.x.grad = None
        sparseticket.sparse_linear(self.x, self.t, self.b, values=self.values).backward(self.p.gy)
        with torch.no_grad():
            torch.ops.sparseticket.masked_sgd_([self.values, self.b], [self.values.grad, self.b.grad], self.bufs,
                                               [None, None], [None, None], [None, None], [self.fresh, self.fresh],
                                               LR, MOMENTUM, 0.0, 0.0, False, False)
        self.fresh = False

    def weight(self):
        return torch.ops.sparseticket.ticket_to_dense(self.values.detach(), self.t.crow, self.t.col, self.p.I)

    def bias(self):
        return self.b.detach()


class PeerStep(_TrainContender):
    """A peer's sparse linear module, stepped by torch.optim.SGD(foreach) as its docs do."""

    def __init__(self, p: Problem, wrapper):
        super().__init__(p)
        self.w = wrapper(p)
        self.opt = torch.optim.SGD(self.w.module.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        self.x.grad = None
        self.w.module(self.x).backward(self.p.gy)
        self.opt.step()

    def weight(self):
        return self.w.dense_weight()

    def bias(self):
        return self.w.module.bias.detach()


def bench_train_step(ctx: Ctx, p: Problem):
    fd = 6.0 * p.B * p.I * p.O
    fs = 6.0 * p.B * p.nnz
    makers = [("dense", lambda: DenseMaskedStep(p), fd, "F.linear, backward, SGD(foreach) step, W.mul_(mask)"),
              ("sparseticket", lambda: SparseticketStep(p), fs, "sparse_linear, backward, masked_sgd_ on values")]
    if "sparseprop" in ctx.peers:
        makers.append(("sparseprop", lambda: PeerStep(p, SparsepropLinear), fs,
                       "sparseprop SparseLinear, backward, SGD(foreach) step"))
    if "sparselab" in ctx.peers:
        makers.append(("sparselab", lambda: PeerStep(p, SparselabLinear), fs,
                       "sparselab SparseLinear, backward, SGD(foreach) step"))
    cs = []
    for name, make, fl, variant in makers:
        try:
            obj = make()
            cs.append(Contender(name, obj.step, fl, variant, check=lambda o=obj: o.check(ctx.args.rtol)))
        except Exception as e:
            msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            cs.append(Contender(name, lambda: None, fl, variant, check=lambda m=msg: m))
    return run_group(ctx, "train_step", p.shape, p.sparsity, "", cs, None, fd)


def bench_masked_sgd(ctx: Ctx, sparsity: float):
    """One SGD step over ResNet-18's parameters; conv/fc weights pruned at ``sparsity``."""
    gen = torch.Generator().manual_seed(ctx.args.seed)
    shapes = [s for _, s in RESNET18_SHAPES]
    masks = [exact_mask(s[0], math.prod(s[1:]), sparsity, gen).view(s) if len(s) > 1 else None for s in shapes]
    p0 = [torch.randn(s, generator=gen).mul_(0.05) * (m if m is not None else 1) for s, m in zip(shapes, masks)]
    g0 = [torch.randn(s, generator=gen).mul_(0.01) for s in shapes]
    n = len(shapes)
    kw = dict(lr=SGD_LR, momentum=MOMENTUM, dampening=0.0, weight_decay=SGD_WEIGHT_DECAY, nesterov=False,
              maximize=False)

    class Dense:
        def __init__(self):
            self.p = [torch.nn.Parameter(t.clone()) for t in p0]
            for q, g in zip(self.p, g0):
                q.grad = g
            self.opt = torch.optim.SGD(self.p, foreach=True, **kw)
            self.wm = [q for q, m in zip(self.p, masks) if m is not None]
            self.mf = [m.to(torch.float32) for m in masks if m is not None]

        def step(self):
            self.opt.step()
            with torch.no_grad():
                torch._foreach_mul_(self.wm, self.mf)

    class Masked:
        def __init__(self, compact: bool):
            self.compact = compact

            def take(t, m):
                return t[m].contiguous() if (compact and m is not None) else t.clone()

            self.p = [take(t, m) for t, m in zip(p0, masks)]
            self.g = [take(t, m) for t, m in zip(g0, masks)]
            self.bufs = [torch.zeros_like(t) for t in self.p]
            self.keeps = [None] * n if compact else list(masks)
            self.fresh = True

        def step(self):
            torch.ops.sparseticket.masked_sgd_(self.p, self.g, self.bufs, self.keeps, [None] * n, [None] * n,
                                               [self.fresh] * n, kw["lr"], kw["momentum"], kw["dampening"],
                                               kw["weight_decay"], kw["nesterov"], kw["maximize"])
            self.fresh = False

    dense = Dense()
    masked = Masked(compact=False)
    compact = Masked(compact=True)
    # float64 reference (sparseticket's reference_masked_sgd_) of two steps: the first
    # creates the momentum buffers, the second uses them; the gradients stay fixed
    want = [_d(t) for t in p0]
    g64 = [_d(g) for g in g0]
    bufs64 = [torch.zeros_like(t) for t in want]
    for fresh in (True, False):
        _ref().reference_masked_sgd_(want, g64, bufs64, masks, [None] * n, [None] * n, [fresh] * n, **kw)

    def check(obj, compact_values: bool):
        obj.step()
        obj.step()
        for j, (got, w, m) in enumerate(zip(obj.p, want, masks)):
            exp = w[m] if (compact_values and m is not None) else w
            err = check_close(got.detach(), exp, ctx.args.rtol, ctx.args.rtol)
            if err:
                return f"{RESNET18_SHAPES[j][0]}: {err}"
            if not compact_values and m is not None and bool((got.detach()[~m] != 0).any()):
                return f"{RESNET18_SHAPES[j][0]}: pruned weight non-zero"
        return None

    nnz = sum(int(m.sum()) if m is not None else math.prod(s) for s, m in zip(shapes, masks))
    cs = [Contender("dense", dense.step, None, "SGD(foreach=True).step() + _foreach_mul_(weights, masks)",
                    check=lambda: check(dense, False)),
          Contender("sparseticket", masked.step, None, "masked_sgd_ with keep masks, dense storage",
                    check=lambda: check(masked, False)),
          Contender("sparseticket_compact", compact.step, None,
                    f"masked_sgd_ on compact ticket values ({nnz:,} of {RESNET18_NUMEL:,})",
                    check=lambda: check(compact, True))]
    with torch.no_grad():
        return run_group(ctx, "masked_sgd", None, sparsity, f"resnet18 {RESNET18_NUMEL} params", cs, None, None)


# ----------------------------------------------------------------------------- crossover


def report_crossovers(ctx: Ctx) -> Dict[str, dict]:
    out = {}
    rows = [r for r in ctx.results if r["op"] == "forward" and r["contender"] == "sparseticket"]
    shapes = sorted({(r["B"], r["I"], r["O"]) for r in rows}, key=lambda s: -s[1] * s[2])
    if shapes:
        print("\nCrossover (lowest sparsity from which sparseticket.sparse_linear beats dense F.linear):")
    for shape in shapes:
        pts = [(r["sparsity"], r["ratio_vs_baseline"]) for r in rows if (r["B"], r["I"], r["O"]) == shape]
        s, est, phrase = crossover(pts)
        key = "x".join(map(str, shape))
        out[key] = {"grid": s, "interpolated": est, "text": phrase}
        print(f"  {key:16s} {phrase}")
        ctx.writer.write(op="crossover_forward", B=shape[0], I=shape[1], O=shape[2], sparsity=s,
                         param="" if est is None else f"interpolated={est:.4f}", contender="sparseticket",
                         variant=phrase, baseline="dense")
    return out


# ----------------------------------------------------------------------------- main


def _parse_shapes(text: str):
    out = []
    for item in text.split(","):
        parts = item.lower().replace("(", "").replace(")", "").split("x")
        if len(parts) != 3:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BxIxO (e.g. 128x4096x4096)")
        out.append(tuple(int(v) for v in parts))
    return out


def _parse_fractions(text: str, name: str):
    out = []
    for item in text.split(","):
        v = float(item)
        v = v / 100 if v > 1 else v  # "90" and "0.9" both mean 90%
        if not 0 <= v < 1:
            raise argparse.ArgumentTypeError(f"{name} {item!r} must be in [0, 100) percent")
        out.append(v)
    return out


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Shapes are BxIxO (batch x in_features x out_features). Sparsities are "
                                        "percent (90) or fractions (0.9).")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few sparsities and reps: a seconds-long check")
    ap.add_argument("--shapes", type=_parse_shapes, help="comma-separated BxIxO (default: the four of issue 2)")
    ap.add_argument("--sparsities", type=lambda t: _parse_fractions(t, "sparsity"),
                    help="comma-separated (default 0,50,70,80,90,95,98,99)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    ap.add_argument("--neq-shapes", type=_parse_shapes, help="shapes for neq_grad (default 256x1024x1024)")
    ap.add_argument("--frozen", type=lambda t: _parse_fractions(t, "frozen fraction"),
                    default=FROZEN_FRACTIONS, help="frozen-row fractions for neq_grad (default 0.25,0.5,0.75)")
    ap.add_argument("--sgd-sparsity", type=lambda t: _parse_fractions(t, "sgd sparsity")[0], default=0.9,
                    help="weight sparsity of the pruned ResNet-18 weights for masked_sgd (default 90)")
    ap.add_argument("--threads", type=int, default=2,
                    help="threads for torch, MKL and every OpenMP runtime (default 2)")
    common.add_malloc_arg(ap)
    ap.add_argument("--reps", type=int, help="interleaved repetitions per contender (default 15; --quick 3)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls per contender before timing (default 3)")
    ap.add_argument("--min-sample-ms", type=float, help="calls per sample are chosen so a sample lasts at least "
                                                        "this long (default 20; --quick 1)")
    ap.add_argument("--torch-sparse", default="auto",
                    help="torch.sparse forward formulation: auto (probe per shape, keep the fastest), all (time "
                         "each as its own contender), none, or one formulation's name")
    ap.add_argument("--peers", default=",".join(PEERS), help="peers to include when importable (default "
                                                             "sparseprop,sparselab; empty string for none)")
    ap.add_argument("--no-peers", action="store_true", help="same as --peers ''")
    ap.add_argument("--rtol", type=float, default=1e-4, help="correctness tolerance (relative; absolute is this "
                                                             "times max|reference|)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", help="CSV to append to (default bench/results/kernels.csv, or kernels-quick.csv with "
                                  "--quick so harness checks stay out of the real results); run metadata goes to "
                                  "<stem>.runs.json beside it")
    ap.add_argument("--markdown", action="store_true", help="print this run's markdown tables at the end")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing contenders")
    return ap


def busy_warning(info: dict) -> Optional[str]:
    """Other work on the cores turns every OpenMP barrier into a wait for a descheduled
    thread (a 10 µs matmul then takes milliseconds): say so rather than publish noise."""
    la, cores = info.get("loadavg_1m_at_start"), info.get("cores_online") or 1
    if la is not None and la > 0.5 * cores:
        return (f"machine busy (1-min load average {la:.2f} on {cores} cores before this run): "
                "timings are unreliable; rerun on a quiet machine")
    return None


def main(argv=None):
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    if args.quick:
        args.shapes = args.shapes or SHAPES_QUICK
        args.sparsities = args.sparsities or SPARSITIES_QUICK
        args.neq_shapes = args.neq_shapes or NEQ_SHAPES_QUICK
        args.reps = args.reps or 3
        args.min_sample_ms = args.min_sample_ms or 1.0
        args.warmup = min(args.warmup, 2)
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    args.csv = args.csv or os.path.join(results, "kernels-quick.csv" if args.quick else "kernels.csv")
    args.shapes = args.shapes or SHAPES_FULL
    args.sparsities = args.sparsities or SPARSITIES_FULL
    args.neq_shapes = args.neq_shapes or NEQ_SHAPES_FULL
    args.reps = args.reps or 15
    args.min_sample_ms = args.min_sample_ms or 20.0
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"bench: unknown op(s) {bad}; choose from {OPS}")
    if args.torch_sparse not in ("auto", "all", "none"):
        names = list(torch_sparse_forward_formulations(make_problem(2, 4, 3, 0.5, 0)))
        if args.torch_sparse not in names:
            raise SystemExit(f"bench: --torch-sparse {args.torch_sparse!r} is not auto, all, none or one of {names}")
    requested = [] if args.no_peers else [p.strip() for p in args.peers.split(",") if p.strip()]

    common.set_thread_env(args.threads)
    import sparseticket  # noqa: F401  (registers the ops; warns if on the reference path)
    peers, peer_status = load_peers(requested)
    common.apply_malloc(args.malloc)
    omp = common.pin_threads(args.threads)  # after the peers: sparselab brings its own libgomp
    info = common.system_info(args.threads, {"openmp_threads": omp, "peers": peer_status})
    run_id = common.new_run_id()
    cmd = common.command_line()
    print(f"# sparseticket kernel benchmarks, run {run_id}\n# {cmd}")
    print(common.format_system_info(info))
    for name in requested:
        print(f"peer: {peer_status[name]}")
    busy = busy_warning(info)
    if busy:
        print("WARNING: " + busy)
    if info.get("sparseticket_backend_cpu") != "c++":
        print("NOTE: sparseticket runs on the pure-PyTorch reference path: its timings say nothing about the "
              "kernels (build them with `pip install --no-build-isolation -e .`).")
    writer = common.CsvWriter(args.csv, run_id, {"backend": info.get("sparseticket_backend_cpu"),
                                                 "torch_version": torch.__version__, "threads": args.threads})
    common.update_runs_json(args.csv, run_id, command=cmd, argv=sys.argv, cwd=os.getcwd(), system=info,
                            started=common._dt.datetime.now().isoformat(timespec="seconds"), ops=ops,
                            shapes=args.shapes, sparsities=args.sparsities, reps=args.reps,
                            min_sample_ms=args.min_sample_ms, quick=args.quick, peers=peer_status)
    ctx = Ctx(args, writer, peers)

    torch.manual_seed(args.seed)
    per_problem = [o for o in ("forward", "spmm_t", "sddmm", "train_step") if o in ops]
    for shape in args.shapes:
        if not per_problem:
            break
        for s in args.sparsities:
            p = make_problem(*shape, s, args.seed)
            for op in per_problem:
                {"forward": bench_forward, "spmm_t": bench_spmm_t, "sddmm": bench_sddmm,
                 "train_step": bench_train_step}[op](ctx, p)
            del p
    if "neq_grad" in ops:
        for shape in args.neq_shapes:
            for f in args.frozen:
                bench_neq_grad(ctx, shape, f)
    if "masked_sgd" in ops:
        bench_masked_sgd(ctx, args.sgd_sparsity)
    cross = report_crossovers(ctx) if "forward" in ops else {}

    info["loadavg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    failed = sorted({(r["op"], r["contender"], r["correct"]) for r in ctx.results
                     if r.get("correct") not in (None, "ok")})
    common.update_runs_json(args.csv, run_id, system=info, crossover_forward=cross,
                            torch_sparse_forward=ctx.torch_sparse_choice, failed=failed,
                            finished=common._dt.datetime.now().isoformat(timespec="seconds"))
    print(f"\nelapsed {time.perf_counter() - t_start:.1f} s; wrote {len(writer.rows)} rows to {args.csv} "
          f"(run {run_id}); metadata in "
          f"{common.runs_json_path(args.csv)}")
    if failed:
        print("FAILED correctness checks (not timed):")
        for op, name, why in failed:
            print(f"  {op} / {name}: {why}")
    if args.markdown:
        import bench_to_md
        print()
        print(bench_to_md.render(writer.rows, common.read_runs_json(args.csv).get(run_id, {})))
    return 1 if any(name.startswith("sparseticket") for _, name, _ in failed) else 0


if __name__ == "__main__":
    sys.exit(main())
