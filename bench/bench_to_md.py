#!/usr/bin/env python
"""Markdown tables for BENCHMARKS.md from bench_kernels.py's CSV.

    python bench/bench_to_md.py                                  # latest run of bench/results/kernels.csv
    python bench/bench_to_md.py --run RUN_ID[,RUN_ID...] --out tables.md
    python bench/bench_to_md.py --update BENCHMARKS.md           # replace the generated section in place

Every ratio is taken from one run (the baseline measured next to the contender,
interleaved), never across runs. Speedup = baseline median / contender median.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import fmt_ms, fmt_ratio, markdown_table, read_csv, read_runs_json  # noqa: E402

BEGIN = "<!-- bench_to_md: kernels begin (generated; edit bench/bench_to_md.py, not this section) -->"
END = "<!-- bench_to_md: kernels end -->"
ORDER = ["dense", "sparseticket", "sparseticket_spmm", "sparseticket_compact", "torch_sparse", "torch_index",
         "sparseprop", "sparselab"]
PEERS = ("sparseprop", "sparselab")
NUMERIC = ("B", "I", "O", "sparsity", "median_ms", "p25_ms", "p75_ms", "iqr_ms", "reps", "inner", "flops_executed",
           "flops_dense_equiv", "gflops_executed", "gflops_dense_equiv", "ratio_vs_baseline", "threads")
OP_TITLES = OrderedDict([
    ("forward", "Forward y = x Wᵀ + b (baseline: dense F.linear with the masked weight)"),
    ("spmm_t", "Input gradient gx = gy W (baseline: dense gy @ W)"),
    ("sddmm", "Kept-weight gradient, SDDMM (baseline: the dense weight gradient gyᵀ x)"),
    ("train_step", "Whole training step of one layer (baseline: F.linear, backward, SGD(foreach), W.mul_(mask))"),
])


# ----------------------------------------------------------------------------- data


def _num(v):
    if v is None or v == "":
        return None
    if isinstance(v, (int, float)):
        return None if (isinstance(v, float) and math.isnan(v)) else v
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


def normalise(rows: Sequence[dict]) -> List[dict]:
    out = []
    for r in rows:
        r = dict(r)
        for k in NUMERIC:
            r[k] = _num(r.get(k))
        out.append(r)
    return out


def _shape(r) -> Tuple[int, int, int]:
    return (int(r["B"]), int(r["I"]), int(r["O"]))


def _shape_str(s) -> str:
    return "×".join(map(str, s))


def _pct(s) -> str:
    return f"{100 * float(s):g}%"


def _rank(name: str) -> Tuple[int, str]:
    for i, o in enumerate(ORDER):
        if name == o or (o == "torch_sparse" and name.startswith("torch_sparse")):
            return (i, name)
    return (len(ORDER), name)


def crossover(points: Sequence[Tuple[float, float]]) -> Tuple[Optional[float], Optional[float], str]:
    """From (sparsity, speedup) points: the lowest measured sparsity from which the speedup
    stays > 1 at every higher measured sparsity, an estimate interpolated (in log speedup)
    between it and the measured point below it, and a phrase saying which case it is."""
    pts = sorted((float(s), float(r)) for s, r in points if r is not None and float(r) > 0)
    if not pts:
        return None, None, "no data"
    i = len(pts)
    while i > 0 and pts[i - 1][1] > 1.0:
        i -= 1
    if i == len(pts):
        return None, None, f"never (slower even at {_pct(pts[-1][0])})"
    s_win, r_win = pts[i]
    if i == 0:
        return s_win, None, f"≤ {_pct(s_win)} (faster at every measured sparsity)"
    s_lose, r_lose = pts[i - 1]
    a, b = math.log(r_lose), math.log(r_win)
    est = s_lose + (s_win - s_lose) * (0 - a) / (b - a) if b != a else s_win
    return s_win, est, f"{_pct(s_win)} (interpolated {100 * est:.1f}%)"


class Index:
    """rows by (op, shape, sparsity, param) -> {contender: row}"""

    def __init__(self, rows: Sequence[dict]):
        self.groups: Dict[tuple, Dict[str, dict]] = OrderedDict()
        for r in rows:
            if r["op"].startswith("crossover"):
                continue
            key = (r["op"], _shape(r) if r["B"] is not None else None, r["sparsity"], r.get("param") or "")
            self.groups.setdefault(key, {})[r["contender"]] = r

    def ops(self):
        return list(OrderedDict.fromkeys(k[0] for k in self.groups))

    def shapes(self, op):
        shapes = list(OrderedDict.fromkeys(k[1] for k in self.groups if k[0] == op))
        return sorted(shapes, key=lambda s: (-(s[1] * s[2]), s[0])) if all(shapes) else shapes

    def sparsities(self, op, shape):
        return sorted({k[2] for k in self.groups if k[0] == op and k[1] == shape})

    def get(self, op, shape, sparsity, param="") -> Dict[str, dict]:
        return self.groups.get((op, shape, sparsity, param), {})

    def contenders(self, op, shape=None):
        names = set()
        for k, g in self.groups.items():
            if k[0] == op and (shape is None or k[1] == shape):
                names |= set(g)
        return sorted(names, key=_rank)

    def ratio(self, op, shape, sparsity, name, param=""):
        r = self.get(op, shape, sparsity, param).get(name)
        return r["ratio_vs_baseline"] if r else None

    def ms(self, op, shape, sparsity, name, param=""):
        r = self.get(op, shape, sparsity, param).get(name)
        return r["median_ms"] if r else None


def _rel(a_ms, b_ms):
    """How many times faster a is than b (b / a), from one run."""
    if a_ms is None or b_ms is None or a_ms <= 0:
        return None
    return b_ms / a_ms


def _best_peer(g: Dict[str, dict]) -> Optional[Tuple[str, float]]:
    peers = [(n, g[n]["median_ms"]) for n in PEERS if n in g and g[n]["median_ms"]]
    return min(peers, key=lambda t: t[1]) if peers else None


def _torch_sparse_ms(g: Dict[str, dict]) -> Optional[float]:
    ts = [r["median_ms"] for n, r in g.items() if n.startswith("torch_sparse") and r["median_ms"]]
    return min(ts) if ts else None


# ----------------------------------------------------------------------------- sections


def _cell(r: Optional[dict]) -> str:
    if r is None:
        return "–"
    if r.get("correct") not in (None, "", "ok"):
        return "**wrong**"
    if r["median_ms"] is None:
        return "–"
    return f"{fmt_ms(r['median_ms'])} ({fmt_ratio(r['ratio_vs_baseline'])})"


def section_summary(ix: Index, op: str, title: str) -> str:
    shapes = ix.shapes(op)
    sps = sorted({s for sh in shapes for s in ix.sparsities(op, sh)})
    rows = []
    for s in sps:
        rows.append([_pct(s)] + [fmt_ratio(ix.ratio(op, sh, s, "sparseticket")) for sh in shapes])
    return f"**{title}**\n\n" + markdown_table(["sparsity"] + [_shape_str(sh) for sh in shapes], rows)


def section_detail(ix: Index, op: str) -> str:
    parts = [f"### {OP_TITLES.get(op, op)}",
             "Cells: median ms (speedup over the dense baseline of the same run). "
             "“vs torch.sparse” and “vs best peer”: how many times faster sparseticket is. "
             "“spread”: the largest IQR/median among the row's contenders."]
    for sh in ix.shapes(op):
        names = ix.contenders(op, sh)
        others = [n for n in names if n != "dense"]
        has_ts = any(n.startswith("torch_sparse") for n in names)
        has_peer = any(n in PEERS for n in names)
        headers = ["sparsity", "dense ms"] + others
        if has_ts:
            headers.append("vs torch.sparse")
        if has_peer:
            headers.append("vs best peer")
        headers += ["sparseticket GFLOP/s exec", "spread"]
        rows = []
        for s in ix.sparsities(op, sh):
            g = ix.get(op, sh, s)
            st = g.get("sparseticket")
            st_ms = st["median_ms"] if st else None
            row = [_pct(s), fmt_ms(g["dense"]["median_ms"]) if "dense" in g else "–"]
            row += [_cell(g.get(n)) for n in others]
            if has_ts:
                row.append(fmt_ratio(_rel(st_ms, _torch_sparse_ms(g))))
            if has_peer:
                bp = _best_peer(g)
                row.append(f"{fmt_ratio(_rel(st_ms, bp[1]))} ({bp[0]})" if bp else "–")
            row.append(f"{st['gflops_executed']:.1f}" if st and st.get("gflops_executed") else "–")
            spreads = [r["iqr_ms"] / r["median_ms"] for r in g.values()
                       if r.get("iqr_ms") is not None and r["median_ms"]]
            row.append(f"{100 * max(spreads):.0f}%" if spreads else "–")
            rows.append(row)
        parts.append(f"**{_shape_str(sh)}** (B×I×O)\n\n" + markdown_table(headers, rows))
    return "\n\n".join(parts)


def section_crossover(ix: Index) -> str:
    op = "forward"
    names = [n for n in ix.contenders(op) if n != "dense"]
    rows = []
    for sh in ix.shapes(op):
        row = [_shape_str(sh)]
        for n in names:
            pts = [(s, ix.ratio(op, sh, s, n)) for s in ix.sparsities(op, sh)]
            row.append(crossover(pts)[2])
        rows.append(row)
    return ("### Crossover with dense forward\n\nThe lowest measured sparsity from which the contender beats dense "
            "F.linear at every higher measured sparsity (and a log-linear interpolation between the grid points "
            "around it).\n\n" + markdown_table(["shape"] + names, rows, "l" * (len(names) + 1)))


def section_neq(ix: Index) -> str:
    rows = []
    for (op, sh, _s, param), g in ix.groups.items():
        if op != "neq_grad":
            continue
        f = float(param.split("=")[1]) if "=" in param else None
        st, d = g.get("sparseticket"), g.get("dense")
        ti = g.get("torch_index")
        tr = (st["median_ms"] / d["median_ms"]) if (st and d and st["median_ms"] and d["median_ms"]) else None
        tri = (ti["median_ms"] / d["median_ms"]) if (ti and d and ti["median_ms"] and d["median_ms"]) else None
        target = (1 - f + 0.1) if f is not None else None
        met = "–" if tr is None or target is None else ("yes" if tr <= target else f"**no** (+{tr - target:.2f})")
        rows.append([_shape_str(sh), f"{f:g}" if f is not None else param, fmt_ms(d["median_ms"] if d else None),
                     _cell(st), f"{tr:.3f}" if tr else "–", f"{1 - f:.2f}" if f is not None else "–",
                     f"≤ {target:.2f}" if target else "–", met, f"{tri:.3f}" if tri else "–"])
    if not rows:
        return ""
    return ("### Neuron-skipping weight gradient (fraction f of rows frozen)\n\n"
            "Time ratio = sparseticket.row_masked_grad_weight / dense gyᵀx (all rows), same run; "
            "torch_index = index_select + mm + index_copy_.\n\n" +
            markdown_table(["shape", "f", "dense ms", "sparseticket", "time ratio", "ideal 1−f", "target", "met",
                            "torch_index ratio"], rows))


def section_sgd(ix: Index) -> str:
    rows = []
    for (op, _sh, s, _param), g in ix.groups.items():
        if op != "masked_sgd":
            continue
        for n in sorted(g, key=_rank):
            r = g[n]
            rows.append([n, r.get("variant", ""), _pct(s), _cell(r),
                         fmt_ms(r["iqr_ms"]) if r.get("iqr_ms") is not None else "–"])
    if not rows:
        return ""
    return ("### Masked SGD over ResNet-18's parameters (11,689,512 values, momentum 0.9, weight decay 5e-4)\n\n"
            "Baseline: torch.optim.SGD(foreach=True).step() then re-masking the pruned weights.\n\n" +
            markdown_table(["contender", "what", "weight sparsity", "ms (speedup)", "IQR ms"], rows, "llrrr"))


def section_targets(ix: Index) -> str:
    """Issue 2's performance targets, checked against this run's numbers."""
    rows = []

    def add(what, value, ok, note=""):
        if value is None:
            rows.append([what, "not measured", "–", note])
        else:
            rows.append([what, value, "yes" if ok else "**no**", note])

    big, mid = (128, 4096, 4096), (256, 1024, 1024)
    for s, t in ((0.9, 4), (0.95, 8), (0.98, 15)):
        r = ix.ratio("forward", big, s, "sparseticket")
        add(f"forward {_shape_str(big)} @ {_pct(s)} ≥ {t}x dense", fmt_ratio(r) if r else None, r and r >= t,
            "" if r is None or r >= t else f"missed by {t / r:.2f}x")
    for s in (0.9, 0.95, 0.98):
        g = ix.get("forward", big, s)
        st = g.get("sparseticket")
        r = _rel(st["median_ms"] if st else None, _torch_sparse_ms(g))
        add(f"forward {_shape_str(big)} @ {_pct(s)} ≥ 1.5x torch.sparse", fmt_ratio(r) if r else None, r and r >= 1.5)
    sps = ix.sparsities("forward", mid)
    if sps:
        c, est, phrase = crossover([(s, ix.ratio("forward", mid, s, "sparseticket")) for s in sps])
        add(f"forward crossover on {_shape_str(mid)} ≤ 70%", phrase, c is not None and c <= 0.7)
    else:
        add(f"forward crossover on {_shape_str(mid)} ≤ 70%", None, False)
    for sh in (big, mid):
        for s, t in ((0.9, 3), (0.95, 6)):
            r = ix.ratio("train_step", sh, s, "sparseticket")
            add(f"train step {_shape_str(sh)} @ {_pct(s)} ≥ {t}x dense masked step", fmt_ratio(r) if r else None,
                r and r >= t, "" if r is None or r >= t else f"missed by {t / r:.2f}x")
    for f in (0.25, 0.5, 0.75):
        g = ix.get("neq_grad", mid, 0.0, f"frozen={f:g}")
        st, d = g.get("sparseticket"), g.get("dense")
        tr = (st["median_ms"] / d["median_ms"]) if (st and d and st["median_ms"] and d["median_ms"]) else None
        add(f"neuron-skipping gW {_shape_str(mid)}, f={f:g}: time ≤ {1 - f + 0.1:.2f} of dense",
            f"{tr:.3f}" if tr else None, tr is not None and tr <= 1 - f + 0.1)
    sgd = [g for k, g in ix.groups.items() if k[0] == "masked_sgd"]
    r1 = sgd[0].get("sparseticket", {}).get("ratio_vs_baseline") if sgd else None
    r2 = sgd[0].get("sparseticket_compact", {}).get("ratio_vs_baseline") if sgd else None
    add("masked SGD ResNet-18, dense storage ≥ 1.5x SGD(foreach)+re-mask", fmt_ratio(r1) if r1 else None,
        r1 and r1 >= 1.5)
    add("masked SGD ResNet-18, compact values @ 90% ≥ 5x", fmt_ratio(r2) if r2 else None, r2 and r2 >= 5)
    for op in ("forward", "train_step"):
        cells, lost, worst = 0, [], None
        for sh in ix.shapes(op):
            for s in ix.sparsities(op, sh):
                if s < 0.8:
                    continue
                g = ix.get(op, sh, s)
                bp, st = _best_peer(g), g.get("sparseticket")
                if not bp or not st or not st["median_ms"]:
                    continue
                cells += 1
                r = bp[1] / st["median_ms"]
                worst = r if worst is None else min(worst, r)
                if r <= 1:
                    lost.append(f"{_shape_str(sh)}@{_pct(s)} ({fmt_ratio(r)} vs {bp[0]})")
        add(f"{op}: ahead of the best peer at every sparsity ≥ 80%",
            f"{cells - len(lost)}/{cells} cells, worst {fmt_ratio(worst)}" if cells else None, cells and not lost,
            "; ".join(lost[:6]) + (" …" if len(lost) > 6 else ""))
    return ("### Targets of issue 2 (this run)\n\n" +
            markdown_table(["target", "measured", "met", "note"], rows, "llll"))


def section_header(runs: Sequence[dict], rows: Sequence[dict]) -> str:
    lines = ["## Kernel microbenchmarks", ""]
    for meta in runs:
        sysinfo = meta.get("system", {})
        lines.append(f"Run `{meta.get('run_id')}` ({meta.get('started', '?')} → {meta.get('finished', 'unfinished')}), "
                     f"produced by:\n\n```\n{meta.get('command', '(command not recorded)')}\n```\n")
        if sysinfo:
            lines.append(f"- CPU: {sysinfo.get('cpu')}, {sysinfo.get('cores_online')} cores; ISA: "
                         f"{' '.join(sysinfo.get('isa', []))}")
            omp = ", ".join(f"{k}={v}" for k, v in sysinfo.get("openmp_threads", {}).items())
            lines.append(f"- torch {sysinfo.get('torch')} (ATen kernels: {sysinfo.get('torch_cpu_capability')}, "
                         f"BLAS: {sysinfo.get('torch_blas')}); threads: {sysinfo.get('threads')} "
                         f"(OpenMP runtimes: {omp})")
            if sysinfo.get("env"):
                lines.append("- environment: " + " ".join(f"`{k}={v}`" for k, v in sysinfo["env"].items()))
            be = sysinfo.get("sparseticket_backend_cpu")
            lines.append(f"- sparseticket {sysinfo.get('sparseticket')}, CPU backend: **{be}**")
            if be != "c++":
                lines.append("  - **these sparseticket numbers come from the pure-PyTorch reference path, not the "
                             "compiled kernels**")
            la0, la1 = sysinfo.get("loadavg_1m_at_start"), sysinfo.get("loadavg_1m_at_end")
            if la0 is not None:
                busy = la0 > 0.5 * (sysinfo.get("cores_online") or 1)
                lines.append(f"- load average (1 min): {la0:.2f} at start"
                             + (f", {la1:.2f} at end" if la1 is not None else "")
                             + (" — **the machine was busy before this run: timings unreliable**" if busy else ""))
        peers = meta.get("peers", {})
        if peers:
            lines.append("- peers: " + "; ".join(peers.values()))
        ts = meta.get("torch_sparse_forward", {})
        if ts:
            lines.append("- torch.sparse forward formulation (fastest of a probe at 90% sparsity, per shape): " +
                         "; ".join(f"{k}: `{v['chosen']}`" for k, v in ts.items()))
        if meta.get("failed"):
            lines.append("- **failed correctness checks (not timed)**: " +
                         "; ".join(f"{op}/{n}: {why}" for op, n, why in meta["failed"]))
        lines.append("")
    reps = sorted({r["reps"] for r in rows if r.get("reps")})
    lines.append("Method: fp32; before timing, each contender (dense baseline included) is checked against "
                 "sparseticket's pure-PyTorch reference run in float64 (a contender that fails is marked **wrong** "
                 "and not timed); contenders "
                 f"interleaved round-robin, median of {'/'.join(map(str, reps)) or '?'} samples (each sample ≥ "
                 "min-sample-ms of back-to-back calls); speedups are ratios to the dense baseline measured in the same "
                 "run. Weights have exactly the stated fraction pruned at uniformly random positions. GFLOP/s exec "
                 "counts the FLOPs actually executed (2·B·nnz per sparse matmul), not the dense-equivalent 2·B·I·O.")
    return "\n".join(lines)


def render(rows: Sequence[dict], runs_meta) -> str:
    """Markdown for ``rows`` (CSV rows or bench_kernels' in-memory rows); ``runs_meta``
    is one run's metadata dict or a list of them."""
    rows = normalise(rows)
    runs = runs_meta if isinstance(runs_meta, list) else [runs_meta]
    ix = Index(rows)
    parts = [section_header(runs, rows)]
    ops = ix.ops()
    summ = [section_summary(ix, op, t) for op, t in (("forward", "Forward: sparseticket speedup over dense F.linear"),
                                                     ("train_step", "Training step: sparseticket speedup over the "
                                                                    "dense masked step")) if op in ops]
    if summ:
        parts.append("### Summary (speedup over dense, same run)\n\n" + "\n\n".join(summ))
    if any(op in ops for op in OP_TITLES):
        parts.append(section_targets(ix))
    if "forward" in ops:
        parts.append(section_crossover(ix))
    for op in OP_TITLES:
        if op in ops:
            parts.append(section_detail(ix, op))
    for sec in (section_neq(ix), section_sgd(ix)):
        if sec:
            parts.append(sec)
    return "\n\n".join(parts) + "\n"


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", default=os.path.join(here, "results", "kernels.csv"))
    ap.add_argument("--run", default="latest", help="run id(s), comma-separated, or 'latest' (default)")
    ap.add_argument("--out", help="write the markdown here (default: stdout)")
    ap.add_argument("--update", metavar="MD", help=f"replace the section between the markers {BEGIN!r} and "
                                                   f"{END!r} in this file (appended if absent)")
    args = ap.parse_args(argv)
    if not os.path.exists(args.csv):
        raise SystemExit(f"bench_to_md: {args.csv} does not exist; run bench/bench_kernels.py first")
    rows = read_csv(args.csv)
    if not rows:
        raise SystemExit(f"bench_to_md: {args.csv} has no rows")
    meta = read_runs_json(args.csv)
    if args.run == "latest":
        ids = [rows[-1]["run_id"]]
    else:
        ids = [r.strip() for r in args.run.split(",") if r.strip()]
        missing = [i for i in ids if not any(r["run_id"] == i for r in rows)]
        if missing:
            raise SystemExit(f"bench_to_md: no rows for run(s) {missing} in {args.csv}")
    sel = [r for r in rows if r["run_id"] in ids]
    md = render(sel, [meta.get(i, {"run_id": i}) for i in ids])
    if args.update:
        text = open(args.update).read() if os.path.exists(args.update) else ""
        block = f"{BEGIN}\n{md}{END}\n"
        if BEGIN in text and END in text:
            pre, rest = text.split(BEGIN, 1)
            post = rest.split(END, 1)[1].lstrip("\n")
            text = pre + block + post
        else:
            text = text + ("\n" if text and not text.endswith("\n") else "") + block
        with open(args.update, "w") as f:
            f.write(text)
        print(f"updated {args.update} from run(s) {', '.join(ids)}")
    elif args.out:
        with open(args.out, "w") as f:
            f.write(md)
        print(f"wrote {args.out} from run(s) {', '.join(ids)}")
    else:
        sys.stdout.write(md)


if __name__ == "__main__":
    main()
