"""MaskedAdamW: torch.optim.AdamW with masks.

Each param group's update is one call of ``masked_adamw_`` below: the kernel layer's fused
op ``torch.ops.sparseticket.masked_adamw_`` when it is defined, else the Python
implementation here, which has the same arguments and meaning (tests run both against
torch.optim.AdamW and the op's reference).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ..ops.reference import _active_elements
from ._base import MaskedOptimizer, lean_step, _float, check_implementation_args, check_positive, lists


def python_masked_adamw_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                         exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Sequence[Tensor],
                         keep_masks: Sequence[Optional[Tensor]], active_masks: Sequence[Optional[Tensor]],
                         row_ptrs: Sequence[Optional[Tensor]], steps: Sequence[float], lr: float, beta1: float,
                         beta2: float, eps: float, weight_decay: float, amsgrad: bool, maximize: bool) -> None:
    """One AdamW step in place, op for op torch.optim.AdamW's single-tensor path.

    ``steps[j]`` counts this step (1 on the first). Pruned entries (keep False) of the
    param and its moments become exactly 0; frozen entries (active False, per element,
    per row over dim 0, or per CSR row with ``row_ptrs``) are not read or written, so they
    keep their bits. With frozen entries only the active ones are gathered and updated.
    """
    for j, p in enumerate(params):
        g = grads[j] if not maximize else -grads[j]
        state = [p, exp_avgs[j], exp_avg_sqs[j]] + ([max_exp_avg_sqs[j]] if amsgrad else [])
        keep = keep_masks[j]
        act = _active_elements(p, active_masks[j], row_ptrs[j])
        if act is None:
            _adamw_math(*state[:3], state[3] if amsgrad else None, g, float(steps[j]), lr, beta1, beta2, eps,
                        weight_decay)
            if keep is not None:
                drop = ~keep
                for t in state:
                    t.masked_fill_(drop, 0)
            continue
        idx = act.reshape(-1).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        views = [t.view(-1) if t.is_contiguous() else t.contiguous().view(-1) for t in state]
        sub = [v.index_select(0, idx) for v in views]
        _adamw_math(*sub[:3], sub[3] if amsgrad else None, g.reshape(-1).index_select(0, idx), float(steps[j]),
                    lr, beta1, beta2, eps, weight_decay)
        if keep is not None:
            drop = ~keep.reshape(-1).index_select(0, idx)
            for s in sub:
                s.masked_fill_(drop, 0)
        for t, v, s in zip(state, views, sub):
            v.index_copy_(0, idx, s)
            if not t.is_contiguous():
                t.copy_(v.view_as(t))


def _adamw_math(param, exp_avg, exp_avg_sq, max_exp_avg_sq, grad, step, lr, beta1, beta2, eps, weight_decay):
    # torch/optim/adam.py, _single_tensor_adam with decoupled_weight_decay=True, capturable=False
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


# FUSED: the kernel layer's op when it is defined, else the Python implementation above.
masked_adamw_ = getattr(torch.ops.sparseticket, "masked_adamw_", None) or python_masked_adamw_


class MaskedAdamW(MaskedOptimizer):
    """torch.optim.AdamW (same arguments, param groups, state_dict: ``step``, ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``) with pruned weights held at exactly 0 and frozen
    neurons' weights and moments left bit-for-bit untouched. Masks are found as for
    MaskedSGD. The step count is per parameter tensor, as in torch.optim: a neuron frozen
    for a while comes back bias-corrected with its tensor's step count.
    """

    _state_tensors = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, foreach: Optional[bool] = None,
                 capturable: bool = False, differentiable: bool = False, fused: Optional[bool] = None):
        check_implementation_args(differentiable)
        if capturable:  # (torch.optim.AdamW's CUDA-graph option; False, its default, is accepted: review 49)
            raise ValueError("sparseticket: MaskedAdamW does not support capturable=True (CUDA graph capture)")
        check_positive("learning rate", lr)
        check_positive("epsilon value", eps)
        check_positive("weight_decay value", weight_decay)
        for i, b in enumerate(betas):
            if not 0.0 <= _float(b, "beta") < 1.0:
                raise ValueError(f"sparseticket: invalid beta parameter at index {i}: {b}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)

    @lean_step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            amsgrad = bool(group["amsgrad"])
            params, grads, m, v, vmax, keeps, actives, row_ptrs = lists(8)
            steps: List[float] = []
            for p, state, keep, active, row_ptr in self._prepare(group):
                if "exp_avg" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if amsgrad and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                m.append(state["exp_avg"])
                v.append(state["exp_avg_sq"])
                if amsgrad:
                    vmax.append(state["max_exp_avg_sq"])
                keeps.append(keep)
                actives.append(active)
                row_ptrs.append(row_ptr)
                steps.append(float(state["step"]))
            if params:
                beta1, beta2 = (_float(b, "beta") for b in group["betas"])
                masked_adamw_(params, grads, m, v, vmax, keeps, actives, row_ptrs, steps, _float(group["lr"], "lr"),
                              beta1, beta2, _float(group["eps"], "eps"), _float(group["weight_decay"], "weight_decay"),
                              amsgrad, bool(group["maximize"]))
        return loss
