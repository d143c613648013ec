"""The two NEq rules as pure functions on tensors (the tracker only gathers outputs).

Shapes: O neurons, N validation samples, P positions per sample (conv: spatial positions
of a channel; 1 for a linear layer's [N, O] output). "hat" tensors are normalised along
the dimension the rule takes the cosine over; a zero vector stays all zeros.

Zero-vector conventions (both rules): cos(0, 0) = 1 and cos(0, y) = 0 for y != 0, as in
the authors' code, so a neuron silent in two epochs counts as unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def normalise(x: Tensor, dim: int) -> Tensor:
    """x / ||x|| along ``dim`` (float32); all-zero vectors stay zero."""
    x = x.float()
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return torch.where(norm > 0, x / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(x))


def is_zero(x_hat: Tensor, dim: int) -> Tensor:
    return x_hat.abs().sum(dim=dim) == 0


def cosine(a_hat: Tensor, b_hat: Tensor, dim: int) -> Tensor:
    """Cosine of two normalised tensors along ``dim`` with the zero-vector conventions."""
    dot = (a_hat.float() * b_hat.float()).sum(dim=dim)
    za, zb = is_zero(a_hat, dim), is_zero(b_hat, dim)
    one, zero = torch.ones_like(dot), torch.zeros_like(dot)
    return torch.where(za & zb, one, torch.where(za | zb, zero, dot))


# ----------------------------------------------------------------------------- paper


def paper_vectors(cur: Tensor) -> Tensor:
    """Gathered outputs -> [O, D] neuron vectors over the whole validation set.

    cur: [N, O] (linear) or [N, O, P] (channel O over P positions); D = N or N·P.
    """
    if cur.dim() == 2:
        return cur.t()
    return cur.permute(1, 0, 2).reshape(cur.shape[1], -1)


def paper_phi(cur_hat: Tensor, prev_hat: Tensor) -> Tensor:
    """φᵢ = Σ_ξ Σ_n ŷᵢᵗ · ŷᵢᵗ⁻¹: cosine of each neuron's [D] vector between two epochs -> [O]."""
    return cosine(cur_hat, prev_hat, dim=1)


def paper_step(phi: Tensor, phi_prev: Tensor | None, v_prev: Tensor | None, mu_eq: float,
               eps: float) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Δφᵗ = φᵗ − φᵗ⁻¹; vᵗ = Δφᵗ − μ_eq·vᵗ⁻¹ (vᵗ⁻¹ = 0 before the first Δφ); frozen: |vᵗ| < ε.

    Returns (Δφ, v, frozen), all None while φᵗ⁻¹ is not yet defined (warm-up).
    """
    if phi_prev is None:
        return None, None, None
    dphi = phi.double() - phi_prev.double()
    v = dphi if v_prev is None else dphi - mu_eq * v_prev.double()
    return dphi, v, v.abs() < eps


# ----------------------------------------------------------------------------- code


def code_normalise(cur: Tensor, groups: Sequence[int]) -> Tensor:
    """Normalise as the code's cosine does.

    cur [N, O] (linear): each neuron's outputs over the samples of one validation batch
    (``groups`` are the batch sizes), so the vector spans the batch. cur [N, O, P]: each
    sample's P positions of a channel.
    """
    if cur.dim() == 3:
        return normalise(cur, dim=2)
    return torch.cat([normalise(c, dim=0) for c in torch.split(cur, list(groups), dim=0)], dim=0)


def code_delta(cur_hat: Tensor, prev_hat: Tensor, groups: Sequence[int]) -> Tensor:
    """Δᵢ = Σ (1 − cos) / N: 1 − cosine, summed over the cosines taken, divided by N -> [O].

    Linear ([N, O]): one cosine per validation batch (across that batch's samples), so
    Δ = Σ_batches (1 − cos_b) / N and depends on the validation batch size.
    Conv ([N, O, P]): one cosine per sample (over its positions), so Δ is the mean over
    samples of 1 − cos.
    """
    n = cur_hat.shape[0]
    if cur_hat.dim() == 3:
        return (1 - cosine(cur_hat, prev_hat, dim=2).double()).sum(0) / n
    total = torch.zeros(cur_hat.shape[1], dtype=torch.float64, device=cur_hat.device)
    for c, p in zip(torch.split(cur_hat, list(groups), dim=0), torch.split(prev_hat, list(groups), dim=0)):
        total += 1 - cosine(c, p, dim=0).double()
    return total / n


def code_step(delta: Tensor, s_prev: Tensor, mu: float, eps: float, freeze: bool = True
              ) -> tuple[Tensor, Tensor, Tensor]:
    """mₜ = sₜ₋₁ − Δₜ; frozen: |mₜ| <= ε; sₜ = μ·sₜ₋₁ + (1 − μ)·Δₜ, reset to 0 where frozen.

    s₀ = 0, so the code rule can freeze after the first epoch. ``freeze=False`` (warm-up)
    freezes nothing and so resets nothing. Returns (m, s, frozen).
    """
    delta = delta.double()
    s_prev = s_prev.double()
    m = s_prev - delta
    frozen = (m.abs() <= eps) if freeze else torch.zeros_like(m, dtype=torch.bool)
    s = mu * s_prev + (1 - mu) * delta
    s = torch.where(frozen, torch.zeros_like(s), s)
    return m, s, frozen


def split_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - i) for i in range(0, n, batch_size)]
