"""``sparseticket imp ...``: run (or resume) a lottery-ticket experiment from the command line."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import results as res
from .hparams import add_arguments, from_args

DESCRIPTION = """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2019),
on sparseticket's sparse kernels. Each run lives in <out>/<kind>_<model>_<data>_<baseline>_<hash>:
rerunning the same command resumes it (from the last checkpointed epoch) instead of repeating it."""


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("imp", help="run a lottery-ticket (IMP) experiment", description=DESCRIPTION,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return p


def _warm_up() -> None:
    """Pay the process's one-time costs before either timed run. The first optimizer built
    in a process imports torch._dynamo (torch.optim wraps its methods with it): 1.3-2.6 s
    on this project's machines, which would land on the level-0 time of whichever run goes
    first (the sparse one) and not on the other's."""
    import torch
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)


def run(args: argparse.Namespace) -> int:
    hp = from_args(args)
    t0 = time.perf_counter()
    if hp.run.compare_dense and hp.experiment.baseline == "sparse":
        _warm_up()
    try:
        return _run(hp, t0)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        # the runner's own errors (bad input, a folder that does not fit the command): a
        # message, not a traceback; 2 for input the command should not have been given
        if not str(e).startswith("sparseticket:"):
            raise
        print(f"sparseticket imp: error: {str(e).removeprefix('sparseticket: ')}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1


def _run(hp, t0: float) -> int:
    from .runner import IMPRun
    main = IMPRun(hp)
    print(f"run folder: {main.dir}")
    rows = main.run()
    results = main.dir / "results.csv"
    print(f"finished in {time.perf_counter() - t0:.1f} s; " + (f"results: {results}" if results.exists() else
          "no level to run (a control has one per pruned level of the main run: --levels 0 has none)"))
    if not rows:
        return 0
    if hp.experiment.baseline != "sparse":
        if hp.run.compare_dense:
            print("(--compare-dense compares a sparse run with its --baseline dense twin; this run is the dense one: "
                  "run the command without --baseline dense for the comparison)")
        return 0
    if not (hp.run.compare_dense or (main.dir / "comparison.csv").exists()):
        return 0
    twin = IMPRun(hp.replace(baseline="dense"))
    if hp.run.compare_dense:
        print(f"dense baseline: {twin.dir}")
        twin.run()
    elif not twin.dir.is_dir():
        return 0
    # every level both folders have finished (not only this command's): a run extended or
    # resumed without --compare-dense refreshes a comparison it already has
    table = _write_comparison(hp, main.dir, twin.dir)
    if hp.run.compare_dense:
        print()
        print(res.comparison_table(table))
    return 0


def _write_comparison(hp, sparse_dir: Path, dense_dir: Path) -> list:
    rows, dense_rows = res.read_rows(sparse_dir), res.read_rows(dense_dir)
    table = res.compare(rows, dense_rows)
    res.write_rows(table, sparse_dir / "comparison", res.COMPARISON_COLUMNS)
    if hp.run.plots:
        res.plot_times(table, sparse_dir / "time_per_level.png", "time per level")
        shared = {r["level"] for r in table}
        res.plot_accuracy({"sparseticket": [r for r in rows if r["level"] in shared],
                           "dense masked": [r for r in dense_rows if r["level"] in shared]},
                          sparse_dir / "accuracy_vs_dense.png", "test accuracy")
    return table
