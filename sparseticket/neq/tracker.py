"""NEqTracker: measures neurons on a fixed validation set each epoch and freezes those at
equilibrium (Bragagnolo, Tartaglione et al., NeurIPS 2022). See docs/NEQ.md."""
from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import rules
from .config import STATE_FIELDS, NEqConfig
from .prefix import frozen_prefix, is_neq_capable

_STATE_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _Layer:
    """Per-module state: stored outputs of the last epoch and the rule's per-neuron terms."""

    def __init__(self, name: str, module: nn.Module, index: int):
        self.name = name
        self.module = module
        self.index = index
        # Which output dim holds the neurons: conv-like modules put channels at dim 1,
        # linear-like ones at the last dim (the same thing for a [B, O] output).
        self.channel_dim = 1 if hasattr(module, "out_channels") else (-1 if hasattr(module, "out_features") else 1)
        self.n_out: int | None = _n_out(module)
        self.positions: Tensor | None = None   # fixed subset of spatial positions
        self.prev: Tensor | None = None        # normalised outputs of the last epoch
        self.phi: Tensor | None = None         # paper: φ of the last epoch   [O] float64
        self.velocity: Tensor | None = None    # paper: v                     [O] float64
        self.s: Tensor | None = None           # code: smoothed Δ buffer      [O] float64
        self.frozen: Tensor | None = None      # decision in force            [O] bool
        self.stats: dict[str, Tensor | None] = {}
        self.chunks: list[Tensor] = []

    def ensure_size(self, n: int):
        if self.n_out is None:
            self.n_out = n
        elif self.n_out != n:
            raise ValueError(f"NEq: module {self.name!r} has {n} output neurons, expected {self.n_out}")
        if self.frozen is None:
            self.frozen = torch.zeros(n, dtype=torch.bool)


def _n_out(module: nn.Module) -> int | None:
    for attr in ("out_features", "out_channels"):
        n = getattr(module, attr, None)
        if isinstance(n, int):
            return n
    active = getattr(module, "active", None)
    return int(active.numel()) if isinstance(active, Tensor) else None


def _select_modules(model: nn.Module, spec) -> list[tuple[str, nn.Module]]:
    named = list(model.named_modules())
    if spec is None:
        chosen = [(n, m) for n, m in named if is_neq_capable(m)]
        _check_not_fused(chosen)
        if not chosen:
            raise ValueError("NEq: the model has no NEq-capable module (one with `active` and `set_active`); "
                             "convert it first (sparseticket.nn.enable_neq(model) or sparsify) or pass "
                             "NEqConfig(modules=...)")
        return chosen
    if callable(spec):
        chosen = [(n, m) for n, m in named if spec(n, m)]
    else:
        if isinstance(spec, str):
            spec = [spec]
        lookup = dict(named)
        for n in spec:
            if n not in lookup:
                raise ValueError(f"NEqConfig.modules: no module named {n!r} in the model")
        wanted = set(spec)
        chosen = [(n, m) for n, m in named if n in wanted]
    _check_not_fused(chosen)
    if not chosen:
        raise ValueError("NEqConfig.modules selected no module")
    return chosen


def _check_not_fused(chosen: list[tuple[str, nn.Module]]) -> None:
    # NEq compares a neuron's pre-activation outputs; a layer with a fused activation only
    # has the activation to show
    for n, m in chosen:
        if getattr(m, "activation", None) is not None:
            raise ValueError(f"NEq: layer {n!r} has a fused {m.activation} (sparsify(..., fuse_relu=True)), so its "
                             "output is the activation, not the neuron's pre-activation that NEq measures; "
                             "sparsify without fuse_relu to track it")


