"""Masked AdamW: the pure-PyTorch reference that defines it, and its proposed op schema.

sparseticket has no ``masked_adamw_`` op schema yet; until it is promoted into
``sparseticket/ops/_library.py`` (schema + fake kernel) and ``sparseticket/ops/reference.py``
(this function), the Triton kernel ``sparseticket.triton.triton_masked_adamw_`` is tested
against this reference, and this reference against ``torch.optim.AdamW``.

Semantics: one step of ``torch.optim.AdamW`` (the single-tensor, non-capturable path, i.e.
``foreach=False``) over every parameter, with masks applied as for ``masked_sgd_``: at pruned
positions (keep False) the parameter and all its state become exact zeros; at frozen
positions (active False) the parameter and all its state keep their old bits. The step count
is per tensor, as in torch.optim: ``steps[j]`` is the count *after* this step's increment
(1 on the first step), the caller owns and increments it. A frozen row therefore keeps its
moments but, when it comes back, is bias-corrected with the tensor's step count, exactly
what torch.optim.AdamW does for a parameter whose gradient entries were zero meanwhile,
minus the moment decay.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..ops._library import _check, _check_same, check_masked_sgd
from ..ops.reference import _active_elements

#: to be added to ``sparseticket.ops._library.SCHEMAS`` when AdamW is promoted
PROPOSED_SCHEMA = (
    "masked_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor(d!)[] max_exp_avg_sqs, Tensor?[] keep_masks, Tensor?[] active_masks, Tensor?[] row_ptrs, "
    "float[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, "
    "bool maximize) -> ()"
)


def check_masked_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, keeps, actives, row_ptrs, steps,
                       amsgrad):
    """Same argument checks as ``masked_sgd_`` (masks, row pointers, dtypes) plus the moment buffers."""
    n = len(params)
    fresh = [False] * n
    check_masked_sgd(params, grads, exp_avgs, keeps, actives, row_ptrs, fresh, momentum=1.0)
    _check(len(steps) == n, f"sparseticket: masked_adamw_: steps has {len(steps)} entries but params has {n}")
    state = [("exp_avg_sqs", exp_avg_sqs)] + ([("max_exp_avg_sqs", max_exp_avg_sqs)] if amsgrad else [])
    for name, seq in state:
        _check(len(seq) == n, f"sparseticket: masked_adamw_: {name} has {len(seq)} entries but params has {n}")
        for j, p in enumerate(params):
            b = seq[j]
            _check(b.shape == p.shape, f"sparseticket: {name}[{j}] has shape {tuple(b.shape)} but params[{j}] has {tuple(p.shape)}")
            _check(b.dtype == p.dtype, f"sparseticket: {name}[{j}] has dtype {b.dtype} but params[{j}] has {p.dtype}")
            _check_same(f"{name}[{j}]", b, f"params[{j}]", p)
    for j, s in enumerate(steps):
        _check(float(s) >= 1, f"sparseticket: steps[{j}] is {s}; it counts this step, so it must be >= 1")


def reference_masked_adamw_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    keep_masks: Sequence[Optional[Tensor]],
    active_masks: Sequence[Optional[Tensor]],
    row_ptrs: Sequence[Optional[Tensor]],
    steps: Sequence[float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """One step of torch.optim.AdamW over ``params`` in place, with masks.

    For each parameter p (gradient g, moments m, v, and vmax if amsgrad), with t = steps[j]:
      g = -g if maximize;  p *= 1 - lr * weight_decay
      m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g;  vmax = max(vmax, v)
      p += -(lr / (1 - beta1^t)) * m / (sqrt(vmax or v) / sqrt(1 - beta2^t) + eps)
    then pruned positions (keep False) of p, m, v, vmax are set to 0 and frozen positions
    (active False) keep their old values. The expressions are torch.optim's own, op for op.
    """
    for j, p in enumerate(params):
        g = grads[j] if not maximize else -grads[j]
        m, v = exp_avgs[j], exp_avg_sqs[j]
        step = float(steps[j])
        p_new = p.clone()
        if weight_decay != 0:
            p_new.mul_(1 - lr * weight_decay)
        m_new = m.clone().lerp_(g, 1 - beta1)
        v_new = v.clone().mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2 ** 0.5
        vmax_new = None
        if amsgrad:
            vmax_new = torch.maximum(max_exp_avg_sqs[j], v_new)
            denom = (vmax_new.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (v_new.sqrt() / bias_correction2_sqrt).add_(eps)
        p_new.addcdiv_(m_new, denom, value=-step_size)

        new = [(p, p_new), (m, m_new), (v, v_new)] + ([(max_exp_avg_sqs[j], vmax_new)] if amsgrad else [])
        keep = keep_masks[j]
        act = _active_elements(p, active_masks[j], row_ptrs[j])
        for old, upd in new:
            if keep is not None:
                upd = torch.where(keep, upd, torch.zeros_like(upd))
            if act is not None:
                upd = torch.where(act, upd, old)
            old.copy_(upd)
