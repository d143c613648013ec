"""Test helpers: masks, tickets, layouts that catch stride bugs, dtype-aware comparisons."""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

import sparseticket
from sparseticket import Ticket
from sparseticket.ops import reference as ref

FLOATS = (torch.float32, torch.float64)
SPARSITIES = (0.0, 0.5, 0.9, 0.99, 1.0)
# Error allowed relative to the magnitude of the terms summed (Σ|a·b|), not to the result,
# so cancellation cannot make a correct kernel fail.
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}

ST = torch.ops.sparseticket
BACKEND = sparseticket.BACKENDS.get("cpu")
ERRORS = (RuntimeError, ValueError, TypeError)


# ----------------------------------------------------------------------------- data


def randn(*shape, dtype=torch.float32, gen: Optional[torch.Generator] = None) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)):
        shape = tuple(shape[0])
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64).to(dtype)


def make_mlp(gen: torch.Generator, sizes, bias: bool = True, flatten: bool = False, dtype=torch.float32,
             last_relu: bool = False) -> "torch.nn.Sequential":
    """nn.Sequential of (optional nn.Flatten,) nn.Linear layers of the given widths with an
    nn.ReLU after each (after the last one only with ``last_relu``), initialised from a
    seed drawn from ``gen``."""
    from torch import nn
    torch.manual_seed(int(torch.randint(0, 2 ** 31 - 1, (1,), generator=gen)))
    layers = [nn.Flatten()] if flatten else []
    for i in range(len(sizes) - 1):
        layers += [nn.Linear(sizes[i], sizes[i + 1], bias=bias, dtype=dtype), nn.ReLU()]
    return nn.Sequential(*(layers if last_relu else layers[:-1]))


