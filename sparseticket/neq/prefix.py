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
    """The parameters ``freeze_prefix`` freezes: those of the prefix's modules (and, with
    ``include_between``, of every module registered before the prefix's end), less any
    parameter that a module outside that set also holds (tied weights): that module's use
    still needs its gradient."""
    if not prefix:
        return []
    if not include_between:
        owners = {id(sub): sub for _, m in prefix for sub in m.modules()}
    else:
        # Every module registered before the end of the last prefix module (e.g. the
        # BatchNorm between two frozen convs): its parameters would otherwise keep the
        # backward alive.
        last = prefix[-1][0]
        owners, seen_last = {}, False
        for name, module in model.named_modules():
            if seen_last and not (name.startswith(last + ".") or last == ""):
                break
            owners[id(module)] = module
            if name == last:
                seen_last = True
    elsewhere = {id(p) for m in model.modules() if id(m) not in owners for p in m.parameters(recurse=False)}
    return [p for m in owners.values() for p in m.parameters(recurse=False) if id(p) not in elsewhere]


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
    for the cut when such modules exist. A parameter that a module outside the prefix also
    holds (tied weights) is left alone, so that module's use of it keeps its gradient.
    Yields the prefix as (name, module) pairs.
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


# ----------------------------------------------------------------------------- the frontier layer's frozen outputs


def frontier_cut(model: nn.Module, order: Sequence[str] | None = None) -> tuple[str, str] | None:
    """(source, consumer): the layer whose frozen output channels ``cut_frozen_outputs``
    can cut, and the layer after it that then computes its input gradient for the
    source's active channels only; None when the model has no such pair.

    The source is the first NEq-capable layer (in ``order``, else registration order)
    that is not fully frozen, when it is a conv layer with frozen neurons; the consumer is
    the next NEq-capable layer, when it is an NEqConv2d or a SparseConv2d (which cuts on
    its dense path only) with groups=1 and as many input channels as the source has
    outputs. Whether a forward is cut is decided at that
    forward, from the autograd graph (see ``cut_frozen_outputs``).
    """
    from ..nn import NEqConv2d, SparseConv2d  # noqa: PLC0415  (sparseticket.nn is optional for this package)

    if order is None:
        candidates = [(n, m) for n, m in model.named_modules() if is_neq_capable(m)]
    else:
        lookup = dict(model.named_modules())
        unknown = [n for n in order if n not in lookup]
        if unknown:
            raise ValueError(f"frontier_cut: no module named {unknown[0]!r} in the model")
        candidates = [(n, lookup[n]) for n in order]
    i = len(frozen_prefix(model, [n for n, _ in candidates]))
    if i + 1 >= len(candidates):
        return None
    (src_name, src), (dst_name, dst) = candidates[i], candidates[i + 1]
    active = getattr(src, "active", None)
    out_channels = getattr(src, "out_channels", None)
    if active is None or bool(active.all()) or out_channels is None:
        return None
    if type(dst) not in (NEqConv2d, SparseConv2d) or dst.groups != 1 or dst.in_channels != out_channels:
        return None
    return src_name, dst_name


@contextmanager
def cut_frozen_outputs(model: nn.Module, order: Sequence[str] | None = None) -> Iterator[tuple[str, str] | None]:
    """Within the block, the layer after the first partially frozen one computes its input
    gradient for that layer's active channels only (``frontier_cut`` says which pair).

    When the source layer's input needs no gradient (plain data, or the output of a
    prefix cut by ``freeze_prefix``), the gradient at its output is read by its own
    backward alone, which uses only its active channels: the frozen channels' share is
    never read. The consumer (an NEqConv2d, or a SparseConv2d on its dense path) runs its
    input gradient on its weight's columns for the active channels and writes 0 at the
    others.

    While the block is open the source records its last call (its NEq-aware op's
    autograd node and the mask that call ran with), and a consumer forward is cut only
    when its input is that call's output through channel-wise, parameter-free steps
    (ReLU and other elementwise activations, 2-D pooling, dropout, a multiply, divide, add
    or subtract by a tensor that needs no gradient) and that call's input needed no gradient. The channels skipped are the
    ones frozen in that call. Anything else on the way (a BatchNorm or PReLU with
    weights, another branch added in, an op that mixes channels, a reshape), another op
    on the source's Parameters, or a source fed a tensor that requires grad: that
    forward runs the full input gradient. Nothing is cut under activation checkpointing
    or saved-tensor hooks, in a recomputation, or under ``torch.compile``, and a backward
    with ``create_graph=True`` computes the full input gradient.

    Parameter gradients are those of the full backward, up to rounding (the input
    gradient runs on fewer channels, which can change oneDNN's summation order). What
    changes: the gradient of the activations between the two layers is 0 at the
    source's frozen channels. Nothing may rewrite it from other channels and feed it back
    (a hook normalising it, a legacy module backward hook): the forward cannot see such
    hooks, and they would change the source's gradients (docs/NEQ.md). In Conv-4 with
    half of every layer frozen this halves conv2's input gradient. Use it as
    ``freeze_prefix``, around a training epoch after the tracker set the masks::

        with freeze_prefix(model), cut_frozen_outputs(model):
            for x, y in loader: ...

    Yields the (source, consumer) names, or None when the model has no such pair (then
    nothing changes). The links live outside the modules, keyed by the live consumer and source: a
    copy of the model made inside the block is not cut. Contexts nest.
    """
    from ..nn.conv import _CUT_SOURCES, _INPUT_CUTS, _SourceRecord  # noqa: PLC0415

    pair = frontier_cut(model, order)
    if pair is None:
        yield None
        return
    modules = dict(model.named_modules())
    src, dst = modules[pair[0]], modules[pair[1]]
    _INPUT_CUTS.setdefault(dst, []).append(src)
    rec = _CUT_SOURCES.get(src)
    if rec is None:
        rec = _CUT_SOURCES[src] = _SourceRecord()
    rec.users += 1
    try:
        yield pair
    finally:
        stack = _INPUT_CUTS.get(dst)
        if stack:
            # this context's entry: the innermost one when contexts exit in order
            for k in range(len(stack) - 1, -1, -1):
                if stack[k] is src:
                    del stack[k]
                    break
        if not stack:
            _INPUT_CUTS.pop(dst, None)
            dst.__dict__.pop("last_input_cut", None)
        rec.users -= 1
        if rec.users <= 0 and _CUT_SOURCES.get(src) is rec:
            del _CUT_SOURCES[src]  # and with it the last call's node
