"""Lottery tickets: iterative magnitude pruning runner.

    from sparseticket.lottery import IMPHparams, IMPRun
    rows = IMPRun(IMPHparams().replace(dataset="digits", levels=3)).run()
"""
from .hparams import IMPHparams
from .runner import IMPRun

__all__ = ["IMPHparams", "IMPRun"]
