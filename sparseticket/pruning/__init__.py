"""Pruning strategies and masks: ``Strategy.prune(weights, current) -> Mask``.

    from sparseticket.pruning import Mask, get_strategy, prunable_weights
    s = get_strategy("magnitude", fraction=0.2, overrides={"fc3": 0.1})
    mask = s.prune(prunable_weights(model), Mask.ones_like(prunable_weights(model)))
"""
from .mask import Mask, prunable_weights
from .strategies import STRATEGIES, MagnitudePruning, RandomPruning, Strategy, get_strategy, register_strategy

__all__ = ["Mask", "prunable_weights", "Strategy", "MagnitudePruning", "RandomPruning", "STRATEGIES",
           "get_strategy", "register_strategy"]
