"""``Ticket``: a pruned weight in compact form, with the structures its kernels need."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from . import ops


@dataclass
class Ticket:
    """A weight W: [out_features, in_features] of which only ``nnz`` entries are kept.

    ``values`` ([nnz], row-major) are the kept weights; ``crow``/``col`` (int32 CSR) say
    where they sit; ``ccol``/``row``/``perm`` (int32 CSC + permutation into ``values``)
    are the transpose, built once per mask so the input gradient is a gather, not a
    scatter. Only ``values`` changes during training; the rest changes with the mask.
    """

    values: Tensor
    crow: Tensor
    col: Tensor
    ccol: Tensor
    row: Tensor
    perm: Tensor
    shape: Tuple[int, int]

    @classmethod
    def from_dense(cls, weight: Tensor, mask: Tensor) -> "Ticket":
        """weight: [O, I] float, mask: [O, I] bool (True = kept)."""
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            mask = _as_bool_mask(mask, "mask")
        values, crow, col = ops.dense_to_ticket(weight.detach(), mask)
        return cls.from_csr(values, crow, col, tuple(weight.shape))

    @classmethod
    def from_csr(cls, values: Tensor, crow: Tensor, col: Tensor, shape: Tuple[int, int]) -> "Ticket":
        ccol, row, perm = ops.ticket_transpose(crow, col, shape[1])
        return cls(values, crow, col, ccol, row, perm, (int(shape[0]), int(shape[1])))

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        n = self.shape[0] * self.shape[1]
        return self.nnz / n if n else 0.0

    def to_dense(self) -> Tensor:
        return ops.ticket_to_dense(self.values, self.crow, self.col, self.shape[1])

    def mask(self) -> Tensor:
        ones = torch.ones_like(self.values, dtype=torch.float32)
        return ops.ticket_to_dense(ones, self.crow, self.col, self.shape[1]) != 0

    def with_values(self, values: Tensor) -> "Ticket":
        return Ticket(values, self.crow, self.col, self.ccol, self.row, self.perm, self.shape)


def _as_bool_mask(mask, name: str) -> Tensor:
    """Accept a bool mask, or a numeric one whose entries are all 0 or 1."""
    mask = torch.as_tensor(mask)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(f"sparseticket: {name} must be binary (0/1), found value "
                             f"{mask[bad].flatten()[0].item()!r}")
        return mask != 0
    raise TypeError(f"sparseticket: {name} must be a bool or 0/1 tensor, got {mask.dtype}")
