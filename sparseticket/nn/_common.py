"""What SparseLinear and SparseConv2d share: the compact weight, its mask changes,
NEq freezing, state_dict loading of data-dependent sizes, and the execution choice."""
from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from ..ticket import Ticket
from . import _mode, _registry
from ._registry import register_module_params

FLOATS = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation


def autocast_device(x: Tensor) -> Optional[str]:
    """The device type whose autocast is on for ``x``, or None.

    sparseticket's kernels are fp32 / fp64, so under autocast a ticket layer runs as the
    ops on autocast's fp32 list do: a reduced-precision input (bf16 / fp16) is cast up to
    the weights' dtype and both of its paths (sparse kernels, dense fallback) run at that
    precision with autocast off; the output then has the weights' dtype whichever path
    ran. Any other input dtype must match the weights', as without autocast."""
    d = x.device.type
    return d if torch.is_autocast_enabled(d) else None


REDUCED_FLOATS = (torch.float16, torch.bfloat16)


def autocast_operand(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` as autocast hands it to an op on its lower-precision list: floating tensors
    other than float64 cast to ``dtype``, everything else (fp64, integers, None) as is."""
    if t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def where(module: nn.Module, name: Optional[str] = None) -> str:
    """'layer 'fc1' (SparseLinear 784->300)' for error messages."""
    name = name if name is not None else getattr(module, "_st_name", None)
    desc = describe(module)
    return f"layer '{name}' ({desc})" if name else desc


def describe(module: nn.Module) -> str:
    cls = type(module).__name__
    if hasattr(module, "in_features"):
        return f"{cls} {module.in_features}->{module.out_features}"
    if hasattr(module, "in_channels"):
        return f"{cls} {module.in_channels}->{module.out_channels}, kernel {tuple(module.kernel_size)}"
    return cls


def check_mask(mask, shape: Tuple[int, ...], what: str, device=None) -> Tensor:
    """A keep mask of exactly ``shape`` as a bool tensor, or a ValueError naming the layer."""
    if not isinstance(mask, Tensor):
        try:
            mask = torch.as_tensor(mask)
        except Exception as e:
            raise TypeError(f"sparseticket: {what}: mask must be a tensor, got {type(mask).__name__}") from e
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"sparseticket: {what}: mask has shape {tuple(mask.shape)}, expected {tuple(shape)} "
                         f"(the weight's shape)")
    if mask.dtype != torch.bool:
        if mask.is_complex() or not (mask.is_floating_point() or mask.dtype in
                                     (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
            raise TypeError(f"sparseticket: {what}: mask must be bool or 0/1, got dtype {mask.dtype}")
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            raise ValueError(f"sparseticket: {what}: mask must be binary (0/1), found value "
                             f"{mask[bad].flatten()[0].item()!r}")
        mask = mask != 0
    return mask if device is None else mask.to(device)


def check_active(active, n: int, what: str, device) -> Optional[Tensor]:
    if active is None:
        return None
    if not isinstance(active, Tensor):
        active = torch.as_tensor(active)
    if active.dim() != 1 or active.shape[0] != n:
        raise ValueError(f"sparseticket: {what}: active must have shape ({n},) (one entry per output neuron/channel), "
                         f"got {tuple(active.shape)}")
    return check_mask(active, (n,), what + ": active", device).contiguous()


def check_replaceable(layer: nn.Module, what: str) -> None:
    """A dense layer that sparsify / from_dense would replace by a new module: refused when
    what it carries would be lost on the way (review 49): a parametrization or a hook that
    changes the weight (spectral or weight norm: their weight_orig was taken for
    torch.nn.utils.prune's and the normalisation dropped), hooks on the layer or on its
    weight Parameter (they belong to the old module). torch.nn.utils.prune's own hook is
    what sparsify reads the mask from, and a FlopCounter hooks the new layer itself: both
    are fine."""
    from torch.nn.utils import parametrize, prune
    if parametrize.is_parametrized(layer):
        raise ValueError(f"sparseticket: {what} is parametrized ({', '.join(layer.parametrizations)}): its sparse "
                         f"layer would keep the weight's present value and drop the parametrization; remove it "
                         f"first (torch.nn.utils.parametrize.remove_parametrizations)")

    def carried(h) -> bool:  # prune's hook, or one whose owner hooks the new layer itself (FlopCounter)
        return isinstance(h, prune.BasePruningMethod) or getattr(h, "follows_layer_swaps", False)

    kinds = [(k, [h for h in getattr(layer, attr).values() if not carried(h)])
             for k, attr in (("forward pre-hook", "_forward_pre_hooks"), ("forward hook", "_forward_hooks"),
                             ("backward hook", "_backward_hooks"), ("backward pre-hook", "_backward_pre_hooks"))]
    found = [f"{len(h)} {k}{'s' if len(h) > 1 else ''} ({', '.join(sorted({type(x).__name__ for x in h}))})"
             for k, h in kinds if h]
    for name, p in layer._parameters.items():
        if p is not None and (getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks", None)):
            found.append(f"hooks on its {name} Parameter")
    if found:
        raise ValueError(f"sparseticket: {what} has {'; '.join(found)}, which its sparse layer would not have "
                         f"(a new module and new Parameters): remove them, sparsify, and register them on the "
                         f"sparse layer (or leave this layer out with filter=)")


def check_weight_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in FLOATS:
        raise TypeError(f"sparseticket: {what}: sparse layers support float32/float64 weights, got {dtype} "
                        f"(keep this layer dense, e.g. sparsify(..., filter=...))")


# ----------------------------------------------------------------------------- dense materialisation


class TicketToDense(torch.autograd.Function):
    """values [nnz] -> dense W [rows, cols] (zeros at pruned positions), differentiable in values.

    A scatter through ``flat`` (row * cols + col of each value in the weight's natural
    layout); the backward gathers the dense gradient there. Used where the ticket's own
    layout is not the dense one (SparseConv2d); SparseLinear expands through its bitmap.
    """

    @staticmethod
    def forward(ctx, values, flat, rows: int, cols: int):
        ctx.save_for_backward(flat)
        out = values.new_zeros(rows * cols)
        out.index_copy_(0, flat, values)
        return out.view(rows, cols)

    @staticmethod
    def backward(ctx, g):
        (flat,) = ctx.saved_tensors
        return g.reshape(-1).index_select(0, flat), None, None, None


def _maybe_mark_dynamic0(t: Tensor) -> None:
    """``torch._dynamo.maybe_mark_dynamic(t, 0)`` without importing dynamo (~1.2 s) in
    programs that never compile: the same two attributes dynamo reads when it traces."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        return
    if not hasattr(t, "_dynamo_weak_dynamic_indices"):
        t._dynamo_weak_dynamic_indices = set()
    t._dynamo_weak_dynamic_indices.add(0)
    t._has_dynamo_dim_marking = True


def rows_of(crow: Tensor) -> Tensor:
    O = crow.numel() - 1
    return torch.repeat_interleave(torch.arange(O, device=crow.device), (crow[1:] - crow[:-1]).long())


# ----------------------------------------------------------------------------- NEq


class NEqMixin:
    """``active`` (None or bool [out]) and ``set_active``: the interface the NEq tracker uses."""

    def _n_out(self) -> int:
        raise NotImplementedError

    def _param_device(self) -> torch.device:
        return next(iter(self._parameters.values())).device

    def set_active(self, mask: Optional[Tensor]) -> None:
        """mask: [out] bool (False = frozen: no weight/bias gradient, no optimizer update), or None."""
        a = check_active(mask, self._n_out(), where(self), self._param_device())
        self._buffers["active"] = a
        # a new frozen set: what optimizers and MLPStep.fixed cached from the masks is stale
        _registry.VERSION[0] += 1

    @property
    def frozen_fraction(self) -> float:
        a = self._buffers.get("active")
        return 0.0 if a is None or a.numel() == 0 else 1.0 - float(a.float().mean())


def neq_capable(module: nn.Module) -> bool:
    """True when the module has an ``active`` mask and ``set_active`` (it can freeze neurons)."""
    return hasattr(module, "set_active") and "active" in getattr(module, "_buffers", {})


# ----------------------------------------------------------------------------- ticket module


_NNZ_BUFFERS = ("col", "row", "perm")
LAYOUT_KEY = "sparseticket_layout"  # state-dict metadata of a TicketModule: its ticket_layout()


class TicketModule(NEqMixin, nn.Module):
    """Base of SparseLinear / SparseConv2d: a weight held as a ticket.

    Subclasses define the dense (natural) weight shape, the ticket's matrix shape, and how
    the natural layout maps to ticket columns (identity for Linear; for Conv2d the ticket's
    columns are ordered (tap, input channel) to match a channels-last im2col).
    Parameters: ``weight_values`` [nnz], ``bias`` [out] or None. Buffers: ``crow`` [out+1],
    ``col``/``row``/``perm`` [nnz], ``ccol`` [ticket cols + 1] (int32), ``active`` [out] bool or
    None; non-persistent ``flat`` [nnz] int64 (dense position of each value).
    """

    #: None or 'relu': the layer applies its activation itself (``sparsify(...,
    #: fuse_relu=True)`` sets it; on the sparse path of a SparseLinear / groups-1
    #: SparseConv2d one op and one autograd node, elsewhere ``torch.relu`` after the op).
    #: Its output, which forward hooks see, is then the activation. (A class default:
    #: layers pickled before it existed load as None.)
    activation: Optional[str] = None

    weight_values: nn.Parameter

    # -- to be defined by subclasses
    def _weight_shape(self) -> Tuple[int, ...]:
        raise NotImplementedError

    def _ticket_cols(self) -> int:
        raise NotImplementedError

    def _ticket_rows_2d(self, t: Tensor) -> Tensor:
        """Natural-shape weight/mask -> [O, K] whose row-major order maps monotonically to ticket columns."""
        return t.reshape(self._dense2d_shape())

    def _ticket_col(self, rows: Tensor, local: Tensor) -> Optional[Tensor]:
        """Ticket column of each entry from its column in ``_ticket_rows_2d`` (None: the same)."""
        return None

    def _natural_col(self, rows: Tensor, col: Tensor) -> Optional[Tensor]:
        """Column in the natural [O, K] layout of each ticket entry (None: the same)."""
        return None

    def _n_out(self) -> int:
        return self._weight_shape()[0]

    def _dense2d_shape(self) -> Tuple[int, int]:
        s = self._weight_shape()
        n = 1
        for d in s[1:]:
            n *= d
        return s[0], n

    # -- construction
    def _init_ticket(self, weight: Tensor, mask: Tensor, bias: Optional[Tensor], mode: str) -> None:
        self.mode = _mode.check_mode(mode)
        self._choice: Optional[str] = None
        self._last_key: Optional[tuple] = None
        self.last_path: Optional[str] = None  # 'sparse' | 'dense': what the last eager call ran
        self._st_prev = None
        self.register_parameter("weight_values", None)
        for name in ("crow", "col", "ccol", "row", "perm"):
            self.register_buffer(name, torch.empty(0, dtype=torch.int32, device=weight.device))
        self.register_buffer("flat", torch.empty(0, dtype=torch.int64, device=weight.device), persistent=False)
        # one bit per weight of the ticket's [rows, cols] space: the dense path expands the
        # values through it (and compresses the gradient back) at memory speed
        self.register_buffer("bits", torch.empty(0, dtype=torch.int64, device=weight.device), persistent=False)
        self.register_buffer("active", None)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        self._set_from_dense(weight.detach(), mask, remap=False)
        self.weight_values.requires_grad_(weight.requires_grad)
        register_module_params(self)

    def _set_from_dense(self, weight: Tensor, mask: Tensor, remap: bool) -> None:
        check_weight_dtype(weight.dtype, where(self))
        mask = check_mask(mask, self._weight_shape(), where(self), weight.device)
        values, crow, col = ops.dense_to_ticket(self._ticket_rows_2d(weight).contiguous(),
                                                self._ticket_rows_2d(mask).contiguous())
        mapped = self._ticket_col(rows_of(crow), col.long())
        if mapped is not None:
            col = mapped.to(torch.int32).contiguous()
        self._set_structure(values, crow, col, remap=remap)

    def _set_structure(self, values: Tensor, crow: Tensor, col: Tensor, remap: bool) -> None:
        """Install a new ticket (see ``_install_values`` for what happens to the Parameter).

        With ``remap`` the optimizers can carry their state over (entries kept in both
        masks keep theirs, new entries start at zero); see ``_st_remap_state``.
        """
        old_flat = self._buffers["flat"]
        flat = self._flat_of(crow, col)
        if remap:
            self._st_prev = (getattr(self, "_st_token", None), old_flat.numel(), *_match(old_flat, flat))
        else:
            self._st_prev = None
        ccol, row, perm = ops.ticket_transpose(crow, col, self._ticket_cols())
        bits = ops.ticket_bitmap(crow, col, self._ticket_cols())
        self._buffers.update(crow=crow, col=col, ccol=ccol, row=row, perm=perm, flat=flat, bits=bits)
        self._st_token = object()
        self.__dict__["_fast_choice"] = None  # nnz changed: measured choices may differ
        self._install_values(values.contiguous(), clear_grad=remap)
        self._mark_nnz_dynamic()

    def _mark_nnz_dynamic(self) -> None:
        # torch.compile: nnz is a symbolic size, so a mask change does not recompile
        # (when dynamo's static-shape forcing for module parameters/buffers is off)
        for t in (self.weight_values, self.col, self.row, self.perm, self.flat):
            _maybe_mark_dynamic0(t)

    def _install_values(self, values: Tensor, clear_grad: bool) -> None:
        """Same nnz: the Parameter object stays (``.data`` swapped). New nnz: a new Parameter.

        A new shape cannot go into the old Parameter: autograd caches each leaf's
        AccumulateGrad node with the leaf's shape, and any graph still alive (a loss kept
        from the last step) keeps that node, so the next backward would fail. The masked
        optimizers notice the replacement and move their state over (see MaskedOptimizer).
        """
        p = self._parameters.get("weight_values")
        if p is not None and p.shape == values.shape:
            with torch.no_grad():
                if clear_grad:
                    p.grad = None  # a gradient laid out for the old structure means nothing now
                p.data = values
            return
        requires_grad = True if p is None else p.requires_grad
        self.weight_values = nn.Parameter(values, requires_grad=requires_grad)
        register_module_params(self)

    def _flat_of(self, crow: Tensor, col: Tensor) -> Tensor:
        rows = rows_of(crow)
        K = self._dense2d_shape()[1]
        natural = self._natural_col(rows, col.long())
        return rows * K + (col.long() if natural is None else natural)

    # -- the public mask API
    @property
    def nnz(self) -> int:
        return self.weight_values.numel()

    @property
    def density(self) -> float:
        O, K = self._dense2d_shape()
        return self.nnz / (O * K) if O * K else 0.0

    @property
    def ticket(self) -> Ticket:
        """The ticket (values are the live Parameter; for grouped convs the block-diagonal matrix)."""
        return Ticket(self.weight_values, self.crow, self.col, self.ccol, self.row, self.perm,
                      (self._n_out(), self._ticket_cols()))

    def dense_weight(self) -> Tensor:
        """The dense-equivalent weight (natural shape, zeros where pruned), detached."""
        O, K = self._dense2d_shape()
        w = self.weight_values.detach().new_zeros(O * K)
        w.index_copy_(0, self.flat, self.weight_values.detach())
        return w.view(self._weight_shape())

    def mask(self) -> Tensor:
        """Keep mask, natural weight shape, bool."""
        O, K = self._dense2d_shape()
        m = torch.zeros(O * K, dtype=torch.bool, device=self.flat.device)
        m[self.flat] = True
        return m.view(self._weight_shape())

    def set_mask(self, mask, weight: Optional[Tensor] = None) -> None:
        """Rebuild the ticket for a new keep mask (natural weight shape).

        The kept values come from ``weight`` if given (e.g. rewinding to initial weights in
        IMP), else from the current dense-equivalent weight (newly kept positions start at 0).
        If nnz is unchanged the ``weight_values`` Parameter object stays (its ``.grad`` is
        cleared), else it is replaced by a new one. MaskedSGD / MaskedAdamW follow either way
        at their next step (or ``zero_grad``): they swap in the new Parameter and move their
        state onto the new entries (kept in both masks: unchanged; new entries: zero).
        Other holders of the old Parameter (a plain torch.optim optimizer) must be rebuilt.
        """
        if weight is None:
            weight = self.dense_weight()
        else:
            weight = weight.detach().to(self.weight_values.dtype).to(self.weight_values.device)
            if tuple(weight.shape) != tuple(self._weight_shape()):
                raise ValueError(f"sparseticket: {where(self)}: weight has shape {tuple(weight.shape)}, "
                                 f"expected {tuple(self._weight_shape())}")
        self._set_from_dense(weight, mask, remap=True)

    def _st_remap_state(self, old_token, t: Tensor) -> Optional[Tensor]:
        """Optimizer state laid out for the structure ``old_token`` -> the current one, or None."""
        prev = self._st_prev
        if prev is None or prev[0] is not old_token or t.dim() != 1 or t.shape[0] != prev[1]:
            return None
        _, n_old, pos, found = prev
        if n_old == 0:
            return torch.zeros(found.shape[0], dtype=t.dtype, device=t.device)
        return torch.where(found, t.index_select(0, pos), torch.zeros((), dtype=t.dtype, device=t.device))

    # -- execution choice
    def _path(self, x: Tensor) -> str:
        """'sparse' or 'dense' for this call (``x`` as the kernels get it); eager calls
        record it in ``last_path`` (what was dispatched, for FLOP accounting). Subclasses
        give ``_key(x)`` (the shared cache's key) and ``_run_sparse`` / ``_run_dense``."""
        mode = self.mode if self.mode != "auto" else _mode._GLOBAL_MODE
        if mode != "auto":
            if not torch.compiler.is_compiling():
                self.__dict__["last_path"] = mode
            return mode
        if torch.compiler.is_compiling():
            # no measuring inside a trace: the last eager choice, else the density rule
            if self._choice is not None:
                return self._choice
            return "sparse" if self.density < _mode.HEURISTIC_DENSITY else "dense"
        # per-module memo of the shared cache (the full key costs ~3 us to build)
        small = (x.shape, x.dtype, x.requires_grad, torch.is_grad_enabled(), torch.get_num_threads(),
                 _mode.VERSION[0], self._st_token)
        d = self.__dict__
        fast = d.get("_fast_choice")
        choice = None if fast is None else fast.get(small)
        if choice is not None:
            d["last_path"] = choice
            return choice
        key = self._key(x)
        choice = _mode._CHOICES.get(key)
        if choice is None:
            choice = _mode.decide(key, *self._measure_fns(x, self._run_sparse, self._run_dense))
        self._choice, self._last_key = choice, key
        if fast is None or len(fast) > 64:
            fast = d["_fast_choice"] = {}
        fast[small] = choice
        d["last_path"] = choice
        return choice

    def _known_path(self, shape: torch.Size, dtype: torch.dtype, requires_grad: bool) -> Optional[str]:
        """What ``_path`` returns, with grad mode on, for an input of this shape, dtype and
        requires_grad when no measurement is needed (a pinned mode, or this module's memo
        of an earlier choice; recorded in ``last_path`` as ``_path`` does), else None."""
        mode = self.mode if self.mode != "auto" else _mode._GLOBAL_MODE
        d = self.__dict__
        if mode == "auto":
            fast = d.get("_fast_choice")
            if fast is None:
                return None
            mode = fast.get((shape, dtype, requires_grad, True, torch.get_num_threads(), _mode.VERSION[0],
                             self._st_token))
            if mode is None:
                return None
        d["last_path"] = mode
        return mode

    def _grad_key(self, x: Tensor) -> bool:
        if not torch.is_grad_enabled():
            return False
        return bool(self.weight_values.requires_grad or x.requires_grad or
                    (self.bias is not None and self.bias.requires_grad))

    def _measure_fns(self, x: Tensor, run_sparse, run_dense):
        """Two closures running each path (and its backward, when training) on detached copies."""
        grad = self._grad_key(x)
        v = self.weight_values.detach().requires_grad_(self.weight_values.requires_grad)
        b = None if self.bias is None else self.bias.detach().requires_grad_(self.bias.requires_grad)
        xx = x.detach().requires_grad_(x.requires_grad)
        leaves = [t for t in (xx, v, b) if t is not None and t.requires_grad]

        def wrap(run):
            def go():
                with torch.set_grad_enabled(grad):
                    y = run(xx, v, b)
                    if grad and leaves:
                        torch.autograd.grad(y, leaves, torch.ones_like(y))
            return go

        return wrap(run_sparse), wrap(run_dense)

    def execution_mode(self) -> str:
        """What the layer runs: the forced mode, or the last measured choice ('auto (…)')."""
        forced = _mode.resolve(self.mode)
        if forced is not None:
            return forced
        return f"auto ({self._choice or 'not yet measured'})"

    # -- state dict: data-dependent sizes
    def ticket_layout(self) -> str:
        """What the ticket's columns mean: the layer kind and its dense weight's shape (a
        conv's groups too). Saved with the state dict (its metadata, and ``save_safetensors``'
        header), so that a checkpoint of another architecture whose index sizes happen to
        match (a [6, 2, 3, 3] conv ticket and a Linear(18, 6) are both 6 x 18) fails to load."""
        return f"{self._layout_kind}{tuple(self._weight_shape())}"

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        if len(args) > 1:  # (the deprecated positional form: destination, prefix, keep_vars)
            prefix = args[1]
        out = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        meta = getattr(out, "_metadata", None)
        if meta is not None and prefix[:-1] in meta:
            meta[prefix[:-1]][LAYOUT_KEY] = self.ticket_layout()
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        what = where(self, prefix[:-1] or None)
        O, Kt = self._n_out(), self._ticket_cols()
        get = lambda n: state_dict.get(prefix + n)
        if get("weight_values") is None and get("weight") is not None:
            error_msgs.append(f"sparseticket: {what}: the checkpoint holds a dense 'weight' "
                              f"{tuple(get('weight').shape)}, not a ticket; load it into the dense model and "
                              f"sparsify, or densify this model first")
            return
        theirs = (local_metadata or {}).get(LAYOUT_KEY)
        if theirs is not None and theirs != self.ticket_layout():
            error_msgs.append(f"sparseticket: {what}: the checkpoint's ticket is a {theirs} weight, this layer's "
                              f"a {self.ticket_layout()} one: is the checkpoint from another architecture?")
            return
        crow, ccol, vals = get("crow"), get("ccol"), get("weight_values")
        old = (self.crow.clone(), self.col.clone())
        if crow is not None and crow.shape != (O + 1,):
            error_msgs.append(f"sparseticket: {what}: the checkpoint's crow has shape {tuple(crow.shape)}, expected "
                              f"({O + 1},) = out + 1: is the checkpoint from another architecture?")
            return
        if ccol is not None and ccol.shape != (Kt + 1,):
            error_msgs.append(f"sparseticket: {what}: the checkpoint's ccol has shape {tuple(ccol.shape)}, expected "
                              f"({Kt + 1},): is the checkpoint from another architecture?")
            return
        if vals is not None:
            n = vals.shape[0] if vals.dim() == 1 else -1
            bad = [k for k in ("weight_values",) + _NNZ_BUFFERS if get(k) is not None and tuple(get(k).shape) != (n,)]
            if n < 0 or bad or (crow is not None and int(crow[-1]) != n):
                error_msgs.append(f"sparseticket: {what}: inconsistent ticket in checkpoint (weight_values "
                                  f"{tuple(vals.shape)}, {', '.join(f'{k} {tuple(get(k).shape)}' for k in _NNZ_BUFFERS if get(k) is not None)}"
                                  f"{'' if crow is None else f', crow[-1]={int(crow[-1])}'})")
                return
            if n != self.nnz:  # resize so the copy below fits (a new Parameter, see _install_values)
                self._install_values(self.weight_values.detach().new_empty(n), clear_grad=True)
                for k in _NNZ_BUFFERS:
                    self._buffers[k] = self._buffers[k].new_empty(n)
        a = get("active")
        if a is not None and self._buffers.get("active") is None:
            if a.shape != (O,):
                error_msgs.append(f"sparseticket: {what}: the checkpoint's active has shape {tuple(a.shape)}, "
                                  f"expected ({O},)")
                return
            self._buffers["active"] = torch.empty(O, dtype=torch.bool, device=self.crow.device)
        n_err = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(error_msgs) > n_err:
            return
        msg = self._validate_structure()
        if msg:
            error_msgs.append(f"sparseticket: {what}: invalid ticket in checkpoint: {msg}")
            return
        # the transposed indices are derived from crow / col: rebuilt, and those of the
        # checkpoint must be them (a buffer from another ticket of the same nnz would give
        # wrong input gradients without any error)
        try:
            derived = dict(zip(("ccol", "row", "perm"), ops.ticket_transpose(self.crow, self.col, Kt)))
        except RuntimeError as e:
            error_msgs.append(f"sparseticket: {what}: invalid ticket in checkpoint: {e}")
            return
        bad = [k for k, t in derived.items()
               if get(k) is not None and not torch.equal(get(k).to(device=t.device, dtype=t.dtype), t)]
        if bad:
            error_msgs.append(f"sparseticket: {what}: inconsistent ticket in checkpoint: {', '.join(bad)} "
                              f"{'is' if len(bad) == 1 else 'are'} not the transpose of crow / col")
            return
        self._buffers.update(derived)
        same = torch.equal(old[0], self.crow) and torch.equal(old[1], self.col)
        if not same:
            self._st_prev = None
            self._st_token = object()  # optimizers reset this param's state
        try:
            self._buffers["bits"] = ops.ticket_bitmap(self.crow, self.col, self._ticket_cols())
        except RuntimeError as e:
            error_msgs.append(f"sparseticket: {what}: invalid ticket in checkpoint: {e}")
            return
        self._buffers["flat"] = self._flat_of(self.crow, self.col)
        self._mark_nnz_dynamic()
        register_module_params(self)  # load_state_dict(assign=True) makes new Parameter objects

    def _validate_structure(self) -> Optional[str]:
        crow, col, Kt = self.crow, self.col, self._ticket_cols()
        n = self.col.numel()
        if crow.dtype != torch.int32 or col.dtype != torch.int32:
            return "index buffers must be int32"
        if int(crow[0]) != 0 or int(crow[-1]) != n or bool((crow[1:] < crow[:-1]).any()):
            return "crow must start at 0, be non-decreasing and end at nnz"
        if n and (int(col.min()) < 0 or int(col.max()) >= Kt):
            return f"col out of range [0, {Kt})"
        return self._check_cols(rows_of(crow), col.long())

    def _check_cols(self, rows: Tensor, col: Tensor) -> Optional[str]:
        """Subclass hook: a message if some in-range column is not one this layer's weight has."""
        return None

    # -- keep the optimizer registry in step with the Parameter objects
    def __setstate__(self, state):
        super().__setstate__(state)
        register_module_params(self)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        register_module_params(self)
        return out

    def _repr_common(self) -> str:
        s = f"nnz={self.nnz}, density={self.density:.4g}, mode={self.execution_mode()}"
        a = self._buffers.get("active")
        if a is not None:
            s += f", frozen={self.frozen_fraction:.3g}"
        if self.activation is not None:
            s += f", activation={self.activation}"
        return s

    def set_activation(self, activation: Optional[str]) -> None:
        """None or 'relu'. Prefer ``sparsify(..., fuse_relu=True)``, which also removes the
        nn.ReLU that would otherwise apply a second time."""
        if activation not in (None, "relu"):
            raise ValueError(f"sparseticket: {where(self)}: activation must be None or 'relu', got {activation!r}")
        if activation != self.activation:
            self.activation = activation
            # the fused op costs less than op + relu: a choice measured without it may differ
            self.__dict__["_fast_choice"] = None
            self._choice = None


def _match(old_flat: Tensor, new_flat: Tensor) -> Tuple[Tensor, Tensor]:
    """For each new position: index into the old entries and whether it exists there."""
    if old_flat.numel() == 0:
        return (torch.zeros_like(new_flat), torch.zeros(new_flat.shape, dtype=torch.bool, device=new_flat.device))
    old_sorted, order = torch.sort(old_flat)
    at = torch.searchsorted(old_sorted, new_flat).clamp_(max=old_flat.numel() - 1)
    return order.index_select(0, at), old_sorted.index_select(0, at) == new_flat
