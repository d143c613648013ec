"""A (sparse) MLP's cross-entropy gradients without autograd.

For an ``nn.Sequential`` of (optional) ``nn.Flatten``, linear layers (``SparseLinear``
on its sparse or its dense path, plain ``nn.Linear``, a ``DenseNEqLinear`` with no frozen
neuron) and ReLUs (``nn.ReLU`` or fused),
``MLPStep(model)(x, y)`` does what

    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)      # for the model's parameters
    loss.backward()

does, with the same ops in the same order (the ticket kernels; for a dense weight, the
matrix products autograd's addmm backward runs, and the bitmap expand/compress of a
SparseLinear's dense path; aten's nll_loss / log_softmax and their backward functions,
threshold_backward for the ReLUs): losses and gradients are bit-identical to the
autograd path. An IMP level mixing sparse and dense layers (a ticket at 80% keeps its
big layers dense) takes this path as well as one whose layers are all sparse. What it leaves out is the framework
around them: module calls, autograd graph construction and the engine's per-node work,
about a third of a sparse LeNet-300-100 step at 3% density on the project's VM (see
``bench/framework_overhead.py``). The optimizer step is the caller's, unchanged, or
``MLPStep.step(x, y, optimizer)``'s: with a MaskedSGD whose step would repeat the
previous one (same parameters, masks and state objects), each big layer's update runs
inside the same C++ call right after the backward is done with that layer, while its
weight and gradient are still in cache (bit-identical to the step after the whole
backward; ~30 us of a dense LeNet-300-100 step on the project's VM, where the update
otherwise re-reads every weight and gradient after the backward evicted them).
``with fast.fixed(optimizer) as step:`` runs those steps with the model's and the
optimizer's checks made once for the block instead of at every call (~35 us a step).

The same plan serves the chain node that ``sparsify(..., fuse_relu=True)`` and
``enable_neq`` install (``ChainForward``, ``MLPStep.chain``): the MLP's forward as one
autograd node whose backward runs these ops, for training loops that keep autograd
(bit-identical to the modules' forward). The chain also serves a DenseNEqLinear with
frozen neurons, with its own node's ops (``neq_linear``, ``row_masked_grad_weight``,
``masked_bias_grad``); this step leaves frozen neurons to autograd (and so to the chain).

``MLPStep.check()`` says why a model or call cannot take this path (another layer type,
a SparseLinear whose path is not pinned ('auto'), frozen neurons, a frozen or
non-contiguous parameter, a parameter shared by two layers, any module, parameter or
global hook, e.g. a FlopCounter's while counting, autocast, children replaced or a fused
activation changed since the MLPStep was built); ``__call__`` then falls back to the autograd path itself, so callers need no
second code path.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Callable, Iterator, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C import _functorch
from torch.nn.modules import module as _module

from .. import ops as _ops
from . import _mode, _registry
from .linear import DenseNEqLinear, FusedReLU, SparseLinear

_ST = torch.ops.sparseticket
_ATEN = torch.ops.aten
_MEAN = 1  # at::Reduction::Mean
_IGNORE = -100  # F.cross_entropy's default ignore_index
_SPARSE, _EXPAND, _VIEW, _PLAIN, _NEQ = 0, 1, 2, 3, 4  # layer kinds of the compiled mlp_grads (csrc/mlp_step.cpp)
# whether the loaded build knows the kNeq kind (a build older than the package does not:
# the chain then leaves frozen NEq layers to the modules)
_BUILD_HAS_NEQ = getattr(_ops._C, "MLP_KINDS", 0) > _NEQ


class MLPStep:
    """``MLPStep(model)(x, y) -> loss``: the gradients of F.cross_entropy(model(x), y) in
    every parameter's ``.grad`` (replacing what was there), and the loss (detached).

    On the CPU with the compiled extension, the op sequence runs as one C++ call
    (``native=True``, the default; csrc/mlp_step.cpp), sparing ~25 Python op calls per
    step; ``native=False`` runs the same sequence from Python (also the path elsewhere)."""

    def __init__(self, model: nn.Module, *, native: bool = True):
        self.model = model
        self.native = native
        # (SparseLinear, nn.Linear or DenseNEqLinear, apply relu after it)
        self.layers: List[Tuple[nn.Module, bool]] = []
        self.flatten = False
        self._calls = 0  # calls of __call__ / step (a `fixed` block re-checks after one)
        self._chain_call: Optional[_ChainCall] = None  # chain's arguments, prepared by its last full check
        self.reason: Optional[str] = self._plan()

    def _plan(self) -> Optional[str]:
        m = self.model
        # the modules the plan rests on (a model whose children change needs a new MLPStep);
        # walking this list costs a fraction of model.modules()' generator per step
        self._modules_seen = [m, *m._modules.values()]
        self._types = [type(c) for c in self._modules_seen]  # (parametrizing a layer changes its class)
        first = self._modules_seen[1] if len(self._modules_seen) > 1 else None
        self._flat0 = (first.start_dim, first.end_dim) if type(first) is nn.Flatten else None
        if not (isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward):
            return "not an nn.Sequential (or its forward is overridden)"
        for i, c in enumerate(m._modules.values()):
            t = type(c)
            if t is nn.Flatten and i == 0 and c.start_dim == 1 and c.end_dim == -1:
                self.flatten = True
            elif t is SparseLinear or t is nn.Linear or t is DenseNEqLinear:
                self.layers.append((c, getattr(c, "activation", None) == "relu"))
            elif t is nn.ReLU and self.layers and not self.layers[-1][1]:
                self.layers[-1] = (self.layers[-1][0], True)  # the ReLU of the layer before
            elif t not in (FusedReLU, nn.Identity):
                return f"child {i} ({t.__name__}) is not Flatten/SparseLinear/ReLU/Identity in a supported place"
        if not self.layers:
            return "no linear layer"
        if any(a.out_features != b.in_features for (a, _), (b, _) in zip(self.layers, self.layers[1:])):
            return "a layer's in_features is not the previous layer's out_features"
        if len({id(layer) for layer, _ in self.layers}) != len(self.layers):
            return "a layer is used twice"
        params = [p for layer, _ in self.layers for p in layer._parameters.values() if p is not None]
        if len({id(p) for p in params}) != len(params):  # its gradient would be one layer's, not the sum
            return "layers share a parameter (tied weights)"
        self._activations = [getattr(layer, "activation", None) for layer, _ in self.layers]
        return None

    def check(self, x: Optional[Tensor] = None) -> Optional[str]:
        """None when this call can take the fast path, else why not."""
        if self.reason is not None:
            return self.reason
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return "grad mode off or compiling"
        if torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"):
            return "autocast is on"
        seen = self._modules_seen
        children = self.model._modules
        if len(children) != len(seen) - 1 or any(a is not b for a, b in zip(children.values(), seen[1:])):
            return "the model's children changed since this MLPStep was built (build a new one)"
        if x is not None:
            if x.requires_grad:
                return "the input requires grad"
            if not (x.dim() == 2 or (self.flatten and x.dim() > 2)):
                return "the input is not [batch, features] (or flattened to it)"
            if x.dtype != _weight(self.layers[0][0]).dtype:
                return "the input's dtype is not the layers'"
        if _global_module_hooks():
            return "global module hooks are registered"
        for mod in self._modules_seen:
            if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks:
                return f"{type(mod).__name__} has hooks"
        for (layer, _), act in zip(self.layers, self._activations):
            if getattr(layer, "activation", None) != act:
                return "a layer's fused activation changed since this MLPStep was built (build a new one)"
            if type(layer) is SparseLinear and _mode.resolve(layer.mode) not in ("sparse", "dense"):
                return "a SparseLinear's path is not pinned (mode 'auto')"
            if type(layer) is not nn.Linear and layer._buffers["active"] is not None:
                # (the step's own sequence computes whole gradients; the chain serves them)
                return "a layer has frozen neurons (NEq)"
            for p in layer._parameters.values():
                if p is None:
                    continue
                if not p.requires_grad:
                    return "a parameter does not require grad"
                if not p.is_contiguous():  # autograd's gradient would keep its strides
                    return "a parameter is not contiguous"
                if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
                    return "a parameter has hooks"
        return None

    def chain(self, x: Tensor) -> Union[Tensor, None, object]:
        """``self.model(x)`` as one autograd node (the compiled ``mlp_chain``: the layers'
        forward ops, and in its backward the ops their nodes' backward would run, in the
        same order: output and gradients bit-identical to the module-by-module forward),
        or None when this call must go through the modules: grad mode off, not a plain CPU
        tensor, compiling, tracing, functorch transforms (vmap, torch.func), forward-mode
        AD, a __torch_function__ mode or autocast, hooks on a child module (or global
        module hooks), a SparseLinear whose path for this input is not known yet ('auto'
        measures on its first call), a SparseLinear with frozen neurons, a DenseNEqLinear
        with frozen neurons in another dtype than float32/64, a parameter that does not require
        grad, a non-contiguous parameter, parameters tied since the plan was built, dtypes
        or widths the layers would refuse (their error then says so). A backward with
        create_graph runs the layers again, recorded, and differentiates them (second
        derivatives as the modules give them). ``STALE`` when the model's children (or
        their classes, the Flatten's dims, a fused activation) changed since this MLPStep
        was planned: build a new one. The module, hook and global checks run at every
        call; the per-layer checks and argument lists are built once and reused while the
        input's shape/dtype, the thread count, the mode and mask versions and every
        layer's parameter and buffer objects stay the same (``_ChainCall``)."""
        seen, types, children = self._modules_seen, self._types, self.model._modules
        if len(children) != len(seen) - 1:
            return STALE
        i = 0
        hooked = False
        for mod in children.values():
            i += 1
            if mod is not seen[i] or type(mod) is not types[i]:
                return STALE
            if mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks:
                hooked = True
        if self._flat0 is not None and (seen[1].start_dim, seen[1].end_dim) != self._flat0:
            return STALE
        if (hooked or self.reason is not None or type(x) is not Tensor or x.device.type != "cpu" or _ops._C is None
                or not torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
                or torch._C._get_tracing_state() is not None or torch._C._is_torch_function_mode_enabled()
                or _functorch.peek_interpreter_stack() is not None or _forward_ad._current_level >= 0):
            return None
        if _global_module_hooks():
            return None
        xin = x.flatten(1) if self.flatten else x
        if xin.dim() != 2:
            return None
        dtype = xin.dtype
        key = (xin.shape, dtype, xin.requires_grad, torch.get_num_threads(), _mode.VERSION[0], _mode._GLOBAL_MODE,
               _registry.VERSION[0])
        call = self._chain_call
        if call is not None:
            if call.key == key and _still(call, dtype):
                for layer, path in call.paths:
                    layer.__dict__["last_path"] = path  # (what _known_path records; FLOP accounting reads it)
                return _ops._C.mlp_chain(xin, call.params, call.tensors, call.spec)
            self._chain_call = None  # (stale: it would keep replaced parameters and buffers alive)
        batch, rg = xin.shape[0], xin.requires_grad
        tensors: list = []
        spec: List[int] = []
        params: List[Tensor] = []
        paths: List[Tuple[nn.Module, str]] = []
        for (layer, relu), act in zip(self.layers, self._activations):
            path = None
            if type(layer) is SparseLinear:
                if layer.activation != act:
                    return STALE
                if layer._buffers["active"] is not None:
                    return None
                path = layer._known_path(torch.Size((batch, layer.in_features)), dtype, rg)
                if path is None:
                    return None
                paths.append((layer, path))
            elif type(layer) is DenseNEqLinear and layer._buffers["active"] is not None:
                if dtype not in (torch.float32, torch.float64):
                    return None  # (the layer's reduced-precision path)
                if not _BUILD_HAS_NEQ:
                    return None
            kind, slots = _layer_slots(layer, path)
            w, bias = slots[0], slots[1]
            tensors += slots
            if not _chainable(w, dtype):
                return None
            params.append(w)
            if bias is not None:
                if not _chainable(bias, dtype):
                    return None
                params.append(bias)
            spec += (kind, int(relu), layer.out_features, layer.in_features)
            rg = True
        if xin.shape[1] != self.layers[0][0].in_features or len({id(p) for p in params}) != len(params):
            return None  # (the layer's error; parameters tied since the plan was built)
        self._chain_call = _ChainCall(key, [(layer, _watched(layer)) for layer, _ in self.layers], params, tensors,
                                      spec, paths)
        return _ops._C.mlp_chain(xin, params, tensors, spec)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        self._calls += 1
        if self.check(x) is not None or y.dtype != torch.long or y.dim() != 1:
            loss = F.cross_entropy(self.model(x), y)
            for p in self.model.parameters():
                p.grad = None
            if loss.requires_grad:  # (no parameter requiring grad: no gradient to compute)
                loss.backward()
            return loss.detach()
        with torch.no_grad():
            return self._step(x, y)

    def step(self, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> Tensor:
        """``loss = self(x, y); optimizer.step()``, returning the loss. With the native path
        and an optimizer that can hand its update over (``MaskedSGD``, when its step would
        repeat the previous one: see ``MaskedSGD._fused_plan``), each layer's update runs
        in the gradient call right after that layer's backward; the parameters, gradients,
        momentum buffers and loss are bit-identical to the two calls."""
        self._calls += 1
        plan = self._fused_plan(x, optimizer) if y.dtype == torch.long and y.dim() == 1 else None
        if plan is None:
            loss = self(x, y)
            optimizer.step()
            return loss
        with torch.no_grad():
            loss = self._step_native(x, y, plan)
        optimizer._optimizer_step_code()  # what the step's wrapper calls after the update (lean_step)
        return loss

    def _step(self, x: Tensor, y: Tensor) -> Tensor:
        if self.native and _ops._C is not None and x.device.type == "cpu":
            return self._step_native(x, y)
        h = x.flatten(1) if self.flatten else x
        acts = [h]
        dense_w: List[Optional[Tensor]] = []  # per layer: the dense weight its forward used, or None (sparse)
        for layer, relu in self.layers:
            bias = layer._parameters["bias"]
            if type(layer) is SparseLinear and _mode.resolve(layer.mode) == "sparse":
                b, v = layer._buffers, layer._parameters["weight_values"]
                op = _ST.sparse_linear_relu if relu else _ST.sparse_linear
                h = op(h, v, b["crow"], b["col"], b["ccol"], b["row"], b["perm"], bias, None)
                layer.__dict__["last_path"] = "sparse"
                w = None
            else:  # what SparseLinear._run_dense / nn.Linear (+ nn.ReLU) run
                w = _dense_weight(layer)
                h = F.linear(h, w, bias)
                if relu:
                    h = torch.relu(h)
                if type(layer) is SparseLinear:
                    layer.__dict__["last_path"] = "dense"
            dense_w.append(w)
            acts.append(h)
        # F.cross_entropy and its backward, op for op as autograd runs them
        logp = torch.log_softmax(h, 1)
        loss, total_weight = _ATEN.nll_loss_forward(logp, y, None, _MEAN, _IGNORE)
        g = _ATEN.nll_loss_backward(torch.ones_like(loss), logp, y, None, _MEAN, _IGNORE, total_weight)
        g = _ATEN._log_softmax_backward_data(g, logp, 1, logp.dtype)
        for i in range(len(self.layers) - 1, -1, -1):
            layer, relu = self.layers[i]
            bias, w = layer._parameters["bias"], dense_w[i]
            if w is None:  # what autograd's sparse_linear(_relu) backward calls
                b, v = layer._buffers, layer._parameters["weight_values"]
                g, v.grad, gb = _ST.sparse_linear_backward(g.contiguous(), acts[i + 1] if relu else None, acts[i], v,
                                                           b["crow"], b["col"], b["ccol"], b["row"], b["perm"], None,
                                                           i > 0)
                if bias is not None:
                    bias.grad = gb
                continue
            if relu:
                g = _ATEN.threshold_backward(g, acts[i + 1], 0)
            g = g.contiguous()
            # addmm(bias, h, w.t())'s backward: w.t() is column-major, so autograd forms
            # the weight gradient as (gᵀ h)ᵀ, which its transpose turns back into gᵀ h
            gw = g.t().mm(acts[i])
            if type(layer) is SparseLinear:
                v = layer._parameters["weight_values"]
                b = layer._buffers
                v.grad = (gw.view(-1) if v.shape[0] == gw.numel()
                          else _ST.ticket_compress(gw, b["crow"], b["bits"], v.shape[0]))
            else:
                layer._parameters["weight"].grad = gw
            if bias is not None:
                bias.grad = g.sum(0)
            if i > 0:
                g = g.mm(w)
        return loss


    def _native_args(self) -> Tuple[list, List[int], list]:
        """mlp_grads' layer tensors and spec, and the (parameter, output index) pairs whose
        ``.grad`` its outputs become; records each SparseLinear's path in ``last_path``."""
        tensors: list = []
        spec: List[int] = []
        grads: list = []
        for i, (layer, relu) in enumerate(self.layers):
            p = layer._parameters
            path = None
            if type(layer) is SparseLinear:
                path = "sparse" if _mode.resolve(layer.mode) == "sparse" else "dense"
                layer.__dict__["last_path"] = path
            kind, slots = _layer_slots(layer, path)
            tensors += slots
            spec += (kind, int(relu), layer.out_features, layer.in_features)
            grads.append((_weight(layer), 1 + 2 * i))
            if p["bias"] is not None:
                grads.append((p["bias"], 2 + 2 * i))
        return tensors, spec, grads

    def _step_native(self, x: Tensor, y: Tensor, plan: Optional[tuple] = None) -> Tensor:
        tensors, spec, grads = self._native_args()
        xin = x.flatten(1) if self.flatten else x
        out = _ops._C.mlp_grads(xin, y, tensors, spec) if plan is None else _ops._C.mlp_grads(xin, y, tensors, spec,
                                                                                               *plan)
        for param, k in grads:
            param.grad = out[k]
        return out[0]

    @contextlib.contextmanager
    def fixed(self, optimizer: torch.optim.Optimizer) -> Iterator[Callable[[Tensor, Tensor], Tensor]]:
        """A block over which the caller keeps the model as it is: no new masks, modes,
        modules, parameters or hooks of any kind, no FlopCounter counting, no autocast.
        Yields ``step(x, y) -> loss``, which does what ``self.step(x, y, optimizer)`` does,
        with the same results, but runs ``check()`` and the optimizer's repeat test once,
        at the end of the first call (which builds the optimizer's state if it has none),
        instead of at every call: ~35 us of Python out of a ~180 us LeNet-300-100 step at
        3.6% kept on the project's VM. Per call it still checks what a batch can change
        (dtype, rank, device, grad mode) and, for a MaskedSGD, what the optimizer's own
        step would notice cheaply (``MaskedSGD._fused_guard``: its settings, a new mask
        anywhere, step hooks, the profiler); any other call of this MLPStep in the block
        makes the next ``step`` check everything again. The IMP runner uses one block per
        epoch.
        """
        held: dict = {"call": None, "calls": -1, "misses": 0}
        guard = getattr(optimizer, "_fused_guard", None)

        def step(x: Tensor, y: Tensor) -> Tensor:
            call: Optional[_Prepared] = held["call"]
            if (call is None or held["calls"] != self._calls or not torch.is_grad_enabled() or x.requires_grad
                    or x.dtype != call.dtype or x.dim() != call.dim or x.device.type != "cpu"
                    or y.dtype != torch.long or y.dim() != 1 or guard() != call.guard):
                if held["calls"] != self._calls:  # another call of this MLPStep since: try again
                    held["misses"] = 0
                loss = self.step(x, y, optimizer)
                # prepare (check) after the first step and after a miss, not forever: a
                # model that cannot take the fused path would pay check() twice a step
                held["call"] = self._fixed_call(x, optimizer) if held["misses"] < 2 else None
                held["misses"] = 0 if held["call"] is not None else held["misses"] + 1
                held["calls"] = self._calls
                return loss
            with torch.no_grad():
                out = _ops._C.mlp_grads(x.flatten(1) if self.flatten else x, y, call.tensors, call.spec, *call.plan)
            for param, k in call.grads:
                param.grad = out[k]
            optimizer._optimizer_step_code()
            return out[0]

        yield step

    def _fused_plan(self, x: Tensor, optimizer) -> Optional[tuple]:
        """The optimizer's update plan for mlp_grads (``MaskedSGD._fused_plan``), or None
        when this call or the optimizer cannot fuse it."""
        fused_plan = getattr(optimizer, "_fused_plan", None)
        if (fused_plan is None or not self.native or _ops._C is None or x.device.type != "cpu"
                or self.check(x) is not None):
            return None
        return fused_plan([(layer._parameters[_weight_name(layer)], layer._parameters["bias"])
                           for layer, _ in self.layers])

    def _fixed_call(self, x: Tensor, optimizer) -> Optional["_Prepared"]:
        """What ``fixed``'s step reuses: None unless ``step`` would fuse now."""
        guard = getattr(optimizer, "_fused_guard", None)
        plan = self._fused_plan(x, optimizer) if guard is not None else None
        if plan is None:
            return None
        tensors, spec, grads = self._native_args()
        return _Prepared(x.dtype, x.dim(), tensors, spec, plan, grads, guard())


class _Prepared(NamedTuple):
    """A ``fixed`` block's prepared mlp_grads call, and what it was prepared for."""
    dtype: torch.dtype  # the batch's
    dim: int
    tensors: list  # mlp_grads' layer tensors, spec and SGD plan (MLPStep._native_args, _fused_plan)
    spec: List[int]
    plan: tuple
    grads: list  # (parameter, output index) pairs
    guard: tuple  # the optimizer's _fused_guard() then


class _ChainCall(NamedTuple):
    """``MLPStep.chain``'s mlp_chain arguments as its last full check built them, and what
    they rest on: a later call with the same ``key`` whose layers still hold the same
    ``watched`` objects (``_still``) passes that check again and gets the same arguments,
    so it skips rebuilding them (~11 us of a ~200 us LeNet-300-100 forward at 98% pruned
    on the Zen 1 VM of session 26)."""
    key: tuple  # input shape, dtype, requires_grad; threads, mode versions, mask registry version
    watched: list  # (layer, _watched(layer)) per layer
    params: List[Tensor]
    tensors: list
    spec: List[int]
    paths: List[Tuple[nn.Module, str]]  # (SparseLinear, the path _known_path gave)


def _watched(layer: nn.Module) -> tuple:
    """Everything of a layer that the chain's arguments and its path depend on: its
    parameter and buffer objects (a replaced mask, ticket or NEq active set is a new
    buffer), and a SparseLinear's mode, fused activation, ticket token and memo of
    measured paths (a new ticket, mode or measurement replaces one of these objects)."""
    d = layer.__dict__
    return (*layer._parameters.values(), *layer._buffers.values(), d.get("mode"), d.get("activation"),
            d.get("_st_token"), d.get("_fast_choice"))


def _still(call: _ChainCall, dtype: torch.dtype) -> bool:
    """Whether ``call`` is what the full check would build now (its key already matched):
    the same objects in every layer, and parameters still of the input's dtype, contiguous
    and requiring grad (``.data =`` and ``requires_grad_`` change those in place)."""
    for layer, seen in call.watched:
        now = _watched(layer)
        if len(now) != len(seen) or not all(map(operator.is_, now, seen)):
            return False
    for p in call.params:
        if not _chainable(p, dtype):
            return False
    return True


def _chainable(p: Tensor, dtype: torch.dtype) -> bool:
    """Whether the chain can take parameter ``p`` for an input of ``dtype`` (the full
    check and ``_still`` ask the same): it requires grad, is contiguous (autograd's
    gradient would keep its strides) and has the input's dtype."""
    return p.requires_grad and p.is_contiguous() and p.dtype == dtype


def _layer_slots(layer: nn.Module, path: Optional[str]) -> Tuple[int, tuple]:
    """A layer's kind and its kSlots tensors as csrc/mlp_step.cpp takes them: a
    SparseLinear on ``path`` ('sparse' / 'dense'), or (path None) a DenseNEqLinear with
    frozen neurons (its active mask in the third slot), or a plain nn.Linear (or a
    DenseNEqLinear with none frozen, which runs as one)."""
    p = layer._parameters
    if type(layer) is not SparseLinear:
        active = layer._buffers["active"] if type(layer) is DenseNEqLinear else None
        if active is not None:
            return _NEQ, (p["weight"], p["bias"], active, None, None, None, None, None)
        return _PLAIN, (p["weight"], p["bias"], None, None, None, None, None, None)
    b, v = layer._buffers, p["weight_values"]
    kind = (_SPARSE if path == "sparse"
            else _VIEW if v.shape[0] == layer.out_features * layer.in_features else _EXPAND)
    return kind, (v, p["bias"], b["crow"], b["col"], b["ccol"], b["row"], b["perm"], b["bits"])


def _global_module_hooks() -> bool:
    """Whether any global module hook is registered (the modules' own path runs them)."""
    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks or _module._global_backward_hooks
                or _module._global_backward_pre_hooks
                or getattr(_module, "_global_forward_hooks_always_called", None))


