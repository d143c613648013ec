"""What MaskedSGD and MaskedAdamW share: finding each parameter's masks, and following
structure changes (a new ticket) by remapping or resetting the parameter's state."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.weak import WeakIdKeyDictionary

from ..nn._registry import param_masks


class MaskedOptimizer(Optimizer):
    """Base: ``_masks(p)`` -> (keep, active, row_ptr); ``_follow_structure(p, keys)``.

    Each parameter's masks are read at every step from the module that owns it (see
    ``sparseticket.nn._registry``), so a new mask or a new set of frozen neurons takes
    effect at the next step with no new optimizer. When a ticket's structure changes
    (``set_mask``, loading another checkpoint), the parameter's state tensors are moved
    onto the new entries (kept in both masks: unchanged; new: zero), which is what a
    dense masked optimizer would hold; if the module cannot say how (several changes
    between two steps, an unknown origin), the parameter's state is reset as if new.
    """

    _state_tensors: Tuple[str, ...] = ()

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._st_tokens = WeakIdKeyDictionary()

    @staticmethod
    def _masks(p: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        info = param_masks(p)
        if info is None:
            return None, None, None
        keep = info.keep() if info.keep is not None else None
        active = info.active() if info.active is not None else None
        row_ptr = info.row_ptr() if info.row_ptr is not None else None
        return keep, active, row_ptr

    def _sync_params(self) -> None:
        """Swap in the Parameters that modules replaced (a mask change that altered nnz,
        ``load_state_dict(assign=True)``), carrying their state and structure record."""
        for group in self.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                info = param_masks(p)
                if info is None or info.current is None:
                    continue
                cur = info.current()
                if cur is None or cur is p or not isinstance(cur, Tensor):
                    continue
                params[i] = cur
                if p in self.state:
                    self.state[cur] = self.state.pop(p)
                seen = self._st_tokens.pop(p, None)
                if seen is not None:
                    self._st_tokens[cur] = seen

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._sync_params()
        super().zero_grad(set_to_none)

    def state_dict(self):
        self._sync_params()
        return super().state_dict()

    def _follow_structure(self, p: Tensor, state: dict) -> None:
        info = param_masks(p)
        token = info.token() if info is not None and info.token is not None else None
        seen = self._st_tokens.get(p)
        if token is not None and seen is not None and seen is not token and state:
            moved = {}
            for k in self._state_tensors:
                t = state.get(k)
                if t is None:
                    continue
                new = info.remap(seen, t) if info.remap is not None else None
                if new is None:
                    moved = None
                    break
                moved[k] = new
            if moved is None:
                state.clear()
            else:
                state.update(moved)
        if token is not None:
            self._st_tokens[p] = token
        # a parameter whose .data changed shape behind our back (no token): start afresh
        if any(isinstance(state.get(k), Tensor) and state[k].shape != p.shape for k in self._state_tensors):
            state.clear()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # the loaded state belongs to the parameters' current structure
        self._st_tokens = WeakIdKeyDictionary()

    def __setstate__(self, state):
        super().__setstate__(state)
        if not hasattr(self, "_st_tokens"):
            self._st_tokens = WeakIdKeyDictionary()

    @staticmethod
    def _grad_of(p: Tensor, name: str) -> Tensor:
        g = p.grad
        if g.is_sparse:
            raise RuntimeError(f"sparseticket: {name} does not support sparse gradients (torch.sparse); the "
                               f"compact ticket gradient is already dense over the kept weights")
        return g


def _float(x, name: str) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"sparseticket: {name} must be a scalar, got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def check_positive(name: str, value, allow_zero: bool = True) -> None:
    v = _float(value, name)
    if v < 0 or (not allow_zero and v == 0):
        raise ValueError(f"sparseticket: invalid {name}: {value}")


def lists(n: int) -> Sequence[list]:
    return tuple([] for _ in range(n))