def make_mask(O: int, I: int, sparsity: float, gen: torch.Generator, holes: bool = False) -> Tensor:
    """[O, I] bool keep-mask with exactly round((1 - sparsity)·O·I) True entries.

    ``holes=True`` additionally empties about a third of the rows and of the columns
    (at least one of each), so kernels meet rows and columns with no kept weight.
    """
    n = O * I
    keep = n - int(round(sparsity * n))
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=gen)[:keep]] = True
    mask = flat.view(O, I).clone()
    if holes:
        mask[torch.randperm(O, generator=gen)[: max(1, O // 3)]] = False
        mask[:, torch.randperm(I, generator=gen)[: max(1, I // 3)]] = False
    return mask


def make_active(O: int, gen: torch.Generator, kind: str = "random") -> Tensor:
    """[O] bool active (not frozen) mask: 'random' (about half), 'all', 'none'."""
    if kind == "all":
        return torch.ones(O, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(O, dtype=torch.bool)
    return torch.rand(O, generator=gen) < 0.5


def make_ticket(weight: Tensor, mask: Tensor) -> Ticket:
    """The public way to build a ticket (goes through the backend's dense_to_ticket)."""
    return Ticket.from_dense(weight, mask)


def ref_ticket(weight: Tensor, mask: Tensor) -> Ticket:
    """The same ticket built only by the references, so a test of one op does not fail
    because another op (dense_to_ticket, ticket_transpose) is broken."""
    values, crow, col = ref.reference_dense_to_ticket(weight, mask)
    ccol, row, perm = ref.reference_ticket_transpose(crow, col, weight.shape[1])
    return Ticket(values, crow, col, ccol, row, perm, tuple(weight.shape))


def make_case(B: int, I: int, O: int, sparsity: float, holes: bool, dtype, gen: torch.Generator) -> dict:
    """An op test's operands: x [B, I], gy [B, O], a weight w [O, I] with its keep-mask and
    reference ticket t, and a bias [O]."""
    w = randn(O, I, dtype=dtype, gen=gen)
    mask = make_mask(O, I, sparsity, gen, holes=holes)
    return dict(x=randn(B, I, dtype=dtype, gen=gen), gy=randn(B, O, dtype=dtype, gen=gen), w=w, mask=mask,
                t=ref_ticket(w, mask), bias=randn(O, dtype=dtype, gen=gen))


# ----------------------------------------------------------------------------- layouts

LAYOUTS = ("contiguous", "transposed", "strided", "expanded")


def pruned_and_empty_params(seed: int):
    """The optimizer ops' edge case: keep masks for a 4x3 weight with nothing kept (100%
    sparsity), a zero-size parameter and a partly kept vector, and ``draw(dtype, fn)``, a list
    of fn-random tensors of those three shapes (parameters, gradients, optimizer state)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (0, 5), (6,)]
    keeps = [torch.zeros(4, 3, dtype=torch.bool), None, torch.rand(6, generator=g) > 0.5]

    def draw(dtype, fn=torch.randn):
        return [fn(s, generator=g, dtype=dtype) for s in shapes]
    return keeps, draw


def strided(t: Tensor) -> Tensor:
    """Same values as ``t``, as a view stepping by 2 in every dim of a bigger buffer.

    The gaps hold poison: NaN for floats, the negated mask for bools, and for index
    tensors a duplicate of the neighbouring entry (still in range and monotone, so a
    kernel that ignores strides computes a wrong answer instead of crashing).
    """
    buf = t
    for d in range(t.dim()):
        buf = buf.repeat_interleave(2, dim=d)
    buf = buf.clone()
    if t.is_floating_point():
        buf.fill_(float("nan"))
    elif t.dtype == torch.bool:
        buf = ~buf
    view = buf[tuple(slice(None, None, 2) for _ in range(t.dim()))]
    view.copy_(t)
    assert t.numel() <= 1 or not view.is_contiguous()
    return view


def transposed(t: Tensor) -> Tensor:
    """2-D: same values, column-major strides (a transposed view). 1-D: unchanged."""
    if t.dim() != 2:
        return t
    return t.t().contiguous().t()


def expanded(t: Tensor) -> Tensor:
    """Stride-0 view: the first row (2-D) or first element (1-D) broadcast to t's shape.

    Changes the values, so apply it before computing both the op and the reference.
    """
    if t.numel() == 0:
        return t
    return t[:1].expand_as(t) if t.dim() >= 1 else t


def lay(t: Optional[Tensor], layout: str, dense_only: bool = False) -> Optional[Tensor]:
    """Apply ``layout`` to an input. ``expanded`` applies only to dense float operands."""
    if t is None or layout == "contiguous":
        return t
    if layout == "transposed":
        return transposed(t)
    if layout == "strided":
        return strided(t)
    if layout == "expanded":
        return expanded(t) if (dense_only and t.is_floating_point()) else t
    raise ValueError(layout)


# ----------------------------------------------------------------------------- comparisons


def assert_close(actual: Tensor, expected: Tensor, magnitude=None, tol: Optional[float] = None, what: str = ""):
    """``actual`` ≈ ``expected`` within TOL[dtype] relative to ``magnitude``.

    ``magnitude`` is the size of the terms that were summed (e.g. |x| @ |W|ᵀ); its max
    scales the absolute tolerance, so an error is judged against the work done. A result
    whose terms are all exactly zero must come out exactly zero.
    """
    assert isinstance(actual, Tensor), f"{what}: expected a tensor, got {type(actual)}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    tol = TOL[expected.dtype] if tol is None else tol
    if magnitude is None:
        magnitude = expected.abs()
    m = float(magnitude.detach().max()) if magnitude.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * m, equal_nan=False,
                               msg=lambda s: f"{what}: {s} (magnitude {m:.3g}, tol {tol})")


def bits(t: Tensor) -> Tensor:
    """The raw bits of a float tensor, so NaN == NaN and -0.0 != 0.0 in comparisons."""
    return t.contiguous().view({torch.float32: torch.int32, torch.float64: torch.int64}[t.dtype])


def assert_bits_equal(actual: Tensor, expected: Tensor, what: str = ""):
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.equal(bits(actual), bits(expected)), f"{what}: not bit-identical\n{actual}\nvs\n{expected}"


def masked_dense_grads(x: Tensor, weight: Tensor, mask: Tensor, bias: Optional[Tensor], gy: Tensor
                       ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Gradients of <gy, x (W·mask)ᵀ + b> from a plain dense layer and autograd.

    Returns (grad x [B, I], grad W [O, I] (zero where pruned), grad bias [O] or None).
    """
    x = x.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = torch.nn.functional.linear(x, w * mask.to(w.dtype), b)
    (y * gy).sum().backward()
    return x.grad, w.grad * mask.to(w.dtype), None if b is None else b.grad


# ----------------------------------------------------------------------------- other ISAs


def run_under_isa(code: str, isa: str, timeout: int = 300) -> None:
    """Run ``python -c code`` in a subprocess with the kernel table for ``isa`` (SPARSETICKET_ISA,
    read once per process), argv[1] = this directory (importable), argv[2] = isa; it must
    exit 0 and print "ok". Skips without compiled kernels or on a CPU without AVX2."""
    import pytest
    from sparseticket.ops import _C
    if _C is None:
        pytest.skip("compiled kernels not built")
    if isa == "avx2" and _C.cpu_isa() == "base":
        pytest.skip("CPU without AVX2")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, SPARSETICKET_ISA=isa, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", code, here, isa], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
