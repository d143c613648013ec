"""Masked optimizers: torch.optim.SGD / AdamW that keep pruned weights at exactly zero and
frozen (NEq) neurons untouched, reading the masks from the layers at every step."""
from .adamw import MaskedAdamW, python_masked_adamw_
from .sgd import MaskedSGD

__all__ = ["MaskedSGD", "MaskedAdamW", "python_masked_adamw_"]
