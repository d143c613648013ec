"""Hyperparameters of the NEq tracker."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Union

from torch import nn

RULES = ("paper", "code")
STORE_DTYPES = ("float32", "float16", "bfloat16")

ModuleFilter = Union[None, Sequence[str], Callable[[str, nn.Module], bool]]


@dataclass
class NEqConfig:
    """What the tracker measures and how it decides.

    eps:        threshold ε. ``rule='paper'`` freezes when |v| < ε (strict);
                ``rule='code'`` freezes when |m| <= ε (inclusive), as the authors' code does.
    mu_eq:      velocity momentum μ_eq (paper), or the smoothing μ of the code's buffer s.
    rule:       'paper' (published equations, default) or 'code' (the authors' public
                code); docs/NEQ.md states both and where they differ.
    val_size:   number of validation samples kept as the fixed set Ξ (None: all given).
    val_batch_size: batch size of the validation passes (None: the loader's, else 128).
                The paper rule does not depend on it; the code rule does (linear layers).
    modules:    which modules to track: None (every NEq-capable module), a list of
                module names, or a callable ``(name, module) -> bool``.
    warmup:     extra measured epochs, after the rule's own warm-up, that freeze nothing.
    stochastic: the paper's control: instead of measuring, freeze a random fraction of
                each layer's neurons every epoch (a float, or {module name: fraction}).
    seed:       seeds the validation subset, the stochastic masks and spatial subsampling.
    store_dtype: dtype of the stored previous-epoch outputs ('float32', 'float16',
                'bfloat16'); they are stored normalised, so half precision is safe.
    spatial_positions: keep at most this many spatial positions (a fixed random subset,
                same for every sample and epoch) of each channel of a conv / sequence
                output. Bounds memory; φ is then estimated on that subset.
    broadcast:  under torch.distributed, broadcast rank 0's decisions so every rank
                freezes the same neurons.
    """

    eps: float = 1e-3
    mu_eq: float = 0.5
    rule: str = "paper"
    val_size: int | None = None
    val_batch_size: int | None = None
    modules: ModuleFilter = None
    warmup: int = 0
    stochastic: None | float | dict[str, float] = None
    seed: int = 0
    store_dtype: str = "float32"
    spatial_positions: int | None = None
    broadcast: bool = True

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"NEqConfig.rule must be one of {RULES}, got {self.rule!r}")
        if not (self.eps >= 0):
            raise ValueError(f"NEqConfig.eps must be >= 0, got {self.eps}")
        if not (0.0 <= self.mu_eq <= 1.0):
            raise ValueError(f"NEqConfig.mu_eq must be in [0, 1], got {self.mu_eq}")
        if self.val_size is not None and (int(self.val_size) != self.val_size or self.val_size < 1):
            raise ValueError(f"NEqConfig.val_size must be a positive integer or None, got {self.val_size}")
        if self.val_batch_size is not None and (int(self.val_batch_size) != self.val_batch_size
                                                or self.val_batch_size < 1):
            raise ValueError(f"NEqConfig.val_batch_size must be a positive integer or None, got {self.val_batch_size}")
        if int(self.warmup) != self.warmup or self.warmup < 0:
            raise ValueError(f"NEqConfig.warmup must be a non-negative integer, got {self.warmup}")
        if self.store_dtype not in STORE_DTYPES:
            raise ValueError(f"NEqConfig.store_dtype must be one of {STORE_DTYPES}, got {self.store_dtype!r}")
        if self.spatial_positions is not None and (int(self.spatial_positions) != self.spatial_positions
                                                   or self.spatial_positions < 1):
            raise ValueError(f"NEqConfig.spatial_positions must be a positive integer or None, "
                             f"got {self.spatial_positions}")
        fr = self.stochastic
        if fr is not None:
            items = fr.items() if isinstance(fr, dict) else [("stochastic", fr)]
            for k, f in items:
                if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 <= f <= 1.0):
                    raise ValueError(f"NEqConfig.stochastic: fraction for {k!r} must be in [0, 1], got {f!r}")

    def to_dict(self) -> dict:
        """Plain-data form for checkpoints (a callable ``modules`` filter is not stored)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        if callable(d["modules"]):
            d["modules"] = "<callable>"
        elif d["modules"] is not None:
            d["modules"] = list(d["modules"])
        if isinstance(d["stochastic"], dict):
            d["stochastic"] = dict(d["stochastic"])
        return d


# Fields that change what the tracker computes: a checkpoint must agree on them.
STATE_FIELDS = ("eps", "mu_eq", "rule", "val_size", "val_batch_size", "warmup", "stochastic", "seed",
                "store_dtype", "spatial_positions")
