"""A sparse MLP's cross-entropy gradients without autograd.

For an ``nn.Sequential`` of (optional) ``nn.Flatten``, ``SparseLinear`` layers running
their sparse path and ReLUs (``nn.ReLU`` or fused), ``MLPStep(model)(x, y)`` does what

    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)      # for the model's parameters
    loss.backward()

does, with the same ops in the same order (the ticket kernels, aten's nll_loss /
log_softmax and their backward functions, threshold_backward for the ReLUs): losses and
gradients are bit-identical to the autograd path. What it leaves out is the framework
around them: module calls, autograd graph construction and the engine's per-node work,
about a third of a sparse LeNet-300-100 step at 3% density on the project's VM (see
``bench/framework_overhead.py``). The optimizer step is the caller's, unchanged.

``MLPStep.check()`` says why a model or call cannot take this path (another layer type,
a layer on its dense path or in 'auto', frozen neurons, a frozen parameter, any module,
parameter or global hook, e.g. a FlopCounter's while counting); ``__call__`` then falls
back to the autograd path itself, so callers need no second code path.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from . import _mode
from .linear import FusedReLU, SparseLinear

_ST = torch.ops.sparseticket
_ATEN = torch.ops.aten
_MEAN = 1  # at::Reduction::Mean
_IGNORE = -100  # F.cross_entropy's default ignore_index


class MLPStep:
    """``MLPStep(model)(x, y) -> loss``: the gradients of F.cross_entropy(model(x), y) in
    every parameter's ``.grad`` (replacing what was there), and the loss (detached)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers: List[Tuple[SparseLinear, bool]] = []  # (layer, apply relu after it)
        self.flatten = False
        self.reason: Optional[str] = self._plan()

    def _plan(self) -> Optional[str]:
        m = self.model
        if not (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward):
            return "not an nn.Sequential (or its forward is overridden)"
        for i, c in enumerate(m._modules.values()):
            t = type(c)
            if t is nn.Flatten and i == 0 and c.start_dim == 1 and c.end_dim == -1:
                self.flatten = True
            elif t is SparseLinear:
                self.layers.append((c, c.activation == "relu"))
            elif t is nn.ReLU and self.layers and not self.layers[-1][1]:
                self.layers[-1] = (self.layers[-1][0], True)  # the ReLU of the layer before
            elif t not in (FusedReLU, nn.Identity):
                return f"child {i} ({t.__name__}) is not Flatten/SparseLinear/ReLU/Identity in a supported place"
        if not self.layers:
            return "no SparseLinear layer"
        if len({id(layer) for layer, _ in self.layers}) != len(self.layers):
            return "a layer is used twice"
        return None

    def check(self, x: Optional[Tensor] = None) -> Optional[str]:
        """None when this call can take the fast path, else why not."""
        if self.reason is not None:
            return self.reason
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return "grad mode off or compiling"
        if torch.is_autocast_enabled():
            return "autocast is on"
        if x is not None:
            if x.requires_grad:
                return "the input requires grad"
            if not (x.dim() == 2 or (self.flatten and x.dim() > 2)):
                return "the input is not [batch, features] (or flattened to it)"
            if x.dtype != self.layers[0][0]._parameters["weight_values"].dtype:
                return "the input's dtype is not the layers'"
        if (_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks or getattr(_module, "_global_forward_hooks_always_called", None)):
            return "global module hooks are registered"
        for mod in self.model.modules():
            if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks:
                return f"{type(mod).__name__} has hooks"
        for layer, _ in self.layers:
            if _mode.resolve(layer.mode) != "sparse":
                return "a layer is not forced to its sparse path"
            if layer._buffers["active"] is not None:
                return "a layer has frozen neurons (NEq)"
            for p in layer._parameters.values():
                if p is None:
                    continue
                if not p.requires_grad:
                    return "a parameter does not require grad"
                if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
                    return "a parameter has hooks"
        return None

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.check(x) is not None or y.dtype != torch.long or y.dim() != 1:
            loss = F.cross_entropy(self.model(x), y)
            for p in self.model.parameters():
                p.grad = None
            loss.backward()
            return loss.detach()
        with torch.no_grad():
            return self._step(x, y)

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        h = x.flatten(1) if self.flatten else x
        acts = [h]
        for layer, relu in self.layers:
            b, v = layer._buffers, layer._parameters["weight_values"]
            op = _ST.sparse_linear_relu if relu else _ST.sparse_linear
            h = op(h, v, b["crow"], b["col"], b["ccol"], b["row"], b["perm"], layer._parameters["bias"], None)
            layer.__dict__["last_path"] = "sparse"
            acts.append(h)
        # F.cross_entropy and its backward, op for op as autograd runs them
        logp = torch.log_softmax(h, 1)
        loss, total_weight = _ATEN.nll_loss_forward(logp, y, None, _MEAN, _IGNORE)
        g = _ATEN.nll_loss_backward(torch.ones_like(loss), logp, y, None, _MEAN, _IGNORE, total_weight)
        g = _ATEN._log_softmax_backward_data(g, logp, 1, logp.dtype)
        for i in range(len(self.layers) - 1, -1, -1):
            layer, relu = self.layers[i]
            b, v, bias = layer._buffers, layer._parameters["weight_values"], layer._parameters["bias"]
            if relu:
                g = _ATEN.threshold_backward(g, acts[i + 1], 0)
            g = g.contiguous()
            v.grad = _ST.sddmm(g, acts[i], b["crow"], b["col"], None)
            if bias is not None:
                bias.grad = g.sum(0)
            if i > 0:
                g = _ST.spmm_t(g, v, b["ccol"], b["row"], b["perm"])
        return loss
