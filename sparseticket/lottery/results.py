"""Results of lottery runs: rows as JSON and CSV, ticket sizes, comparison tables and plots."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from torch import nn

#: CSV columns, in order; nested fields (per-layer dicts) stay in the JSON only
CSV_COLUMNS = ("run", "baseline", "control", "transfer", "source_level", "level", "remaining", "train_acc",
               "test_acc", "val_acc", "epochs", "first_step", "steps", "seconds", "setup_seconds", "train_seconds",
               "eval_seconds", "neq_frozen", "ticket_bytes", "memory_bytes", "dense_bytes", "ticket_file_bytes",
               "flops_dense", "flops_executed", "threads", "kernels")


def replace_synced(tmp, path) -> None:
    """fsync the finished temporary file ``tmp``, then rename it to ``path``: a reader (or a
    run resumed after a crash) sees the old file or the new one, never a torn one."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


#: the columns of comparison.csv (``compare``'s rows; the per-layer modes are in the JSON)
COMPARISON_COLUMNS = ("level", "remaining", "test_acc", "dense_test_acc", "seconds", "dense_seconds", "speedup")


def write_rows(rows: List[dict], stem: Path, columns: Sequence[str] = CSV_COLUMNS) -> None:
    """``stem``.json (everything) and ``stem``.csv (the scalar ``columns``), each written atomically."""
    stem = Path(stem)
    tmp = stem.with_name(stem.name + ".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    replace_synced(tmp, stem.with_suffix(".json"))
    tmp = stem.with_name(stem.name + ".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in columns})
    replace_synced(tmp, stem.with_suffix(".csv"))


def read_rows(run_dir: Path) -> List[dict]:
    path = Path(run_dir) / "results.json"
    return json.loads(path.read_text()) if path.exists() else []


def ticket_bytes(model: nn.Module) -> Dict[str, int]:
    """Bytes of the weights: ``ticket_bytes`` as a ticket is stored (kept values + int32 CSR
    row pointers and columns; dense layers in full), ``memory_bytes`` as training holds it
    (plus the transposed index and position buffers built once per mask), ``dense_bytes``
    for the same model all dense."""
    from ..nn import TicketModule
    stored = memory = dense = 0
    for m in model.modules():
        params = list(m.parameters(recurse=False))
        if isinstance(m, TicketModule):
            csr = [m.weight_values, m.crow, m.col] + ([m.bias] if m.bias is not None else [])
            stored += sum(t.numel() * t.element_size() for t in csr)
            memory += sum(t.numel() * t.element_size() for t in params + [b for b in m.buffers(recurse=False)
                                                                         if b is not None])
            dense += m.weight_values.element_size() * _numel(m._weight_shape())
            dense += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
            continue
        n = sum(t.numel() * t.element_size() for t in params)
        stored, memory, dense = stored + n, memory + n, dense + n
    return {"ticket_bytes": stored, "memory_bytes": memory, "dense_bytes": dense}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# ---------------------------------------------------------------------- comparison


def compare(sparse: Sequence[dict], dense: Sequence[dict]) -> List[dict]:
    """Per level: both accuracies, both times, the speedup (dense seconds / sparse seconds)."""
    by_level = {r["level"]: r for r in dense}
    out = []
    for r in sparse:
        d = by_level.get(r["level"])
        if d is None:
            continue
        out.append(dict(level=r["level"], remaining=r["remaining"], test_acc=r["test_acc"],
                        dense_test_acc=d["test_acc"], seconds=r["seconds"], dense_seconds=d["seconds"],
                        speedup=d["seconds"] / r["seconds"] if r["seconds"] > 0 else None,
                        modes=r.get("modes", {})))
    return out


def comparison_table(rows: Sequence[dict]) -> str:
    head = f"{'level':>5} {'weights left':>12} {'test acc':>9} {'dense acc':>9} {'time':>8} {'dense':>8} {'speedup':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['level']:5d} {r['remaining']:11.2f}% {100 * r['test_acc']:8.2f}% "
                     f"{100 * r['dense_test_acc']:8.2f}% {r['seconds']:7.2f}s {r['dense_seconds']:7.2f}s "
                     f"{r['speedup']:6.2f}x")
    if rows:
        ts, td = sum(r["seconds"] for r in rows), sum(r["dense_seconds"] for r in rows)
        lines.append("-" * len(head))
        lines.append(f"{'total':>5} {'':>12} {'':>9} {'':>9} {ts:7.2f}s {td:7.2f}s {td / ts:6.2f}x")
    return "\n".join(lines)


# ---------------------------------------------------------------------- plots


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_accuracy(series: Dict[str, Sequence[dict]], path: Path, title: str = "") -> Optional[Path]:
    """Test accuracy vs % weights remaining (log axis, sparser to the right), one line per
    series (IMP, controls, dense baseline), like the lottery-ticket papers' figures."""
    plt = _pyplot()
    if plt is None or not any(series.values()):
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: -r["remaining"])
        if rows:
            ax.plot([r["remaining"] for r in rows], [100 * r["test_acc"] for r in rows], marker="o", ms=3,
                    label=label)
    ax.set_xscale("log")
    lo = min(r["remaining"] for rows in series.values() for r in rows)
    ticks = [t for t in (100, 64, 41, 26, 16.8, 10.7, 6.9, 4.4, 2.8, 1.8, 1.2, 0.7, 0.5, 0.3, 0.2, 0.1) if t >= lo * 0.9]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.invert_xaxis()
    ax.set_xlabel("% of weights remaining")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, which="both", alpha=0.3)
    return _save(plt, fig, ax, title, path)


def _save(plt, fig, ax, title: str, path: Path) -> Path:
    """Legend and title, then the figure to ``path`` (PNG, written atomically) and closed."""
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    tmp = Path(str(path) + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    replace_synced(tmp, path)
    return path


def plot_times(rows: Sequence[dict], path: Path, title: str = "") -> Optional[Path]:
    """Seconds per level, accelerated vs dense, from ``compare`` rows."""
    plt = _pyplot()
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    x = [f"{r['remaining']:.1f}" for r in rows]
    idx = range(len(rows))
    ax.bar([i - 0.2 for i in idx], [r["dense_seconds"] for r in rows], width=0.4, label="dense masked")
    ax.bar([i + 0.2 for i in idx], [r["seconds"] for r in rows], width=0.4, label="sparseticket")
    ax.set_xticks(list(idx))
    ax.set_xticklabels(x, rotation=60, fontsize=7)
    ax.set_xlabel("% of weights remaining (level)")
    ax.set_ylabel("seconds per level")
    return _save(plt, fig, ax, title, path)


def plot_run(run_dir: Path) -> Optional[Path]:
    """accuracy.png of one run folder (its own rows)."""
    rows = read_rows(run_dir)
    return plot_accuracy({Path(run_dir).name.split("_")[0]: rows}, Path(run_dir) / "accuracy.png",
                         Path(run_dir).name)
