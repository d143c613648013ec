"""Mask: the keep masks of a model's prunable layers, validated, with the counts people quote."""
from __future__ import annotations

from typing import Dict, Iterator, Mapping

import torch
from torch import Tensor, nn


class Mask(Mapping[str, Tensor]):
    """{layer name: bool keep mask of the layer's weight shape}, immutable once built.

    The layer names are those of ``model.named_modules()``; ``True`` keeps a weight.
    """

    def __init__(self, masks: Mapping[str, Tensor]):
        checked: Dict[str, Tensor] = {}
        for name, m in masks.items():
            if not isinstance(m, Tensor):
                raise TypeError(f"sparseticket: Mask: layer '{name}': mask must be a tensor, got {type(m).__name__}")
            if m.dtype != torch.bool:
                if m.is_floating_point() or m.dtype in (torch.uint8, torch.int8, torch.int32, torch.int64):
                    bad = (m != 0) & (m != 1)
                    if bool(bad.any()):
                        raise ValueError(f"sparseticket: Mask: layer '{name}': mask must be binary (0/1), found "
                                         f"{m[bad].flatten()[0].item()!r}")
                    m = m != 0
                else:
                    raise TypeError(f"sparseticket: Mask: layer '{name}': mask must be bool or 0/1, got {m.dtype}")
            checked[name] = m.detach().to("cpu").contiguous()
        self._masks = checked

    # -- Mapping
    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"Mask({len(self)} layers, {100 * self.density:.2f}% kept)"

    # -- construction
    @classmethod
    def ones_like(cls, weights: Mapping[str, Tensor]) -> "Mask":
        return cls({n: torch.ones(w.shape, dtype=torch.bool) for n, w in weights.items()})

    # -- counts
    def kept(self, name: str | None = None) -> int:
        if name is not None:
            return int(self._masks[name].sum())
        return sum(int(m.sum()) for m in self._masks.values())

    def numel(self, name: str | None = None) -> int:
        if name is not None:
            return self._masks[name].numel()
        return sum(m.numel() for m in self._masks.values())

    @property
    def density(self) -> float:
        n = self.numel()
        return self.kept() / n if n else 1.0

    def layer_density(self) -> Dict[str, float]:
        return {n: (int(m.sum()) / m.numel() if m.numel() else 1.0) for n, m in self._masks.items()}

    def check_compatible(self, weights: Mapping[str, Tensor], what: str = "model") -> None:
        """Raise naming the layer if ``weights`` lacks a masked layer or has another shape."""
        for n, m in self._masks.items():
            if n not in weights:
                raise KeyError(f"sparseticket: the mask names layer '{n}', which the {what} does not have "
                               f"(prunable layers: {sorted(weights)})")
            if tuple(weights[n].shape) != tuple(m.shape):
                raise ValueError(f"sparseticket: layer '{n}': mask has shape {tuple(m.shape)} but the {what}'s "
                                 f"weight has shape {tuple(weights[n].shape)}")

    def is_subset_of(self, other: "Mask") -> bool:
        return set(self) == set(other) and all(bool((self[n] & ~other[n]).sum() == 0) for n in self)

    def digest(self) -> str:
        """SHA-256 of the layer names, shapes and bits: equal digests, equal masks (for files
        that must agree with a mask without holding it, e.g. the IMP runner's checkpoints)."""
        import hashlib
        h = hashlib.sha256()
        for n in sorted(self._masks):
            m = self._masks[n]
            h.update(f"{n}:{tuple(m.shape)};".encode())
            h.update(m.flatten().numpy().tobytes())
        return h.hexdigest()

    def state_dict(self) -> Dict[str, Tensor]:
        return dict(self._masks)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> "Mask":
        return cls(sd)


def prunable_weights(model: nn.Module, include_conv: bool = True) -> Dict[str, Tensor]:
    """{name: dense-equivalent weight} of every Linear / Conv2d (dense, NEq or sparse) of ``model``."""
    from ..nn import SparseConv2d, SparseLinear
    out: Dict[str, Tensor] = {}
    for name, m in model.named_modules():
        if isinstance(m, (SparseLinear, SparseConv2d)):
            if include_conv or isinstance(m, SparseLinear):
                out[name] = m.dense_weight().detach()
        elif isinstance(m, nn.Linear) or (include_conv and isinstance(m, nn.Conv2d)):
            w = m._parameters.get("weight_orig")
            out[name] = (w if w is not None else m.weight).detach()
    return out
