"""MaskedSGD: torch.optim.SGD through the fused ``masked_sgd_`` kernel, with masks."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops as _ops
from ..nn import _registry
from ._base import MaskedOptimizer, lean_step, lean_step_direct, _float, check_implementation_args, check_positive, lists

_masked_sgd_ = torch.ops.sparseticket.masked_sgd_
# The same op through the C++ dispatcher without torch.ops' per-element argument parsing,
# under a NoGradGuard (csrc/fast_calls.cpp: ~5 us less per step for a six-parameter
# model), where _ops.c_entry_allowed says it may for the group's parameters.
_masked_sgd_call = getattr(_ops._C, "masked_sgd_call", None) if _ops._C is not None else None




class MaskedSGD(MaskedOptimizer):
    """torch.optim.SGD (same arguments, param groups, state_dict with ``momentum_buffer``)
    that keeps pruned weights at exactly 0 and leaves frozen neurons bit-for-bit untouched.

    Masks come from the layers: a SparseLinear/SparseConv2d's compact ``weight_values``
    (frozen rows through its ``crow``), NEq layers' ``active`` over dim 0 (weight and bias),
    ``torch.nn.utils.prune`` masks (after ``sparseticket.nn.attach_masks``), or
    ``sparseticket.nn.register_param``. Parameters without masks get plain SGD.
    Each param group is one call of the fused multi-tensor kernel.
    """

    _state_tensors = ("momentum_buffer",)

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, fused: Optional[bool] = None, differentiable: bool = False):
        check_implementation_args(differentiable)
        check_positive("learning rate", lr)
        check_positive("momentum value", momentum)
        check_positive("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("sparseticket: Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    @lean_step
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            fast = _masked_sgd_call is not None and _ops.c_entry_allowed(group["params"])
            if fast and self._st_repeat_step(group):
                continue
            with torch.no_grad():
                self._step_group(group, fast)
        return loss

    def _step_group(self, group: dict, fast: bool) -> None:
        momentum = _float(group["momentum"], "momentum")
        params, grads, bufs, keeps, actives, row_ptrs, fresh = lists(7)
        prepared = self._prepare(group)
        for p, state, keep, active, row_ptr in prepared:
            params.append(p)
            grads.append(p.grad)
            keeps.append(keep)
            actives.append(active)
            row_ptrs.append(row_ptr)
            if momentum != 0:
                buf = state.get("momentum_buffer")
                # zeros, not empty: frozen entries of a new buffer keep these bits
                fresh.append(buf is None)
                if buf is None:
                    buf = state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                bufs.append(buf)
            else:
                fresh.append(False)
        if fast and _ops.has_torch_function(grads):  # a gradient that overrides __torch_function__
            fast = False
        if params:
            (_masked_sgd_call if fast else _masked_sgd_)(params, grads, bufs, keeps, actives, row_ptrs, fresh,
                                                         *_hyper(group, momentum))
        self._st_remember_step(group, prepared, momentum != 0, params, bufs, keeps, actives, row_ptrs)

    # A group whose step found nothing to change (the same parameters, every one with a
    # gradient, the same mask and structure objects from the modules, the same state)
    # repeats the previous step's argument lists: in a LeNet-300-100 step this skips
    # ~15 us of _prepare and list building (measured in context, ad hoc). Any difference
    # sends the step down the full path, which then records the new lists.

    def _st_remember_step(self, group, prepared, uses_bufs, params, bufs, keeps, actives, row_ptrs) -> None:
        cache = self._st_repeat
        cache.pop(id(group), None)
        plist = group["params"]
        if not params or len(params) != len(plist):  # some parameter had no gradient: not cached
            return
        entries = []
        for (p, state, keep, active, row_ptr), (_, info, keep_fn, active_fn, row_fn, token_fn) in zip(
                prepared, self._plan(group)):
            if info is not None and info.token is not None:
                seen = self._st_tokens.get(id(p))
                token = seen[1] if seen is not None else None
            else:
                token = None
            entries.append((p, p.shape, state, state.get("momentum_buffer") if uses_bufs else None,
                            keep_fn, keep, active_fn, active, row_fn, row_ptr, token_fn, token))
        cache[id(group)] = (group, plist, len(plist), _registry.VERSION[0], uses_bufs, entries,
                            (params, bufs, keeps, actives, row_ptrs, [False] * len(params)))

    def _st_repeat_args(self, group: dict, grads_replaced: bool = False) -> Optional[tuple]:
        """masked_sgd_'s arguments for repeating the previous step of ``group`` with the
        current gradients, or None when anything it rests on changed. ``grads_replaced``
        (MaskedSGD._fused_plan): the caller is about to set every gradient, so the current
        ones are not looked at (the gradient slot of the result is then None)."""
        c = self._st_repeat.get(id(group))
        if (c is None or c[0] is not group or c[1] is not group["params"] or c[2] != len(c[1])
                or c[3] != _registry.VERSION[0]):
            return None
        momentum = _float(group["momentum"], "momentum")
        uses_bufs = c[4]
        if uses_bufs != (momentum != 0):
            return None
        state_of = self.state
        grads: Optional[list] = None if grads_replaced else []
        for (p, shape, state, buf, keep_fn, keep, active_fn, active, row_fn, row_ptr, token_fn, token) in c[5]:
            g = p.grad
            if ((not grads_replaced and (g is None or g.is_sparse)) or p.shape != shape or state_of.get(p) is not state
                    or (uses_bufs and state.get("momentum_buffer") is not buf)
                    or (keep_fn is not None and keep_fn() is not keep)
                    or (active_fn is not None and active_fn() is not active)
                    or (row_fn is not None and row_fn() is not row_ptr)
                    or (token_fn is not None and token_fn() is not token)):
                return None
            if grads is not None:
                grads.append(g)
        if grads is not None and _ops.has_torch_function(grads):  # the full path then steps through torch.ops
            return None
        params, bufs, keeps, actives, row_ptrs, fresh = c[6]
        return params, grads, bufs, keeps, actives, row_ptrs, fresh, _hyper(group, momentum)

    def _st_repeat_step(self, group: dict) -> bool:
        args = self._st_repeat_args(group)
        if args is None:
            return False
        _masked_sgd_call(*args[:7], *args[7])
        return True

    # MLPStep.step updates a layer right after its backward only from this many entries
    # (128 KB of fp32 weights): smaller layers sit in cache anyway, and are updated after
    # the backward in one call, as step() would (an update of its own costs ~3 us more)
    _EARLY_UPDATE_MIN = 1 << 15

    def _fused_plan(self, layers) -> Optional[tuple]:
        """For ``MLPStep.step``: the update plan of csrc/mlp_step.cpp (kSgdSlots tensors
        and kSgdHyper scalars per layer) that applies what ``step()`` would apply now,
        given ``layers`` as (weight, bias or None) pairs whose gradients the MLP step is
        about to replace; None unless ``step()`` would do exactly that: repeat its previous
        step (``_st_repeat_args``) in every group, on exactly these parameters, with no
        hooks or profiler to see it (``lean_step``) and no closure."""
        if "step" in self.__dict__ or type(self).step is not MaskedSGD.step or not lean_step_direct(self):
            return None
        groups = [g for g in self.param_groups if g["params"]]
        hypers = []
        for group in groups:
            if _masked_sgd_call is None or not _ops.c_entry_allowed(group["params"]):
                return None
            # (the gradients are MLPStep's to set: a zero_grad() before the call is fine)
            args = self._st_repeat_args(group, grads_replaced=True)
            if args is None:
                return None
            hypers.append(args[7])
        # the plan rests on the layers' parameters, the repeat records (by identity: they
        # hold tensors) and the settings
        params = [p for pair in layers for p in pair]
        records = [self._st_repeat[id(g)] for g in groups]
        cached = self._st_fused
        if (cached is not None and _same_objects(cached[0], params) and _same_objects(cached[1], records)
                and cached[2] == hypers):
            return cached[3]
        plan = self._build_fused_plan(layers, groups, hypers)
        self._st_fused = (params, records, hypers, plan)
        return plan

    def _fused_guard(self) -> tuple:
        """What ``MLPStep.fixed`` compares at every call, in ~1 us: the param groups'
        settings, the mask registry's version (a new mask or frozen set anywhere) and
        whether a step would run hooked (step hooks, the profiler)."""
        return (_registry.VERSION[0], lean_step_direct(self), "step" in self.__dict__,
                [(g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"], g["maximize"],
                  len(g["params"])) for g in self.param_groups])

    def _build_fused_plan(self, layers, groups, hypers) -> Optional[tuple]:
        wanted = {id(p) for pair in layers for p in pair if p is not None}
        slots = {}
        for group, hyper in zip(groups, hypers):
            params, bufs, keeps, actives, row_ptrs, _ = self._st_repeat[id(group)][6]
            for k, p in enumerate(params):
                if id(p) not in wanted or id(p) in slots:
                    return None
                slots[id(p)] = ((bufs[k] if bufs else None, keeps[k], actives[k], row_ptrs[k]), hyper)
        if len(slots) != len(wanted):
            return None
        sgd: list = []
        scalars: list = []
        later = None  # the scalars of the layers updated after the backward (one call: all equal)
        for weight, bias in layers:
            hyper = slots[id(weight)][1]
            if bias is not None and slots[id(bias)][1] != hyper:
                return None  # a layer's weight and bias in groups with different settings
            sgd += slots[id(weight)][0]
            sgd += slots[id(bias)][0] if bias is not None else (None,) * 4
            now = weight.numel() >= self._EARLY_UPDATE_MIN
            if not now:
                if later is not None and later != hyper:
                    return None
                later = hyper
            scalars += [float(v) for v in hyper] + [1.0 if now else 0.0]
        return sgd, scalars


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _hyper(group: dict, momentum: float) -> tuple:
    """masked_sgd_'s scalar arguments (lr, momentum, dampening, weight_decay, nesterov,
    maximize) from a param group, read at every step."""
    return (_float(group["lr"], "lr"), momentum, _float(group["dampening"], "dampening"),
            _float(group["weight_decay"], "weight_decay"), bool(group["nesterov"]), bool(group["maximize"]))