def _weight_name(layer: nn.Module) -> str:
    return "weight_values" if type(layer) is SparseLinear else "weight"


def _weight(layer: nn.Module) -> Tensor:
    return layer._parameters[_weight_name(layer)]


def _dense_weight(layer: nn.Module) -> Tensor:
    """The [out, in] weight a dense-path layer multiplies by (SparseLinear: as its _run_dense forms it)."""
    if type(layer) is not SparseLinear:
        return layer._parameters["weight"]
    v, b = layer._parameters["weight_values"], layer._buffers
    if v.shape[0] == layer.out_features * layer.in_features:
        return v.view(layer.out_features, layer.in_features)
    return _ST.ticket_expand(v, b["crow"], b["bits"], layer.in_features)


#: what MLPStep.chain returns when the model changed since it was planned
STALE = object()


class ChainForward:
    """The forward that ``sparsify(..., fuse_relu=True)`` gives an nn.Sequential MLP that
    holds a SparseLinear, and ``enable_neq`` one that holds a DenseNEqLinear (stored as the
    instance's ``forward``; the class, state-dict keys and children are unchanged):
    ``MLPStep.chain``, one autograd node for all its layers, when the call allows it, else
    the Sequential's own forward. ``densify`` and ``remove_chains`` remove it.
    Pickled and copied as a reference to its module (the plan is rebuilt on first use)."""

    __slots__ = ("module", "step")

    def __init__(self, module: nn.Module, step: Optional[MLPStep] = None):
        self.module = module
        self.step = step  # (built on first use when not given)

    def __reduce__(self):
        return (ChainForward, (self.module,))

    def __call__(self, *args, **kwargs):
        m = self.module
        if len(args) == 1 and not kwargs:
            st = self.step
            if st is None:
                st = self.step = MLPStep(m)
            y = st.chain(args[0])
            if y is STALE:
                st = self.step = MLPStep(m)
                y = st.chain(args[0])
            if y is not None and y is not STALE:
                return y
        return type(m).forward(m, *args, **kwargs)


def install_chains(model: nn.Module, holding: Tuple[type, ...] = (SparseLinear,)) -> None:
    """Give every nn.Sequential MLP in ``model`` that holds a layer of a type in
    ``holding`` (sparsify: SparseLinear; enable_neq: DenseNEqLinear) a ChainForward, unless
    its forward is already overridden."""
    for m in model.modules():
        if (isinstance(m, nn.Sequential) and "forward" not in m.__dict__
                and any(type(c) in holding for c in m._modules.values())):
            step = MLPStep(m)
            if step.reason is None:
                m.__dict__["forward"] = ChainForward(m, step)


def remove_chains(model: nn.Module) -> None:
    """Undo install_chains: every nn.Sequential in ``model`` runs its own forward again."""
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), ChainForward):
            del m.__dict__["forward"]
