"""FLOP accounting: what the layers and optimizers executed, next to what the dense model
would have cost for the same steps.

    with sparseticket.flops.FlopCounter(model) as fc:
        for x, y in loader:
            opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    print(fc.table())                 # per layer: executed / dense for each kind of work
    fc.totals()['all']                # {'dense': ..., 'executed': ...}

What is counted (a multiply-add is 2 FLOPs, as in ``torch.utils.flop_counter``):

* Layers: nn.Linear, nn.Conv2d and their sparseticket versions (SparseLinear,
  SparseConv2d, DenseNEqLinear, NEqConv2d). Per call, with R rows (Linear: the
  flattened batch; Conv2d: the output positions N·oh·ow), O outputs, K = inputs per
  output (Linear: in_features; Conv2d: in_channels/groups·kh·kw), and nnz kept weights:

  ========================  ==============  =========================================
  kind                      dense           executed
  ========================  ==============  =========================================
  forward                   2·R·O·K         2·R·nnz on the sparse path, 2·R·O·K on
                                            the dense path (``layer.last_path``)
  grad_input                2·R·O·K         the same as forward, when the input
                                            requires grad (never for the first layer
                                            fed plain data); times the fraction of
                                            input channels computed under
                                            ``neq.cut_frozen_outputs``
  grad_weight               2·R·O·K         sparse path: 2·R·nnz over active rows
                                            (SDDMM), or 2·R·K·(active rows keeping
                                            a weight) when a dense Linear ticket's
                                            CPU gradient runs by dense tiles
                                            (ops_cpu.cpp, use_sddmm_tiles; also a
                                            grouped SparseConv2d's im2col calls,
                                            over in·kh·kw columns); dense path:
                                            2·R·K·active rows
  ========================  ==============  =========================================

  Bias additions and bias gradients are not counted (as in torch's counter). The
  forward is recorded when the layer returns; the backward when autograd actually runs
  the layer's backward (a hook on its output's node), so a step without ``backward()``,
  an evaluation under ``no_grad`` or a graph cut by ``sparseticket.neq.freeze_prefix``
  records no executed backward. What each gradient costs is fixed by what required
  grad at the forward (the input, the weight), which is what autograd computes on
  ``loss.backward()``. The dense column is what the same layer, unpruned and with no
  frozen neuron, would have run: a fully frozen layer cut off by ``freeze_prefix`` still
  shows its dense weight gradient (and input gradient, unless it is the first counted
  layer), charged when the backward of the rest of the graph runs.

* Optimizers (torch.optim.SGD / Adam / AdamW and MaskedSGD / MaskedAdamW; others count
  steps only): elements updated × FLOPs per element (``sgd_flops_per_element``,
  ``adam_flops_per_element``). Executed: the masked optimizers update the compact values
  and skip frozen rows; torch.optim updates every element it holds. Dense: every
  element of the dense parameter (a ticket's O·K), plus 1 FLOP per element to re-apply
  the mask of a pruned layer, as dense-masked training does.

Not counted: calls inside ``torch.compile``d regions (the hooks return at once while
tracing, and a compiled graph does not call them), the one-time timing runs with which
a layer in ``mode='auto'`` picks its path (force the mode, or run a step before
counting), and other layer types (BatchNorm, attention, Conv1d/3d).

Cost: nothing while no counter is live (the hooks are installed on entry and removed on
exit). While counting, a few microseconds of Python per layer call and per step; the
active-row counts are computed once per mask change.
"""
from __future__ import annotations

import weakref
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.optim import optimizer as _torch_optimizer
from torch.utils.weak import WeakIdKeyDictionary

from .nn import _registry
from .nn._common import TicketModule
from .optim import MaskedAdamW, MaskedSGD
from .optim._base import MaskedOptimizer

KINDS = ("forward", "grad_input", "grad_weight", "optimizer")
_FWD, _GX, _GW, _OPT = 0, 2, 4, 6  # row layout: [dense, executed] per kind

_LIVE: List["FlopCounter"] = []
_HANDLES: list = []


# ----------------------------------------------------------------------------- optimizer constants


