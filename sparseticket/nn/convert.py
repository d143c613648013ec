"""Swapping layers in place: sparsify / densify / enable_neq, magnitude masks, report."""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from . import _mode
from ._common import TicketModule, check_mask, check_replaceable, describe, neq_capable, where
from ._registry import register_module_params
from .conv import NEqConv2d, SparseConv2d
from .fast_step import install_chains, remove_chains
from .pool import MaxPool2d
from .linear import DenseNEqLinear, FusedReLU, SparseLinear, _init_neq

Filter = Callable[[str, nn.Module], bool]
_DENSE_TYPES = (nn.Linear, DenseNEqLinear, nn.Conv2d, NEqConv2d)


def _named_convertible(model: nn.Module, types) -> List[Tuple[str, nn.Module, str, nn.Module]]:
    """(name, parent, attribute, module) for modules of exactly ``types`` that can be swapped.

    Subclasses are skipped (their forward may do something else), and so are the
    projections inside nn.MultiheadAttention, which reads their weights directly.
    """
    out = []

    def walk(parent: nn.Module, prefix: str):
        if isinstance(parent, nn.MultiheadAttention):
            return
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{prefix}.{attr}" if prefix else attr
            if type(child) in types:
                out.append((name, parent, attr, child))
            else:
                walk(child, name)

    if type(model) in types:
        raise TypeError("sparseticket: pass a model containing the layer, not the layer itself "
                        "(use SparseLinear.from_dense / SparseConv2d.from_dense for a single layer)")
    walk(model, "")
    return out


def _dense_weight(module: nn.Module) -> Tensor:
    w = module._parameters.get("weight_orig")
    return (w if w is not None else module.weight).detach()


def _current_mask(module: nn.Module) -> Tensor:
    wm = module._buffers.get("weight_mask")
    if wm is not None:
        return check_mask(wm, tuple(wm.shape), where(module))
    return module.weight.detach() != 0


# ----------------------------------------------------------------------------- magnitude rule


def magnitude_masks(weights: Dict[str, Tensor], masks: Dict[str, Tensor],
                    amount: Union[float, Dict[str, float]], scope: str = "global") -> Dict[str, Tensor]:
    """Prune ``amount`` of the currently kept weights by |w|, globally or per layer.

    ``amount``: a fraction in [0, 1], or {name: fraction} (per layer; missing names 0).
    Exactly round(amount * kept) weights are pruned (ties broken by position).
    """
    if scope not in ("global", "layerwise"):
        raise ValueError(f"sparseticket: scope must be 'global' or 'layerwise', got {scope!r}")
    if isinstance(amount, dict):
        unknown = sorted(set(amount) - set(weights))
        if unknown:
            raise KeyError(f"sparseticket: amount names layers that are not converted: {unknown}")
        fractions, scope = {n: float(amount.get(n, 0.0)) for n in weights}, "layerwise"
    else:
        fractions = {n: float(amount) for n in weights}
    for n, a in fractions.items():
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"sparseticket: layer '{n}': amount must be in [0, 1], got {a}")
    out = {}
    if scope == "layerwise":
        for n, w in weights.items():
            out[n] = _prune_smallest([w], [masks[n]], fractions[n])[0]
        return out
    names = list(weights)
    new = _prune_smallest([weights[n] for n in names], [masks[n] for n in names], fractions[names[0]] if names else 0)
    return dict(zip(names, new))


def _prune_smallest(weights: List[Tensor], masks: List[Tensor], fraction: float) -> List[Tensor]:
    kept = [w.detach().abs().float().flatten()[m.flatten()] for w, m in zip(weights, masks)]
    total = sum(k.numel() for k in kept)
    k = int(round(fraction * total))
    if k == 0:
        return [m.clone() for m in masks]
    scores = torch.cat([s.cpu() for s in kept])
    drop = torch.zeros(total, dtype=torch.bool)
    drop[torch.argsort(scores, stable=True)[:k]] = True
    out, start = [], 0
    for w, m, s in zip(weights, masks, kept):
        flat = m.flatten().clone()
        idx = flat.nonzero().squeeze(1)
        flat[idx[drop[start:start + s.numel()].to(idx.device)]] = False
        start += s.numel()
        out.append(flat.view(m.shape))
    return out


