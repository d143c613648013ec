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
    from .runner import IMPRun
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
    print(f"finished in {time.perf_counter() - t0:.1f} s; results: {main.dir / 'results.csv'}")
    if hp.run.compare_dense and hp.experiment.baseline == "sparse":
        twin = IMPRun(hp.replace(baseline="dense"))
        print(f"dense baseline: {twin.dir}")
        dense_rows = twin.run()
        table = res.compare(rows, dense_rows)
        res.write_rows(table, main.dir / "comparison", res.COMPARISON_COLUMNS)
        if hp.run.plots:
            res.plot_times(table, main.dir / "time_per_level.png", "time per level")
            res.plot_accuracy({"sparseticket": rows, "dense masked": dense_rows}, main.dir / "accuracy_vs_dense.png",
                              "test accuracy")
        print()
        print(res.comparison_table(table))
    return 0