def sgd_flops_per_element(group: dict) -> Tuple[int, int]:
    """(FLOPs per element of one SGD step, of which a fresh momentum buffer skips).

    p -= lr·d: 2; maximize (d = -g): 1; weight decay (d += wd·p): 2; momentum
    (buf = μ·buf + (1-τ)·d): 3, skipped when the buffer is created (buf = d);
    Nesterov (d += μ·buf): 2.
    """
    c = 2 + (1 if group.get("maximize") else 0) + (2 if float(group.get("weight_decay", 0)) != 0 else 0)
    if float(group.get("momentum", 0)) == 0:
        return c, 0
    return c + 3 + (2 if group.get("nesterov") else 0), 3


def adam_flops_per_element(group: dict, decoupled: bool) -> int:
    """FLOPs per element of one Adam/AdamW step: 13 (m lerp 3, v = β2·v + (1-β2)·g² 4,
    denominator √v/c2 + ε 3, p -= s·m/denom 3), + weight decay (AdamW's p *= 1 - lr·wd: 1;
    Adam's g += wd·p: 2), + amsgrad (max: 1), + maximize (1)."""
    c = 13 + (1 if group.get("maximize") else 0) + (1 if group.get("amsgrad") else 0)
    if float(group.get("weight_decay", 0)) != 0:
        c += 1 if decoupled else 2
    return c


def _per_element(opt) -> Optional[Callable[[dict], Tuple[int, int]]]:
    """group -> (FLOPs per element, fresh-momentum saving), or None for unknown optimizers."""
    if isinstance(opt, (torch.optim.SGD, MaskedSGD)):
        return sgd_flops_per_element
    if isinstance(opt, (torch.optim.AdamW, MaskedAdamW)):
        return lambda g: (adam_flops_per_element(g, True), 0)
    if isinstance(opt, torch.optim.Adam):
        return lambda g: (adam_flops_per_element(g, bool(g.get("decoupled_weight_decay"))), 0)
    return None


# ----------------------------------------------------------------------------- active-row counts


# module -> (active, its version, structure token, active rows, kept weights in active rows)
_ROWS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# param -> (active, version, row_ptr, version, elements a masked optimizer updates)
_ELEM_CACHE = WeakIdKeyDictionary()