def _collect_validation(val, val_size: int | None, batch_size: int | None, seed: int
                        ) -> tuple[Tensor | None, int]:
    """Cache the fixed validation subset Ξ as one tensor [N, ...] and pick the batch size.

    A tensor is subsampled with a seeded random choice (kept in order); an iterable of
    batches (DataLoader, list of tensors or of (x, y, ...) tuples) is read until ``val_size``
    samples are gathered. Caching makes Ξ identical every epoch even if the loader shuffles.
    """
    if val is None:
        return None, batch_size or 1
    if isinstance(val, Tensor):
        x = val
        if val_size is not None and val_size < x.shape[0]:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(x.shape[0], generator=g)[:val_size].sort().values
            x = x[idx.to(x.device)]
        if x.shape[0] == 0:
            raise ValueError("NEq: the validation tensor is empty")
        return x, batch_size or min(x.shape[0], 128)
    chunks, n, first = [], 0, None
    for batch in val:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(f"NEq: validation batches must be tensors or (inputs, ...) tuples, got {type(batch).__name__}")
        first = first or batch.shape[0]
        chunks.append(batch.detach())
        n += batch.shape[0]
        if val_size is not None and n >= val_size:
            break
    if not chunks or n == 0:
        raise ValueError("NEq: the validation loader yielded no samples")
    x = torch.cat(chunks)
    if val_size is not None:
        x = x[:val_size]
    return x, batch_size or getattr(val, "batch_size", None) or first


def _fingerprint(x: Tensor | None) -> list[float] | None:
    if x is None:
        return None
    xd = x.double()
    return [float(x.shape[0]), float(xd.sum()), float((xd * xd).sum())]


