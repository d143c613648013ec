"""Cutting the backward at a prefix of fully frozen layers.

A frozen neuron's module already skips its weight-gradient rows, but autograd still runs
the input-gradient chain through it to reach the layers before. When every layer up to
some point is fully frozen, nothing before that point needs a gradient at all: setting
``requires_grad=False`` on those parameters makes autograd stop recording there, so the
prefix gets no backward. ``freeze_prefix`` does that for the span of a training epoch.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn


def is_neq_capable(module: nn.Module) -> bool:
    """True if ``module`` can freeze neurons (has ``active`` and ``set_active``)."""
    if hasattr(module, "set_active") and hasattr(module, "active"):
        return True
    try:  # sparseticket.nn is optional here: fall back to duck typing without it
        from ..nn import neq_capable
    except Exception:  # noqa: BLE001  (a missing or half-built nn package must not break NEq)
        return False
    return bool(neq_capable(module))


def fully_frozen(module: nn.Module) -> bool:
    """True if every neuron of ``module`` is frozen (``active`` is a mask with no True)."""
    active = getattr(module, "active", None)
    return active is not None and active.numel() > 0 and not bool(active.any())


def frozen_prefix(model: nn.Module, order: Sequence[str] | None = None) -> list[tuple[str, nn.Module]]:
    """The leading NEq-capable modules of ``model`` that are fully frozen, as (name, module).

    Order is registration order (``model.named_modules()``), which for most models is the
    forward order; pass ``order`` (module names in forward order, e.g.
    ``NEqTracker.execution_order``) when it is not. The list stops at the first module
    with any active neuron; it is empty if the first layer has one.
    """
    if order is None:
        candidates = [(n, m) for n, m in model.named_modules() if is_neq_capable(m)]
    else:
        lookup = dict(model.named_modules())
        unknown = [n for n in order if n not in lookup]
        if unknown:
            raise ValueError(f"frozen_prefix: no module named {unknown[0]!r} in the model")
        candidates = [(n, lookup[n]) for n in order]
    prefix = []
    for name, module in candidates:
        if not fully_frozen(module):
            break
        prefix.append((name, module))
    return prefix


def _prefix_parameters(model: nn.Module, prefix: Sequence[tuple[str, nn.Module]], include_between: bool):
    if not prefix:
        return []
    if not include_between:
        return [p for _, m in prefix for p in m.parameters()]
    # Every parameter registered before the end of the last prefix module (e.g. the
    # BatchNorm between two frozen convs): these would otherwise keep the backward alive.
    last = prefix[-1][0]
    params, seen_last = [], False
    for name, module in model.named_modules():
        if seen_last and not (name.startswith(last + ".") or last == ""):
            break
        params.extend(module.parameters(recurse=False))
        if name == last:
            seen_last = True
    return params


@contextmanager
def freeze_prefix(model: nn.Module, prefix: Sequence[tuple[str, nn.Module]] | None = None,
                  include_between: bool = False, order: Sequence[str] | None = None) -> Iterator[list]:
    """Within the block, the fully frozen prefix's parameters have ``requires_grad=False``.

    Users wrap a training epoch (after ``tracker.step()``, which set the masks)::

        with freeze_prefix(model):
            for x, y in loader: ...

    Their ``.grad`` is set to None on entry so torch optimizers skip them (no weight decay
    or momentum step); ``requires_grad`` is restored on exit. ``include_between=True`` also
    freezes parameters of other modules registered inside the prefix (e.g. a BatchNorm
    between two frozen convs), which changes training (they stop learning) but is needed
    for the cut when such modules exist. Yields the prefix as (name, module) pairs.
    """
    prefix = list(frozen_prefix(model, order) if prefix is None else prefix)
    params = list({id(p): p for p in _prefix_parameters(model, prefix, include_between)}.values())
    saved = [(p, p.requires_grad) for p in params]
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    try:
        yield prefix
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