# module -> (active or None, its version, structure token, active rows that keep a weight)
_TILE_ROWS_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _kept_grad_by_tiles(x: Tensor, nnz: int, R: int, O: int, K: int) -> bool:
    """Whether the compiled CPU kept-weight gradient runs by dense tiles for this call
    (ops_cpu.cpp, kept_grad_tiles: the density threshold, and no batch shards): it then
    computes every column of each active row that keeps a weight, not the kept entries."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return False
    from .ops import _C
    return _C is not None and bool(_C.sddmm_uses_tiles(nnz, R, O, K, x.dtype == torch.float64))


def _grouped_conv_gw(module: nn.Module, x: Tensor, output: Tensor, nnz: int, nnz_active: int,
                     active: Optional[Tensor]) -> int:
    """Executed weight-gradient FLOPs of a grouped SparseConv2d, which runs the linear ops
    on im2col rows (nn/conv.py, _run_grouped): one call over all output positions when
    pointwise, else one per block of positions (_blocks), each choosing per-entry or dense
    tiles over the full im2col width (in_channels·kh·kw) as the C++ does."""
    from .nn.conv import _blocks
    kh, kw = module.kernel_size
    O, Kfull = module.out_channels, module.in_channels * kh * kw
    N, _, oh, ow = output.shape
    if module._pointwise():
        blocks = [N * oh * ow]
    else:
        blocks = [(n1 - n0) * (h1 - h0) * ow for n0, n1, h0, h1 in _blocks(N, oh, ow, Kfull * x.element_size())]
    total = 0
    for rows in blocks:
        if _kept_grad_by_tiles(x, nnz, rows, O, Kfull):
            total += 2 * rows * Kfull * _tile_rows(module, active, module._buffers["crow"])
        else:
            total += 2 * rows * nnz_active
    return total


def _tile_rows(module: nn.Module, active: Optional[Tensor], crow: Tensor) -> int:
    """Active rows that keep at least one weight: the rows the dense-tile gradient computes."""
    token = module.__dict__.get("_st_token")
    version = active._version if active is not None else None
    hit = _TILE_ROWS_CACHE.get(module)
    if hit is not None and hit[0] is active and hit[1] == version and hit[2] is token:
        return hit[3]
    rows = crow[1:] > crow[:-1]
    if active is not None:
        rows = rows & active.to(torch.bool)
    n = int(rows.sum())
    _TILE_ROWS_CACHE[module] = (active, version, token, n)
    return n


def _active_rows(module: nn.Module, active: Tensor, crow: Optional[Tensor]) -> Tuple[int, int]:
    """(active rows, kept weights in active rows) of a layer; one reduction per mask change."""
    token = module.__dict__.get("_st_token")
    hit = _ROWS_CACHE.get(module)
    if hit is not None and hit[0] is active and hit[1] == active._version and hit[2] is token:
        return hit[3], hit[4]
    n = int(active.sum())
    nnz = 0
    if crow is not None:
        nnz = int(((crow[1:] - crow[:-1]).long() * active.to(torch.long)).sum())
    _ROWS_CACHE[module] = (active, active._version, token, n, nnz)
    return n, nnz


def _updated_elements(p: Tensor, active: Optional[Tensor], row_ptr: Optional[Tensor]) -> int:
    """Elements of ``p`` a masked optimizer writes (frozen rows are skipped)."""
    if active is None:
        return p.numel()
    rv = None if row_ptr is None else row_ptr._version
    hit = _ELEM_CACHE.get(p)
    if hit is not None and hit[0] is active and hit[1] == active._version and hit[2] is row_ptr and hit[3] == rv:
        return hit[4]
    if row_ptr is not None:
        n = int(((row_ptr[1:] - row_ptr[:-1]).long() * active.to(torch.long)).sum())
    elif active.shape == p.shape:
        n = int(active.sum())
    else:
        n = int(active.sum()) * (p.numel() // max(active.numel(), 1))
    _ELEM_CACHE[p] = (active, active._version, row_ptr, rv, n)
    return n


# ----------------------------------------------------------------------------- layer hooks


def _layer_kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, TicketModule):
        return "linear" if hasattr(module, "in_features") else "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return None


def _weight_param(module: nn.Module) -> Optional[Tensor]:
    ps = module._parameters
    for name in ("weight_values", "weight_orig", "weight"):
        p = ps.get(name)
        if p is not None:
            return p
    return None


def _record_call(c: "FlopCounter", name: str, kind: str, module: nn.Module, args, output) -> None:
    """One eager call of a counted layer: its forward now, its backward when autograd runs it."""
    if not c._live or not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
        return
    x = args[0]
    if kind == "linear":
        O, K = module.out_features, module.in_features
        R = x.numel() // K if K else 0
    else:
        kh, kw = module.kernel_size
        O, K = module.out_channels, module.in_channels // module.groups * kh * kw
        R = output.numel() // O if O else 0
    dense = 2 * R * O * K
    ticket = isinstance(module, TicketModule)
    path = module.__dict__.get("last_path") if ticket else "dense"
    nnz = module._parameters["weight_values"].numel() if ticket else O * K
    sparse = ticket and path != "dense"  # every kernel path but dense-masked runs on the kept weights only
    executed = 2 * R * nnz if sparse else dense
    typ = type(module).__name__
    row = c._row(name, typ, path)
    row[_FWD] += dense
    row[_FWD + 1] += executed
    if not torch.is_grad_enabled():
        return

    active = module._buffers.get("active")
    if active is None:
        n_active, nnz_active = O, nnz
    else:
        n_active, nnz_active = _active_rows(module, active, module._buffers["crow"] if ticket else None)
    w = _weight_param(module)
    w_grad = w is not None and w.requires_grad
    exec_gx = executed if x.requires_grad else 0
    cut = module.__dict__.get("last_input_cut")  # a consumer under neq.cut_frozen_outputs: channels computed
    if cut is not None:
        exec_gx = int(round(exec_gx * cut))
    if not w_grad:
        exec_gw = 0
    elif not sparse:
        exec_gw = 2 * R * K * n_active
    elif kind == "linear" and _kept_grad_by_tiles(x, nnz, R, O, K):
        exec_gw = 2 * R * K * _tile_rows(module, active, module._buffers["crow"])
    elif kind == "conv" and module.groups > 1:
        exec_gw = _grouped_conv_gw(module, x, output, nnz, nnz_active, active)
    else:
        exec_gw = 2 * R * nnz_active
    # the dense model trains this weight if it requires grad, or if NEq froze the whole layer
    # (freeze_prefix turns requires_grad off for those)
    dense_gw = dense if (w_grad or (active is not None and n_active == 0)) else 0
    dense_gx = dense if (x.requires_grad or c._deferred) else 0

    if not output.requires_grad:  # cut off by a frozen prefix: charged with a later layer's backward
        if dense_gw:
            c._deferred.append((name, typ, dense_gx, dense_gw))
        return
    owned, c._deferred = c._deferred, []
    # a view's own node leaves the graph when the view is written in place (ReLU(inplace=True)),
    # its base's stays; a custom Function may return a view of a tensor it made, without a node
    base = output._base if output._is_view() else None
    node = base.grad_fn if base is not None and base.grad_fn is not None else output.grad_fn
    if node is not None:
        node.register_prehook(_backward_recorder(c, (name, typ, dense_gx, dense_gw), exec_gx, exec_gw, owned))


def _backward_recorder(c: "FlopCounter", entry, exec_gx: int, exec_gw: int, owned: list):
    def record(grad_outputs):
        if c._live:
            for i, (name, typ, dense_gx, dense_gw) in enumerate([entry] + owned):
                row = c._row(name, typ)
                row[_GX] += dense_gx
                row[_GW] += dense_gw
                if i == 0:
                    row[_GX + 1] += exec_gx
                    row[_GW + 1] += exec_gw
        return None

    return record


# ----------------------------------------------------------------------------- optimizer hooks


_FRESH: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> ids of params with no momentum yet


def _on_step_pre(opt, args, kwargs):
    if torch.compiler.is_compiling() or not isinstance(opt, (torch.optim.SGD, MaskedSGD)):
        return None
    state = opt.state
    _FRESH[opt] = {id(p) for g in opt.param_groups if float(g.get("momentum", 0)) != 0 for p in g["params"]
                   if "momentum_buffer" not in state.get(p, ())}
    return None


def _on_step_post(opt, args, kwargs):
    if torch.compiler.is_compiling():
        return None
    cost_of = _per_element(opt)
    fresh = _FRESH.pop(opt, ())
    masked = isinstance(opt, MaskedOptimizer)
    for c in list(_LIVE):
        if c._count_step(opt, cost_of, fresh, masked):
            c._end_step()
    return None


# ----------------------------------------------------------------------------- the counter


class FlopCounter:
    """Counts the FLOPs ``model``'s layers and optimizer steps execute while it is live,
    with the dense model's cost for the same work.

    ``with FlopCounter(model) as fc: ...`` (or ``fc.start()`` / ``fc.stop()``). Counters
    nest: each one counts what runs inside it, for its own model's layers. A training
    step ends at each optimizer step that updates parameters of ``model``.

    Reading: ``fc.summary()`` (rows {layer, type, path, kind, dense_flops,
    executed_flops}, per layer and kind, then the totals with layer ``'(total)'``),
    ``fc.totals()`` ({kind: {'dense', 'executed'}} plus 'all'), ``fc.layer(name)``,
    ``fc.table()``, ``fc.steps``, ``fc.history`` (the totals of each step); with
    ``per_step=True`` the run's figures are divided by the number of steps.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise TypeError(f"sparseticket: FlopCounter needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self._live = False
        self._root_handle = None
        self.reset()

    # -- lifecycle
    def reset(self) -> None:
        """Forget everything counted so far (keeps counting if live)."""
        self._rows: Dict[str, List[int]] = {}
        self._meta: Dict[str, list] = {}  # name -> [type name, set of paths]
        self._deferred: list = []
        self._history: List[Tuple[int, ...]] = []
        self._at_last_step = (0,) * 8
        self.steps = 0

    def start(self) -> "FlopCounter":
        if self._live:
            raise RuntimeError("sparseticket: this FlopCounter is already counting")
        self._live = True
        self._deferred = []
        self._hooks: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # layer -> hook handle
        self._hook_layers()
        self._scan_params()
        self._rescanned = False
        self._root_handle = self.model.register_forward_pre_hook(self._new_pass)
        if not _LIVE:
            _HANDLES.extend([_torch_optimizer.register_optimizer_step_pre_hook(_on_step_pre),
                             _torch_optimizer.register_optimizer_step_post_hook(_on_step_post)])
        _LIVE.append(self)
        return self

    def stop(self) -> None:
        if not self._live:
            return
        self._live = False
        _LIVE.remove(self)
        self._root_handle.remove()
        for h in list(self._hooks.values()):
            h.remove()
        self._hooks = weakref.WeakKeyDictionary()
        if not _LIVE:
            for h in _HANDLES:
                h.remove()
            _HANDLES.clear()

    def __enter__(self) -> "FlopCounter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _new_pass(self, module, args):
        if not torch.compiler.is_compiling():
            self._deferred = []
            self._hook_layers()  # layers swapped in since the last forward (sparsify inside the block)

    # -- which modules and parameters are the model's
    def _hook_layers(self) -> None:
        """Per-module forward hooks on the model's Linear/Conv2d layers (a global module hook
        would make torch.compile warn at every call of a compiled model)."""
        present = set()
        for name, m in self.model.named_modules():
            kind = _layer_kind(m)
            if kind is None:
                continue
            present.add(id(m))
            if m not in self._hooks:
                self._hooks[m] = m.register_forward_hook(self._forward_hook(name or "(model)", kind))
        if len(present) != len(self._hooks):
            for m in [m for m in self._hooks if id(m) not in present]:
                self._hooks.pop(m).remove()

    def _scan_params(self) -> None:
        self._owners = WeakIdKeyDictionary()  # param -> (layer name, module, attribute)
        for name, m in self.model.named_modules():
            for pname, p in m._parameters.items():
                if p is not None and p not in self._owners:
                    self._owners[p] = (name or "(model)", m, pname)

    def _forward_hook(self, name: str, kind: str):
        def hook(module, args, output):
            if not torch.compiler.is_compiling():
                _record_call(self, name, kind, module, args, output)
        hook.follows_layer_swaps = True  # (the counter hooks a layer sparsify swaps in itself)
        return hook

    def _owner(self, p: Tensor):
        hit = self._owners.get(p)
        if hit is None and not self._rescanned:
            # a mask change with a new nnz put a new Parameter into its layer; at most one
            # rescan per step, for optimizers that also hold other models' parameters
            self._scan_params()
            self._rescanned = True
            hit = self._owners.get(p)
        return hit

    def _row(self, name: str, typ: str, path: Optional[str] = None) -> List[int]:
        row = self._rows.get(name)
        if row is None:  # also after a reset() between a forward and its backward
            row = self._rows[name] = [0] * 8
            self._meta[name] = [typ, set()]
        if path is not None:
            self._meta[name][1].add(path)
        return row

    # -- optimizer steps
    def _count_step(self, opt, cost_of, fresh, masked: bool) -> bool:
        """Add one optimizer step's FLOPs; False if the optimizer holds none of the model's parameters."""
        ours = False
        for group in opt.param_groups:
            cost = cost_of(group) if cost_of is not None else None
            for p in group["params"]:
                owner = self._owner(p)
                if owner is None:
                    continue
                ours = True
                if cost is None:
                    continue
                name, module, attr = owner
                per, momentum_part = cost
                if id(p) in fresh:
                    per -= momentum_part
                keep = active = row_ptr = None
                info = _registry.param_masks(p)
                if info is not None:
                    active = info.active() if info.active is not None else None
                    row_ptr = info.row_ptr() if info.row_ptr is not None else None
                    keep = info.keep() if info.keep is not None else None
                if p.grad is None:
                    # skipped; the dense model still updates a layer NEq froze whole (freeze_prefix
                    # drops such gradients)
                    if active is None or _updated_elements(p, active, row_ptr) != 0:
                        continue
                    n = 0
                elif masked:
                    n = _updated_elements(p, active, row_ptr)
                else:
                    n, keep = p.numel(), None
                executed = n * per + (n if keep is not None else 0)
                if attr == "weight_values" and isinstance(module, TicketModule):
                    O, K = module._dense2d_shape()
                    n_dense = O * K
                    pruned = module.nnz < n_dense
                else:
                    n_dense = p.numel()
                    pruned = attr == "weight_orig" or keep is not None
                dense = n_dense * per + (n_dense if pruned else 0)
                row = self._row(name, type(module).__name__)
                row[_OPT] += dense
                row[_OPT + 1] += executed
        self._rescanned = False
        return ours

    def _end_step(self) -> None:
        self.steps += 1
        now = self._sum()
        self._history.append(tuple(a - b for a, b in zip(now, self._at_last_step)))
        self._at_last_step = now
        self._deferred = []

    # -- reading
    def _sum(self) -> Tuple[int, ...]:
        tot = [0] * 8
        for row in self._rows.values():
            for i, v in enumerate(row):
                tot[i] += v
        return tuple(tot)

    def _div(self, per_step: bool):
        if not per_step:
            return lambda v: v
        if self.steps == 0:
            raise ValueError("sparseticket: FlopCounter saw no optimizer step; per_step figures need one")
        n = self.steps
        return lambda v: v / n

    @staticmethod
    def _as_kinds(vals, f) -> Dict[str, Dict[str, float]]:
        out = {k: {"dense": f(vals[2 * i]), "executed": f(vals[2 * i + 1])} for i, k in enumerate(KINDS)}
        out["all"] = {"dense": f(sum(vals[0::2])), "executed": f(sum(vals[1::2]))}
        return out

    def totals(self, per_step: bool = False) -> Dict[str, Dict[str, float]]:
        """{kind: {'dense': ..., 'executed': ...}} for each of KINDS and 'all'."""
        return self._as_kinds(self._sum(), self._div(per_step))

    def layer(self, name: str, per_step: bool = False) -> Dict[str, Dict[str, float]]:
        """One layer's figures, as ``totals()``; KeyError if nothing was counted for it."""
        if name not in self._rows:
            raise KeyError(f"sparseticket: FlopCounter counted nothing for layer {name!r} "
                           f"(counted: {sorted(self._rows)})")
        return self._as_kinds(self._rows[name], self._div(per_step))

    def layers(self) -> List[str]:
        return list(self._rows)

    @property
    def history(self) -> List[Dict[str, Dict[str, int]]]:
        """Per optimizer step: the totals of that step (as ``totals()``)."""
        return [self._as_kinds(h, lambda v: v) for h in self._history]

    def summary(self, per_step: bool = False) -> List[dict]:
        """Rows {layer, type, path, kind, dense_flops, executed_flops}: per layer and kind,
        then one per kind (and 'all') with layer '(total)'."""
        f = self._div(per_step)
        out = []
        for name, row in self._rows.items():
            typ, paths = self._meta[name]
            path = "/".join(sorted(paths)) or "-"
            for i, k in enumerate(KINDS):
                out.append(dict(layer=name, type=typ, path=path, kind=k, dense_flops=f(row[2 * i]),
                                executed_flops=f(row[2 * i + 1])))
        for k, v in self.totals(per_step).items():
            out.append(dict(layer="(total)", type="", path="", kind=k, dense_flops=v["dense"],
                            executed_flops=v["executed"]))
        return out

    def table(self, per_step: bool = False) -> str:
        """One line per layer: executed / dense FLOPs of each kind, the total, and dense ÷ executed."""
        f = self._div(per_step)
        head = ["layer", "type", "path"] + list(KINDS) + ["total", "dense/exec"]
        lines = []
        rows = list(self._rows.items()) + [("(total)", self._sum())]
        for name, row in rows:
            typ, paths = self._meta.get(name, ("", ()))
            cells = [name, typ, "/".join(sorted(paths))]
            for i in range(len(KINDS)):
                cells.append(f"{_si(f(row[2 * i + 1]))} / {_si(f(row[2 * i]))}")
            d, e = sum(row[0::2]), sum(row[1::2])
            cells += [f"{_si(f(e))} / {_si(f(d))}", f"{d / e:.2f}x" if e else "-"]
            lines.append(cells)
        widths = [max(len(r[i]) for r in [head] + lines) for i in range(len(head))]

        def fmt(r):
            return "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()

        title = f"FLOPs executed / dense{' per step' if per_step else ''} ({self.steps} optimizer steps)"
        return "\n".join([title, fmt(head)] + [fmt(r) for r in lines])

    def __repr__(self) -> str:
        t = self.totals()["all"]
        return (f"FlopCounter(steps={self.steps}, executed={_si(t['executed'])}, dense={_si(t['dense'])}, "
                f"live={self._live})")


def _si(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}" if isinstance(v, float) and v != int(v) else str(int(v))