# ----------------------------------------------------------------------------- sparsify / densify


def sparsify(model: nn.Module, masks: Optional[Dict[str, Tensor]] = None,
             amount: Union[None, float, Dict[str, float]] = None, filter: Optional[Filter] = None,
             mode: str = "auto", scope: str = "global", fuse_relu: bool = False) -> nn.Module:
    """Replace nn.Linear / nn.Conv2d layers of ``model`` in place by SparseLinear / SparseConv2d.

    * ``masks``: {layer name: keep mask (weight's shape, bool or 0/1)}; only these layers
      are converted.
    * ``amount``: prune this fraction of each converted layer's kept weights by magnitude
      (``scope='global'``: one threshold over all converted layers; 'layerwise'; or a
      {name: fraction} dict), on top of ``masks`` / the torch.nn.utils.prune mask.
    * neither: the layer's torch.nn.utils.prune mask (weight_orig * weight_mask is
      converted directly), else its non-zero pattern.
    * ``filter(name, module) -> bool`` selects layers (default: every Linear/Conv2d,
      including DenseNEqLinear/NEqConv2d, whose ``active`` carries over).

    * ``fuse_relu``: where an nn.ReLU directly follows a SparseLinear or SparseConv2d in an nn.Sequential,
      the layer applies it itself (``activation='relu'``: one op and one autograd node
      instead of two of each, the same numbers) and the nn.ReLU becomes a FusedReLU
      placeholder. The layer's output, which forward hooks and the NEq tracker would
      see, is then the activation, so leave it off for NEq. Where a sparseticket
      ``MaxPool2d`` follows the conv's ReLU, the pool applies the ReLU to its output
      instead (``relu_after``: pool and ReLU commute exactly, and the ReLU's backward then
      runs on the pooled quarter) and the conv's output stays the pre-activation. An nn.Sequential that is then
      an MLP (an optional leading nn.Flatten, then linear layers and their ReLUs, at least
      one a SparseLinear) also gets a forward that runs all its layers as one autograd
      node when a call allows it (``fast_step.ChainForward``: no hooks on its children,
      grad mode on, known paths, no frozen neurons; bit-identical, else the modules as
      before). ``densify`` undoes both.

    Returns ``model``. Build the optimizer after sparsifying (the weights are new Parameters).
    """
    _mode.check_mode(mode)
    found = _named_convertible(model, _DENSE_TYPES)
    if masks is not None:
        by_name = {n: rec for n, *rec in ((r[0], r) for r in found)}
        missing = [n for n in masks if n not in by_name]
        if missing:
            names = dict(model.named_modules())
            details = [f"'{n}' ({describe(names[n])}, not convertible)" if n in names else f"'{n}' (no such layer)"
                       for n in missing]
            raise KeyError(f"sparseticket: sparsify: masks name layers that cannot be sparsified: {', '.join(details)}")
        found = [r for r in found if r[0] in masks]
    if filter is not None:
        found = [r for r in found if filter(r[0], r[3])]
    for name, _, _, module in found:
        check_replaceable(module, where(module, name))  # (all checked before any layer is replaced)
        w = _dense_weight(module)
        if w.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"sparseticket: {where(module, name)}: sparse layers support float32/float64 "
                            f"weights, got {w.dtype}; exclude it with filter=")
    first = {}  # id(layer) -> its first name: a shared layer gets one mask
    for name, _, _, module in found:
        first.setdefault(id(module), name)
    _check_untied(model, [(n, m) for n, _, _, m in found if first[id(m)] == n])
    base = {}
    for name, _, _, module in found:
        if first[id(module)] != name:
            continue
        w = _dense_weight(module)
        if masks is not None:
            base[name] = check_mask(masks[name], tuple(w.shape), where(module, name), w.device)
        else:
            base[name] = _current_mask(module).to(w.device)
    if amount is not None:
        base = magnitude_masks({n: _dense_weight(r[3]) for r in found for n in [r[0]] if n in base}, base, amount,
                               scope)
    converted = {}  # a layer registered under two names (shared) stays one layer
    for name, parent, attr, module in found:
        new = converted.get(id(module))
        if new is None:
            cls = SparseLinear if isinstance(module, nn.Linear) else SparseConv2d
            new = converted[id(module)] = cls.from_dense(module, base[first[id(module)]], mode=mode, name=name)
        setattr(parent, attr, new)
    if fuse_relu:
        _fuse_relus(model)
        install_chains(model)
    return model


