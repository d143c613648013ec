"""NEq (Neurons at Equilibrium): freeze neurons whose outputs have settled.

``NEqTracker`` measures each tracked module's neurons on a fixed validation set every
epoch and sets ``module.set_active(mask)`` so frozen neurons get no weight gradient and
no update. Two rules: ``'paper'`` (the published equations, default) and ``'code'`` (the
authors' public code). docs/NEQ.md states both and how they differ.
"""
from . import rules
from .config import NEqConfig
from .prefix import cut_frozen_outputs, freeze_prefix, frontier_cut, frozen_prefix, fully_frozen, is_neq_capable
from .tracker import NEqTracker

__all__ = ["NEqConfig", "NEqTracker", "cut_frozen_outputs", "freeze_prefix", "frontier_cut", "frozen_prefix",
           "fully_frozen", "is_neq_capable", "rules"]