class NEqTracker:
    """Neurons at Equilibrium: decides each epoch which neurons of the model stop training.

    model:  the model being trained; tracked modules must expose ``active`` and
            ``set_active(mask_or_None)`` (``True`` = trainable) to be frozen.
    val:    the validation inputs: a tensor [N, ...] or an iterable of batches (only the
            inputs are used). The first ``config.val_size`` samples are cached as the
            fixed set Ξ. May be None with ``config.stochastic``.
    config: NEqConfig.
    baseline: measure the outputs of the untrained model now (epoch 0). Pass False when
            the state will be loaded from a checkpoint anyway.

    Typical loop::

        tracker = NEqTracker(model, val_x, NEqConfig(eps=1e-3, mu_eq=0.5))
        for epoch in range(E):
            train_one_epoch(model)
            tracker.step()          # measure on Ξ, update φ/velocity, set_active on modules
    """

    def __init__(self, model: nn.Module, val: Tensor | Iterable | None = None,
                 config: NEqConfig | None = None, baseline: bool = True):
        self.model = model
        self.config = config if config is not None else NEqConfig()
        cfg = self.config
        if val is None and cfg.stochastic is None:
            raise ValueError("NEqTracker: a validation set is required (it may be None only with "
                             "NEqConfig(stochastic=...))")
        self.layers: dict[str, _Layer] = {n: _Layer(n, m, i)
                                          for i, (n, m) in enumerate(_select_modules(model, cfg.modules))}
        if isinstance(cfg.stochastic, dict):
            unknown = [k for k in cfg.stochastic if k not in self.layers]
            if unknown:
                raise ValueError(f"NEqConfig.stochastic names {unknown[0]!r}, which is not a tracked module")
        self._val, self._val_batch_size = (None, 1) if cfg.stochastic is not None else \
            _collect_validation(val, cfg.val_size, cfg.val_batch_size, cfg.seed)
        self._groups = [] if self._val is None else rules.split_sizes(self._val.shape[0], self._val_batch_size)
        self._gen = torch.Generator().manual_seed(cfg.seed)
        self.epoch = -1                     # -1: no baseline yet; k: k training epochs measured
        self.history: list[dict[str, Any]] = []
        self.execution_order: list[str] = []
        self._pending: dict[str, tuple[Tensor, Tensor | None]] | None = None
        for layer in self.layers.values():
            if layer.n_out is not None:
                layer.ensure_size(layer.n_out)
        if baseline:
            if cfg.stochastic is None:
                self.measure()
            self._commit_baseline()

    # ------------------------------------------------------------------ measurement

    @property
    def val_batch_size(self) -> int:
        return self._val_batch_size

    @property
    def val_size(self) -> int:
        return 0 if self._val is None else int(self._val.shape[0])

    def _hook(self, layer: _Layer):
        sp = self.config.spatial_positions

        def fn(module, inputs, output):
            if not isinstance(output, Tensor):
                raise TypeError(f"NEq: module {layer.name!r} returned {type(output).__name__}; "
                                "only modules with a single tensor output can be tracked")
            if layer.name not in self.execution_order:
                self.execution_order.append(layer.name)
            y = output.detach()
            if y.dim() < 2:
                raise ValueError(f"NEq: module {layer.name!r} output has shape {tuple(y.shape)}; "
                                 "expected [batch, neurons, ...]")
            if y.dim() == 2:
                y = y.float()                                     # [B, O]
            else:
                if layer.channel_dim != 1:
                    y = y.movedim(layer.channel_dim, 1)
                y = y.reshape(y.shape[0], y.shape[1], -1)         # [B, O, P]
                if sp is not None and y.shape[2] > sp:
                    if layer.positions is None:
                        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + layer.index)
                        layer.positions = torch.randperm(y.shape[2], generator=g)[:sp].sort().values
                    y = y[:, :, layer.positions.to(y.device)]
                y = y.float()
            layer.chunks.append(y)

        return fn

    def _gather(self) -> dict[str, Tensor]:
        model = self.model
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = self._val.device
        handles = [layer.module.register_forward_hook(self._hook(layer)) for layer in self.layers.values()]
        was_training = model.training
        self.execution_order = []
        try:
            model.eval()
            with torch.no_grad():
                for xb in torch.split(self._val, self._val_batch_size):
                    model(xb.to(device))
        finally:
            model.train(was_training)
            for h in handles:
                h.remove()
        out, n = {}, self._val.shape[0]
        for layer in self.layers.values():
            chunks, layer.chunks = layer.chunks, []
            if not chunks:
                raise RuntimeError(f"NEq: module {layer.name!r} did not run in the model's forward")
            cur = torch.cat(chunks)
            if cur.shape[0] != n:
                raise RuntimeError(f"NEq: module {layer.name!r} produced {cur.shape[0]} rows for {n} validation "
                                   "samples (is it called more than once per forward?)")
            layer.ensure_size(cur.shape[1])
            out[layer.name] = cur
        return out

    def measure(self) -> None:
        """Run Ξ through the model (eval mode, no grad) and compute φ (paper) or Δ (code).

        Nothing is committed until ``update()``, so measuring twice is harmless.
        """
        cfg = self.config
        if cfg.stochastic is not None:
            self._pending = {}
            return
        store = _DTYPES[cfg.store_dtype]
        pending = {}
        for name, cur in self._gather().items():
            layer = self.layers[name]
            if cfg.rule == "paper":
                hat = rules.normalise(rules.paper_vectors(cur), dim=1)
            else:
                hat = rules.code_normalise(cur, self._groups)
            if layer.prev is not None and layer.prev.shape != hat.shape:
                raise RuntimeError(f"NEq: module {name!r} output layout changed from {tuple(layer.prev.shape)} "
                                   f"to {tuple(hat.shape)} between epochs")
            if layer.prev is None:
                value = None
            elif cfg.rule == "paper":
                value = rules.paper_phi(hat, layer.prev)
            else:
                value = rules.code_delta(hat, layer.prev, self._groups)
            pending[name] = (hat.to(store), None if value is None else value.cpu())
        self._pending = pending

    # ------------------------------------------------------------------ decisions

    def _commit_baseline(self):
        for name, (hat, _) in (self._pending or {}).items():
            self.layers[name].prev = hat
        self._pending = None
        self.epoch = 0

    def _first_decision_epoch(self) -> int:
        # paper: v needs Δφ, i.e. φ of two epochs; code: s₀ = 0 makes m₁ defined.
        return (2 if self.config.rule == "paper" and self.config.stochastic is None else 1) + self.config.warmup

    def update(self) -> dict[str, Any]:
        """Commit the last ``measure()``: one epoch later, new decisions. Returns frozen_fraction()."""
        if self._pending is None:
            if self.config.stochastic is None:
                raise RuntimeError("NEqTracker.update(): call measure() first")
            self._pending = {}                    # the stochastic baseline measures nothing
        if self.epoch < 0:
            self._commit_baseline()
            return self.frozen_fraction()
        cfg = self.config
        self.epoch += 1
        decide = self.epoch >= self._first_decision_epoch()
        for name, layer in self.layers.items():
            if cfg.stochastic is not None:
                if layer.n_out is None:
                    raise ValueError(f"NEq: cannot tell how many neurons module {name!r} has "
                                     "(no out_features / out_channels / active)")
                frac = cfg.stochastic.get(name, 0.0) if isinstance(cfg.stochastic, dict) else cfg.stochastic
                frozen = torch.zeros(layer.n_out, dtype=torch.bool)
                if decide:
                    k = round(frac * layer.n_out)
                    frozen[torch.randperm(layer.n_out, generator=self._gen)[:k]] = True
                layer.frozen, layer.stats = frozen, {}
                continue
            hat, value = self._pending[name]
            layer.prev = hat
            if cfg.rule == "paper":
                dphi, v, frozen = rules.paper_step(value, layer.phi, layer.velocity, cfg.mu_eq, cfg.eps)
                layer.phi = value.double()
                if v is not None:
                    layer.velocity = v
                layer.stats = {"phi": layer.phi.clone(), "dphi": dphi, "velocity": v}
            else:
                s_prev = layer.s if layer.s is not None else torch.zeros(layer.n_out, dtype=torch.float64)
                m, layer.s, frozen = rules.code_step(value, s_prev, cfg.mu_eq, cfg.eps, freeze=decide)
                layer.stats = {"delta": value.double(), "m": m, "s": layer.s.clone()}
            if frozen is None or not decide:
                frozen = torch.zeros(layer.n_out, dtype=torch.bool)
            layer.frozen = frozen.cpu()
        self._pending = None
        self._broadcast()
        fractions = self.frozen_fraction()
        self.history.append({"epoch": self.epoch, **copy.deepcopy(fractions)})
        return fractions

    def _broadcast(self):
        if not self.config.broadcast:
            return
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        for layer in self.layers.values():
            dev = next(layer.module.parameters(), torch.empty(0)).device
            t = layer.frozen.to(device=dev, dtype=torch.uint8)
            dist.broadcast(t, src=0)
            layer.frozen = t.bool().cpu()

    def apply(self, strict: bool = True) -> None:
        """Push the decisions to the modules: ``module.set_active(~frozen)`` (None if none frozen)."""
        for name, layer in self.layers.items():
            if not hasattr(layer.module, "set_active"):
                if strict:
                    raise TypeError(f"NEq: module {name!r} ({type(layer.module).__name__}) cannot freeze neurons "
                                    "(no set_active); convert it with sparseticket.nn.enable_neq(model) or sparsify")
                continue
            if layer.frozen is None or not bool(layer.frozen.any()):
                layer.module.set_active(None)
                continue
            param = next(layer.module.parameters(), None)     # SparseLinear has weight_values, not weight
            device = param.device if param is not None else layer.frozen.device
            layer.module.set_active((~layer.frozen).to(device))

    def step(self) -> dict[str, Any]:
        """End of an epoch: ``measure()``, ``update()``, ``apply()``. Returns frozen_fraction()."""
        self.measure()
        self.update()
        self.apply()
        return self.frozen_fraction()

    # ------------------------------------------------------------------ reporting

    def frozen(self) -> dict[str, Tensor]:
        """{module name: [O] bool, True = frozen for the coming epoch}."""
        return {n: (l.frozen.clone() if l.frozen is not None else None) for n, l in self.layers.items()}

    def frozen_fraction(self) -> dict[str, Any]:
        """{'total': frozen neurons / all tracked neurons, 'layer': {name: fraction}}."""
        per, frozen, total = {}, 0, 0
        for name, layer in self.layers.items():
            if layer.frozen is None:
                continue
            n, f = layer.frozen.numel(), int(layer.frozen.sum())
            per[name] = f / n if n else 0.0
            frozen, total = frozen + f, total + n
        return {"total": frozen / total if total else 0.0, "layer": per}

    def stats(self, name: str) -> dict[str, Tensor | None]:
        """The last epoch's per-neuron terms of module ``name``.

        paper: {'phi', 'dphi', 'velocity'} (dphi/velocity None during warm-up);
        code: {'delta', 'm', 's'}; stochastic: {}.
        """
        return dict(self.layers[name].stats)

    def frozen_prefix(self) -> list[tuple[str, nn.Module]]:
        """Fully frozen leading tracked modules, in the forward order seen while measuring."""
        order = self.execution_order or list(self.layers)
        return frozen_prefix(self.model, order=[n for n in order if n in self.layers])

    def memory_bytes(self) -> int:
        """Bytes held for the previous epoch's outputs (the tracker's only large state)."""
        return sum(l.prev.numel() * l.prev.element_size() for l in self.layers.values() if l.prev is not None)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        layers = {}
        for name, l in self.layers.items():
            layers[name] = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in {
                "n_out": l.n_out, "prev": l.prev, "phi": l.phi, "velocity": l.velocity, "s": l.s,
                "frozen": l.frozen, "positions": l.positions}.items()}
            layers[name]["stats"] = {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in l.stats.items()}
        return {"version": _STATE_VERSION, "config": self.config.to_dict(), "epoch": self.epoch,
                "layers": layers, "history": copy.deepcopy(self.history), "generator": self._gen.get_state(),
                "groups": list(self._groups), "execution_order": list(self.execution_order),
                "val_fingerprint": _fingerprint(self._val)}

    def load_state_dict(self, state: dict[str, Any], apply: bool = True) -> None:
        """Restore a tracker saved by ``state_dict()``; then push its masks to the modules."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"NEq state_dict: unsupported version {state.get('version')!r}")
        mine = self.config.to_dict()
        diff = [f for f in STATE_FIELDS if state["config"].get(f) != mine.get(f)]
        if diff:
            f = diff[0]
            raise ValueError(f"NEq state_dict: config.{f} is {state['config'].get(f)!r} in the checkpoint but "
                             f"{mine.get(f)!r} here")
        if set(state["layers"]) != set(self.layers):
            raise ValueError(f"NEq state_dict: tracked modules {sorted(state['layers'])} do not match "
                             f"{sorted(self.layers)}")
        fp = state.get("val_fingerprint")
        mine_fp = _fingerprint(self._val)
        if fp is not None and mine_fp is not None and fp != mine_fp:
            raise ValueError("NEq state_dict: the validation set differs from the checkpoint's "
                             f"(fingerprint {fp} vs {mine_fp}); pass the same samples")
        for name, saved in state["layers"].items():
            layer = self.layers[name]
            if layer.n_out is not None and saved["n_out"] is not None and layer.n_out != saved["n_out"]:
                raise ValueError(f"NEq state_dict: module {name!r} has {layer.n_out} neurons, checkpoint has "
                                 f"{saved['n_out']}")
            for k in ("n_out", "prev", "phi", "velocity", "s", "frozen", "positions"):
                v = saved[k]
                setattr(layer, k, v.clone() if isinstance(v, Tensor) else v)
            layer.stats = dict(saved.get("stats", {}))
        self.epoch = state["epoch"]
        self.history = copy.deepcopy(state["history"])
        self._gen.set_state(state["generator"])
        self._groups = list(state["groups"]) if state["groups"] else self._groups
        self.execution_order = list(state.get("execution_order", []))
        self._pending = None
        if apply:
            self.apply(strict=False)

