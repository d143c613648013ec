"""What MaskedSGD and MaskedAdamW share: finding each parameter's masks, and following
structure changes (a new ticket) by remapping or resetting the parameter's state."""
from __future__ import annotations

import functools
import weakref
from typing import List, Optional, Sequence, Tuple

import torch.autograd.profiler as _profiler
from torch import Tensor
from torch.optim import Optimizer
from torch.optim import optimizer as _torch_optimizer

from ..nn import _registry
from ..nn._registry import ParamMasks, param_masks


def lean_step(step):
    """The masked optimizers' ``step`` wrapper, in place of the one torch.optim.Optimizer
    puts on every subclass's ``step`` (``profile_hook_step``): that one enters a profiler
    ``record_function`` on every call, ~15-20 us of a ~400 us sparse LeNet step on the
    project's VM. This wrapper calls torch's when anything would see a difference (the
    profiler is on, or step pre/post hooks are registered on this optimizer or globally);
    otherwise it runs the step and the same ``_optimizer_step_code`` call directly."""
    hooked_step = Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self, *args, **kwargs):
        if not lean_step_direct(self):
            return hooked_step(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    wrapper.hooked = True  # torch.optim.Optimizer._patch_step_function: do not wrap again
    return wrapper


def lean_step_direct(opt: Optimizer) -> bool:
    """Whether ``lean_step``'s wrapper runs the step directly: no profiler, no step hooks
    registered on ``opt`` or globally."""
    global_pre = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
    global_post = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
    return not (_profiler._is_profiler_enabled or global_pre is None or global_post is None or global_pre
                or global_post or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks)


class MaskedOptimizer(Optimizer):
    """Base of the masked optimizers: per step, for each parameter with a gradient,
    ``_prepare(group)`` yields (param, state, keep, active, row_ptr).

    Each parameter's masks are read at every step from the module that owns it (see
    ``sparseticket.nn._registry``), so a new mask or a new set of frozen neurons takes
    effect at the next step with no new optimizer. When a ticket's structure changes:

    * nnz unchanged: the Parameter object is the same; its state tensors are moved onto
      the new entries (entries kept in both masks keep theirs, new entries start at zero),
      which is what a dense optimizer held masked by keep masks would hold;
    * nnz changed: the module holds a new Parameter; the optimizer swaps it into its
      param group (at ``step``, ``zero_grad`` or ``state_dict``) and moves the state the same way;
    * if the module cannot say how (two mask changes between steps, a checkpoint of
      another structure loaded into the model), the parameter's state is reset as for a
      new parameter. A parameter whose ``.data`` changed shape with no module to ask is
      reset too.
    """

    _state_tensors: Tuple[str, ...] = ()

    def __init__(self, params, defaults):
        super().__init__(params, defaults)
        self._st_reset_caches()

    def _st_reset_caches(self) -> None:
        # id(p) -> (weakref(p), ParamMasks | None): registry lookups cached between steps
        self._st_info = {}
        self._st_info_version = -1
        # id(p) -> (weakref(p), structure token the state was laid out for)
        self._st_tokens = {}
        # id(param group) -> (registry version, params list, its length, plan); see _plan
        self._st_plans = {}
        # id(param group) -> the last step's argument lists, for a step that changes nothing
        # (MaskedSGD._st_repeat_step)
        self._st_repeat = {}
        self._st_fused = None  # MaskedSGD._fused_plan's last (params, repeat records, settings, plan)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._st_reset_caches()

    def __getstate__(self):
        # a copy or a pickle keeps state laid out for the structure it is saved with
        # (__setstate__ forgets which one it was)
        self._follow_all()
        return super().__getstate__()

    def _info(self, p: Tensor) -> Optional[ParamMasks]:
        if self._st_info_version != _registry.VERSION[0]:
            self._st_info.clear()
            self._st_info_version = _registry.VERSION[0]
        hit = self._st_info.get(id(p))
        if hit is not None and hit[0]() is p:
            return hit[1]
        info = param_masks(p)
        self._st_info[id(p)] = (weakref.ref(p), info)
        return info

    def _current(self, params: List[Tensor], i: int) -> Tuple[Tensor, Optional[ParamMasks]]:
        """params[i], or the Parameter its module now holds in its place (swapped in)."""
        p = params[i]
        info = self._info(p)
        if info is None or info.current is None:
            return p, info
        cur = info.current()
        if cur is None or cur is p or not isinstance(cur, Tensor):
            return p, info
        params[i] = cur
        if p in self.state:
            self.state[cur] = self.state.pop(p)
        seen = self._st_tokens.pop(id(p), None)
        if seen is not None and seen[0]() is p:
            self._st_tokens[id(cur)] = (weakref.ref(cur), seen[1])
        return cur, self._info(cur)

    def _plan(self, group: dict) -> list:
        """[(param, keep(), active(), row_ptr(), token()) getters] for ``group``, rebuilt only
        when some module (re)registered a Parameter: that is also when a module can have
        replaced one, so the swap-in check runs then and not at every step."""
        params = group["params"]
        key = id(group)
        cached = self._st_plans.get(key)
        if (cached is not None and cached[0] == _registry.VERSION[0] and cached[1] is params
                and cached[2] == len(params)):
            return cached[3]
        plan = []
        for i in range(len(params)):
            p, info = self._current(params, i)
            if info is None:
                plan.append((p, None, None, None, None, None))
            else:
                plan.append((p, info, info.keep, info.active, info.row_ptr, info.token))
        self._st_plans[key] = (_registry.VERSION[0], params, len(params), plan)
        return plan

    def _sync_params(self) -> None:
        for group in self.param_groups:
            self._plan(group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._sync_params()
        if not set_to_none or _profiler._is_profiler_enabled:
            super().zero_grad(set_to_none)
            return
        # torch's loop without its record_function (~10 us a call); same effect
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = None

    def state_dict(self):
        self._follow_all()  # (its _plan calls sync the parameters, as _sync_params does)
        return super().state_dict()

    def _follow_all(self) -> None:
        """Move every parameter's state onto its module's present structure now, as the next
        step would: a mask changed since the last step left it laid out for the old one,
        and a checkpoint or a copy taken before that step kept it so (momentum on the wrong
        weights when the counts matched, a reset when they did not; review 49)."""
        for group in self.param_groups:
            for p, info, _keep, _active, _row, token_fn in self._plan(group):
                state = self.state.get(p)
                if token_fn is not None and state:
                    self._follow_structure(p, state, info)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # the loaded state belongs to the parameters' current structure
        self._st_tokens = {}
        self._st_plans = {}
        self._st_repeat = {}
        self._st_fused = None  # MaskedSGD._fused_plan's last (params, repeat records, settings, plan)

    def _prepare(self, group: dict):
        """(param, state, keep, active, row_ptr) for each param of ``group`` with a gradient."""
        out = []
        state_of = self.state
        first = self._state_tensors[0]
        for p, info, keep_fn, active_fn, row_fn, token_fn in self._plan(group):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"sparseticket: {type(self).__name__} does not support sparse gradients "
                                   f"(torch.sparse); a ticket's compact gradient is already dense over its kept weights")
            state = state_of[p]
            if token_fn is not None:
                self._follow_structure(p, state, info)
            if state:
                t = state.get(first)
                if t is not None and t.shape != p.shape:  # .data changed shape behind our back
                    state.clear()
            out.append((p, state, None if keep_fn is None else keep_fn(), None if active_fn is None else active_fn(),
                        None if row_fn is None else row_fn()))
        return out

    def _follow_structure(self, p: Tensor, state: dict, info: ParamMasks) -> None:
        token = info.token()
        seen = self._st_tokens.get(id(p))
        if seen is not None and seen[1] is token and seen[0]() is p:
            return
        seen = seen[1] if seen is not None and seen[0]() is p else None
        if token is None:
            return
        if seen is not None and state:
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
        self._st_tokens[id(p)] = (weakref.ref(p), token)


def _float(x, name: str) -> float:
    if type(x) is float:  # the common case, first: every step reads several hyperparameters
        return x
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"sparseticket: {name} must be a scalar, got shape {tuple(x.shape)}")
        return float(x.item())
    return float(x)


def check_implementation_args(differentiable: bool) -> None:
    """torch.optim's implementation switches: ``foreach``/``fused`` are accepted and ignored
    (every step is one fused multi-tensor call); ``differentiable`` is not supported."""
    if differentiable:
        raise ValueError("sparseticket: masked optimizers do not support differentiable=True")


def check_positive(name: str, value, allow_zero: bool = True) -> None:
    v = _float(value, name)
    if v < 0 or (not allow_zero and v == 0):
        raise ValueError(f"sparseticket: invalid {name}: {value}")


def lists(n: int) -> Sequence[list]:
    return tuple([] for _ in range(n))
