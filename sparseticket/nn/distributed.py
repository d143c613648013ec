"""Checks for data-parallel training of sparse models (torch.distributed).

DDP compares the shapes of the ranks' parameters when it is built, so tickets with
another number of kept weights fail there; two masks with the same count pass, and each
rank would then train its own structure. ``check_same_masks`` compares the structures
themselves, with one small all-gather.
"""
from __future__ import annotations

import hashlib
from typing import List, Optional, Tuple

import torch
from torch import nn

from ._common import TicketModule


def _structures(model: nn.Module) -> List[Tuple[str, torch.Tensor]]:
    """(what, tensor) per ticket layer's structure and per NEq layer's active set, in
    module order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, TicketModule):
            out.append((f"{name or '<model>'} (kept weights)", torch.cat([m.crow.long(), m.col.long()])))
        if hasattr(m, "active") and hasattr(m, "set_active"):  # NEq-capable: None is all active
            n = getattr(m, "out_features", None) or getattr(m, "out_channels")
            active = m.active if m.active is not None else torch.ones(n, dtype=torch.bool)
            out.append((f"{name or '<model>'} (NEq active set)", active.to(torch.uint8)))
    return out


def _digest(what: str, t: torch.Tensor) -> int:
    h = hashlib.sha256(what.encode())
    h.update(str(tuple(t.shape)).encode())
    h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def check_same_masks(model: nn.Module, group: Optional[object] = None) -> None:
    """Raise ``RuntimeError`` on every rank of ``group`` (default: the whole world) if the
    ranks' ``model`` copies differ in any ticket layer's kept positions or NEq layer's
    active set, naming the layers and the ranks that disagree with rank 0. Collective:
    every rank of the group must call it, with the same model architecture. Call it after
    computing masks and before building DDP (whose constructor broadcasts rank 0's
    buffers, index structure included, and so would hide a mismatch)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("sparseticket: check_same_masks needs an initialised torch.distributed process group")
    items = _structures(model)
    world = dist.get_world_size(group)
    # the counts first: all_gather needs tensors of one size on every rank
    count = torch.tensor([len(items)], dtype=torch.int64)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    if any(int(c) != len(items) for c in counts):
        raise RuntimeError(f"sparseticket: the ranks' models have different numbers of sparse/NEq layers "
                           f"({[int(c) for c in counts]}); the models must be the same architecture")
    mine = torch.tensor([_digest(w, t) for w, t in items], dtype=torch.int64)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    bad = []
    for i, (what, _) in enumerate(items):
        ranks = [r for r in range(world) if gathered[r][i] != gathered[0][i]]
        if ranks:
            bad.append(f"{what}: rank(s) {ranks} differ from rank 0")
    if bad:
        raise RuntimeError("sparseticket: the masks differ between ranks (compute them from weights that agree, "
                           "or on rank 0 and broadcast them): " + "; ".join(bad))
