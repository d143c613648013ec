"""Functional forms of sparseticket's layers, differentiable through the custom ops."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops  # noqa: F401  (registers the ops)
from .ticket import Ticket


def sparse_linear(x: Tensor, ticket: Ticket, bias: Optional[Tensor] = None, active: Optional[Tensor] = None,
                  values: Optional[Tensor] = None) -> Tensor:
    """y = x Wᵀ + bias for a ticket weight W: x [..., in_features] -> [..., out_features].

    Gradients flow to ``x``, to the kept values (``values`` if given, else
    ``ticket.values``) and to ``bias``. ``active`` ([out_features] bool) marks the
    neurons whose weight/bias gradients are computed; frozen ones get zeros, never
    computed.
    """
    vals = ticket.values if values is None else values
    if x.shape[-1] != ticket.shape[1]:
        raise ValueError(f"sparseticket: x has {x.shape[-1]} features but the ticket expects in_features={ticket.shape[1]}")
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])
    y = torch.ops.sparseticket.sparse_linear(x2, vals, ticket.crow, ticket.col, ticket.ccol, ticket.row,
                                             ticket.perm, bias, active)
    return y.reshape(*lead, ticket.shape[0])


def neq_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, active: Optional[Tensor] = None) -> Tensor:
    """Dense linear whose weight gradient is computed only for ``active`` neurons."""
    lead = x.shape[:-1]
    y = torch.ops.sparseticket.neq_linear(x.reshape(lead.numel(), x.shape[-1]), weight, bias, active)
    return y.reshape(*lead, weight.shape[0])