def _check_untied(model: nn.Module, layers) -> None:
    """A weight Parameter that another module holds too (tied weights: two layers, or a layer
    and an embedding) would become a ticket of its own in each converted layer and train
    apart from the other holder (review 49): refused. (One layer registered under two names
    is fine: it stays one layer.)"""
    holders: Dict[int, list] = {}
    for mname, mod in model.named_modules(remove_duplicate=True):
        for pname, par in mod._parameters.items():
            if par is not None:
                holders.setdefault(id(par), []).append((mname, mod, pname))
    for name, module in layers:
        for key in ("weight", "weight_orig"):
            par = module._parameters.get(key)
            if par is None:
                continue
            others = [f"'{n or '<model>'}'.{pn}" for n, m, pn in holders.get(id(par), []) if m is not module]
            if others:
                raise ValueError(f"sparseticket: sparsify: {where(module, name)} shares its {key} with "
                                 f"{', '.join(others)} (tied weights); a sparse layer owns its weight: untie "
                                 f"them, or leave all of them out with filter=")


def _fuse_relus(model: nn.Module) -> None:
    """SparseLinear / SparseConv2d followed by nn.ReLU in an nn.Sequential: the layer applies the ReLU."""
    uses: Dict[int, int] = {}
    for parent in model.modules():
        for child in parent._modules.values():
            if child is not None:
                uses[id(child)] = uses.get(id(child), 0) + 1
    for parent in list(model.modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for i, (a, b) in enumerate(zip(names, names[1:])):
            layer, nxt = parent._modules[a], parent._modules[b]
            # a layer used at two places would apply the ReLU at both
            if not (type(layer) in (SparseLinear, SparseConv2d) and layer.activation is None and type(nxt) is nn.ReLU
                    and uses[id(layer)] == 1 and uses[id(nxt)] == 1):
                continue
            pool = parent._modules[names[i + 2]] if i + 2 < len(names) else None
            if (type(layer) is SparseConv2d and type(pool) is MaxPool2d and not pool.relu_after
                    and not pool.return_indices and uses[id(pool)] == 1):
                pool.relu_after = True  # conv -> pool -> ReLU: the ReLU's backward on the pooled tensor
            else:
                layer.set_activation("relu")
            parent._modules[b] = FusedReLU()


def _unfuse_relus(model: nn.Module) -> None:
    """The inverse of _fuse_relus: each FusedReLU back to nn.ReLU, its layer's activation
    (or the max-pool after it) off."""
    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if (isinstance(child, FusedReLU) and isinstance(parent, nn.Sequential) and i + 1 < len(names)
                    and isinstance(parent._modules[names[i + 1]], MaxPool2d)
                    and parent._modules[names[i + 1]].relu_after):
                parent._modules[names[i + 1]].relu_after = False
                parent._modules[name] = nn.ReLU()
                continue
            if isinstance(child, (SparseLinear, SparseConv2d)) and child.activation is not None:
                nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
                if not isinstance(parent, nn.Sequential) or not isinstance(nxt, FusedReLU):
                    raise ValueError(f"sparseticket: densify: {where(child, name)} applies a fused "
                                     f"{child.activation} but no FusedReLU follows it in an nn.Sequential; "
                                     "call set_activation(None) and add the activation back yourself")
                child.set_activation(None)
                parent._modules[names[i + 1]] = nn.ReLU()


def densify(model: nn.Module, as_pruned: bool = False) -> nn.Module:
    """Replace SparseLinear / SparseConv2d in place by dense layers with the masked weights.

    ``as_pruned=True`` gives torch.nn.utils.prune layers instead (``weight_orig`` +
    ``weight_mask``), which keep the mask. Layers with frozen neurons come back as
    DenseNEqLinear / NEqConv2d. Returns ``model``.
    """
    remove_chains(model)
    _unfuse_relus(model)
    converted = {}
    for name, parent, attr, module in _named_convertible(model, (SparseLinear, SparseConv2d)):
        dense = converted.get(id(module))
        if dense is None:
            dense = converted[id(module)] = module.to_dense()
            if as_pruned:
                prune.custom_from_mask(dense, "weight", module.mask().to(dense.weight.device))
                register_module_params(dense)  # MaskedSGD/MaskedAdamW keep weight_orig's pruned entries at 0
        setattr(parent, attr, dense)
    return model


def enable_neq(model: nn.Module, filter: Optional[Filter] = None) -> nn.Module:
    """Make every plain nn.Linear / nn.Conv2d of ``model`` NEq-capable, in place.

    The layers keep their Parameters, hooks (torch.nn.utils.prune too) and state dict
    keys: they become DenseNEqLinear / NEqConv2d (subclasses) with ``active = None``.
    Sparse layers are NEq-capable already. An nn.Sequential MLP (an optional leading
    nn.Flatten, then linear layers and their ReLUs) that now holds a DenseNEqLinear gets
    the forward that runs its layers as one autograd node when a call allows it
    (``fast_step.ChainForward``, as ``sparsify(fuse_relu=True)`` gives: no hooks on its
    children, grad mode on, float32/64; bit-identical, else the modules as before;
    ``remove_chains`` takes it away). Returns ``model``.
    """
    for name, _, _, module in _named_convertible(model, (nn.Linear, nn.Conv2d)):
        if filter is not None and not filter(name, module):
            continue
        module.__class__ = DenseNEqLinear if type(module) is nn.Linear else NEqConv2d
        _init_neq(module)
    attach_masks(model)
    install_chains(model, holding=(DenseNEqLinear,))
    return model


def attach_masks(model: nn.Module) -> nn.Module:
    """Let MaskedSGD / MaskedAdamW find the masks of ``model``'s layers.

    Sparse and NEq modules register themselves; this also covers layers pruned with
    torch.nn.utils.prune (their ``weight_orig`` gets ``weight_mask`` as keep mask, so
    pruned entries stay exactly zero whatever weight decay or momentum do).
    """
    for module in model.modules():
        if isinstance(module, TicketModule) or neq_capable(module) or "weight_mask" in module._buffers:
            register_module_params(module)
    return model


def neq_modules(model: nn.Module) -> Iterable[Tuple[str, nn.Module]]:
    """(name, module) of every layer that can freeze neurons."""
    return ((n, m) for n, m in model.named_modules() if neq_capable(m))


# ----------------------------------------------------------------------------- report


def layer_report(model: nn.Module) -> List[dict]:
    """One dict per sparse / NEq layer: name, type, shape, nnz, density, mode, choice, timings."""
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, TicketModule):
            t = _mode._TIMINGS.get(m._last_key) if m._last_key is not None else None
            rows.append(dict(name=name, type=type(m).__name__, shape=tuple(m._weight_shape()), nnz=m.nnz,
                             density=m.density, mode=m.mode, runs=_runs(m), frozen=m.frozen_fraction,
                             sparse_ms=None if t is None else 1e3 * t[0], dense_ms=None if t is None else 1e3 * t[1]))
        elif neq_capable(m):
            w = m.weight
            rows.append(dict(name=name, type=type(m).__name__, shape=tuple(w.shape), nnz=w.numel(), density=1.0,
                             mode="dense", runs="dense", frozen=m.frozen_fraction, sparse_ms=None, dense_ms=None))
    return rows


def _runs(m: TicketModule) -> str:
    forced = _mode.resolve(m.mode)
    return forced if forced is not None else (m._choice or "?")


def report(model: nn.Module) -> str:
    """A table of every sparse / NEq layer: density, forced mode, what it runs, measured times."""
    rows = layer_report(model)
    head = ("layer", "type", "shape", "nnz", "density", "mode", "runs", "frozen", "sparse ms", "dense ms")
    fmt = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
    table = [head] + [(r["name"], r["type"], "x".join(map(str, r["shape"])), r["nnz"], r["density"], r["mode"],
                       r["runs"], r["frozen"], r["sparse_ms"], r["dense_ms"]) for r in rows]
    table = [tuple(fmt(v) for v in row) for row in table]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"global mode: {_mode.get_mode()}, threads: {torch.get_num_threads()}")
    return "\n".join(lines)
