#!/usr/bin/env python
"""Module-level benchmarks (issue 3): whole training steps of sparsified models, NEq backward,
and the "never slower than dense" sweep over single layers.

    python bench/bench_modules.py --markdown                 # all three parts (minutes; run on a quiet machine)
    python bench/bench_modules.py --quick                    # one sparsity, few reps: checks the harness
    python bench/bench_modules.py --parts 1 --models conv4 --sparsities 95 --reps 9

Part 1, ``train_step``: one training step (zero_grad, forward, cross-entropy on fixed random
labels, backward, optimizer step, Python overhead included) of LeNet-300-100 (batch 60) and
Conv-4 (``get_model('conv4')``: two pairs of 3x3 convs + three linear layers, MNIST-sized
input, batch 64), pruned by global magnitude pruning at 90 / 95 / 98% of the conv+linear
weights (output layer at half that rate), all contenders starting from the same weights:

* ``dense`` (baseline): the plain model, torch.optim.SGD(momentum=0.9, foreach=True), then the
  masks re-applied to the weights with torch._foreach_mul_ (dense-masked training);
* ``sparseticket``: ``sparseticket.nn.sparsify(model, masks=..., mode='auto', fuse_relu=True)``
  + MaskedSGD (the same hyperparameters; each Linear/Conv2d+ReLU pair one op and one autograd node,
  the same numbers); warm-up steps run first so every layer has measured its path;
* ``sparseticket_sparse``: the same with mode='sparse' forced, to show what 'auto' gained;
* ``sparseticket_mlpstep`` (LeNet only): mode='sparse' with the gradients from
  ``sparseticket.nn.MLPStep`` (the same ops, no autograd) and MaskedSGD's update in the
  same call, inside a ``fast.fixed(opt)`` block (checks once): the training loop's
  forward / zero_grad / backward / step become ``loss = step(x, y)``.

* ``floor`` (LeNet only): the same architecture and loop with every width cut to 16 (input
  4x4), almost no arithmetic: eager PyTorch's per-step cost for this graph. dense / floor is
  the largest speedup any drop-in eager layer could give (see FLOOR_MODELS); the floor keeps
  its nn.ReLU nodes, which fuse_relu folds away, so sparseticket may come in under it.

Targets: sparseticket at least 2x / 3x / 4x faster than dense at 90 / 95 / 98%.

Part 2, ``neq_backward``: the dense (unpruned) model against the same weights after
``sparseticket.nn.enable_neq`` with a random half of every Linear/Conv2d layer's neurons
frozen (the output layer included, as the issue says "each layer"; ``--neq-skip-output``
leaves it whole). The backward cannot be timed alone with back-to-back calls, so forward
and forward+backward are timed interleaved (6 contenders, one run) and the backward is
their difference of medians (rows ``dense_backward`` / ``neq_backward``, no IQR). The
executed / dense weight-gradient FLOPs of one forward+backward come from
``sparseticket.flops.FlopCounter``. Target: backward at least 1.3x faster, weight-gradient
FLOPs halved. The NEq model runs inside ``sparseticket.neq.cut_frozen_outputs``, as a
training epoch can: the first layer is fed data, so the gradient at its frozen output
channels is never read, and the layer after it (Conv-4's conv2, an NEqConv2d) computes
its input gradient for the first layer's active channels only (column ``paths`` shows
``cut=conv2<-conv1:0.5``, the fraction of conv2's input gradient computed in the checked step;
LeNet has no such pair, its second layer being a Linear). The
parameter gradients are checked against the dense ones as before. ``enable_neq`` runs an
MLP (LeNet) as one autograd node, so for LeNet a fourth model, ``neq_modules``, is the same
NEq model with that node removed (a node per layer and per ReLU, as the dense model and the
bound have): its rows show what the chain adds. The bound: a third
model, ``nowgrad``, is the dense one with every weight's
requires_grad off, and every conv bias's (no weight gradient; input gradients and Linear
bias gradients as before); a backward that skips exactly half of the weight gradient and
nothing else takes at least (dense + nowgrad) / 2, so row ``nowgrad_backward``'s ratio
column holds dense / that: the largest NEq speedup that skipping weight-gradient rows alone
allows at half frozen (the cut above saves input-gradient work on top of it). Conv
biases are off because oneDNN computes a conv's bias gradient with its weight gradient:
with only the weight frozen, torch's conv backward costs as much as the full one (46 vs
46 ms at 64->64 @28, batch 64; 23 ms with both frozen). So that the backward still reaches
the first conv, nowgrad's input requires grad in conv nets, which adds the first conv's
input gradient (a slightly lower bound than the exact one).

Part 3, ``layer_step``: one layer alone, a training step (forward, backward with a fixed
output gradient, optimizer step) of nn.Linear / nn.Conv2d + SGD(foreach) + re-mask against
its SparseLinear / SparseConv2d (mode='auto', after warm-up) + MaskedSGD, over sparsities
0..99%. The input requires grad except for LeNet's first layer (fed data there). Target:
the sparse module never more than 5% slower (ratio >= 1/1.05); misses are flagged.

Every contender is checked against the dense one before it is timed (same loss / weights /
gradients from the same start, fp32 tolerance); one that fails is reported in column
``correct`` and not timed. Rows go to ``--csv`` (default bench/results/modules.csv, or
modules-quick.csv with --quick); the command line and machine go to ``<stem>.runs.json``.

Columns beyond the timing ones of bench/common.py: ``part`` (train_step / neq_backward /
layer_step), ``model`` or ``layer``, ``density`` (kept fraction of the pruned weights),
``target`` and ``met`` (on the row the target is about), FLOPs per timed call from
FlopCounter (``flops_executed`` / ``flops_dense_equiv``, and the weight-gradient share
``wgrad_flops_*``; the dense baseline's re-masking multiply is counted as 1 per weight),
``layer_paths`` (per sparse layer the path it runs and, in 'auto', the one-time measurement
``[sparse ms/dense ms]`` that chose it; for NEq the frozen fraction per layer).
"""
from __future__ import annotations

import os
import sys


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from early_threads import early_threads  # noqa: E402  (torch-free)

if __name__ == "__main__":
    early_threads(sys.argv[1:])

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import csv  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402
from common import Stats, bench_interleaved, check_close, gflops  # noqa: E402

LR = 0.01
MOMENTUM = 0.9
MODEL_BATCH = {"lenet_300_100": 60, "conv4": 64}
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
STEP_SPARSITIES = [0.9, 0.95, 0.98]
STEP_TARGETS = {0.9: 2.0, 0.95: 3.0, 0.98: 4.0}
NEQ_TARGET = 1.3
NEQ_ACTIVE_FRACTION = 0.5
LAYER_SPARSITIES = [0.0, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99]
SLOWDOWN_LIMIT = 1.05


@dataclass(frozen=True)
class LayerShape:
    """One layer of LeNet-300-100 / Conv-4 as it runs inside the model."""

    kind: str         # 'linear' | 'conv'
    cin: int
    cout: int
    batch: int
    hw: int = 0       # conv input height = width (3x3, padding 1, stride 1)
    input_grad: bool = True

    def describe(self) -> str:
        if self.kind == "linear":
            return f"Linear {self.cin}->{self.cout}, batch {self.batch}"
        return f"Conv2d {self.cin}->{self.cout} 3x3 at {self.hw}x{self.hw}, batch {self.batch}"


LAYERS = {
    "fc784x300": LayerShape("linear", 784, 300, 60, input_grad=False),  # LeNet fc1: its input is the data
    "fc300x100": LayerShape("linear", 300, 100, 60),
    "conv64x64@28": LayerShape("conv", 64, 64, 64, hw=28),
    "conv128x128@14": LayerShape("conv", 128, 128, 64, hw=14),
}
PARTS = {1: "train_step", 2: "neq_backward", 3: "layer_step"}

FIELDS = [
    "run_id", "timestamp", "part", "model", "layer", "batch", "sparsity", "density", "param", "contender", "variant",
    "baseline", "correct", "median_ms", "p25_ms", "p75_ms", "iqr_ms", "reps", "inner", "ratio_vs_baseline",
    "target", "met", "flops_executed", "flops_dense_equiv", "gflops_executed", "gflops_dense_equiv",
    "wgrad_flops_executed", "wgrad_flops_dense", "wgrad_flops_ratio", "layer_paths",
    "backend", "torch_version", "threads",
]


class CsvWriter(common.CsvWriter):
    """common.CsvWriter with this benchmark's columns (model, targets, FLOP ratios, layer paths)."""

    fields = FIELDS

    def __init__(self, path, run_id: str, extra: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.run_id, self.common, self.rows = run_id, dict(extra), []
        self._new = not (self.path.exists() and self.path.stat().st_size > 0)
        if not self._new:
            with open(self.path, newline="") as f:
                if next(csv.reader(f), []) != self.fields:
                    raise SystemExit(f"bench: {self.path} has another column layout; pass --csv with a new path")

    def write(self, **row) -> dict:
        full = dict.fromkeys(self.fields)
        full.update(self.common)
        full.update(run_id=self.run_id, timestamp=common._dt.datetime.now().isoformat(timespec="seconds"))
        full.update(row)
        unknown = set(full) - set(self.fields)
        if unknown:
            raise KeyError(f"unknown CSV columns {sorted(unknown)}")
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields)
            if self._new:
                w.writeheader()
                self._new = False
            w.writerow({k: common._fmt(v) for k, v in full.items()})
        self.rows.append(full)
        return full


# ----------------------------------------------------------------------------- contenders


@dataclass
class Contender:
    """``fn()`` is what is timed (one step, or one forward(+backward))."""

    name: str
    fn: Callable[[], object]
    variant: str = ""
    flops: Optional[float] = None          # executed FLOPs per call
    flops_dense: Optional[float] = None    # the dense model's FLOPs for the same call
    wgrad: Optional[tuple] = None          # (executed, dense) weight-gradient FLOPs per call
    paths: str = ""


def _err(e: BaseException) -> str:
    return f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def time_group(args, contenders: List[Contender], status: Dict[str, Optional[str]]) -> Dict[str, Stats]:
    """Time the contenders whose check passed, interleaved (bench/common.py)."""
    good = {c.name: c.fn for c in contenders if status.get(c.name) is None}
    if not good:
        return {}
    try:
        return bench_interleaved(good, reps=args.reps, warmup=args.warmup, min_sample_ms=args.min_sample_ms)
    except Exception as e:  # a contender passed its check but crashed later: report, keep going
        for name in good:
            status[name] = f"error while timing: {_err(e)}"
        if args.verbose:
            traceback.print_exc()
        return {}


def _print_rows(title: str, rows: List[dict], baseline: str):
    print(f"\n{title}")
    print(f"  {'contender':20s} {'median ms':>10s} {'IQR ms':>9s} {'x ' + baseline:>10s}  {'target, met':>24s}  "
          "check / paths")
    for r in rows:
        tail = r["correct"] if r["correct"] != "ok" else (r.get("layer_paths") or "ok")
        tgt = (r.get("target") or "") + (f" {r['met']}" if r.get("met") else "")
        print(f"  {r['contender']:20s} {common.fmt_ms(r['median_ms']):>10s} {common.fmt_ms(r['iqr_ms']):>9s} "
              f"{common.fmt_ratio(r['ratio_vs_baseline']):>10s}  {tgt:>24s}  {tail}")


def write_group(ctx, contenders: List[Contender], status, stats: Dict[str, Stats], baseline: str,
                targets: Optional[Dict[str, tuple]] = None, **common_cols) -> Dict[str, dict]:
    """One CSV row per contender; ``targets``: {contender: (text, min ratio)}."""
    base = stats.get(baseline)
    targets = targets or {}
    out = {}
    for c in contenders:
        s = stats.get(c.name)
        ratio = base.median_ms / s.median_ms if (base and s) else None
        wg = c.wgrad or (None, None)
        text, least = targets.get(c.name, (None, None))
        met = None if (least is None or ratio is None) else ("yes" if ratio >= least else "no")
        out[c.name] = ctx.writer.write(
            **common_cols, contender=c.name, variant=c.variant, baseline=baseline, target=text, met=met,
            correct="ok" if status.get(c.name) is None else status[c.name],
            median_ms=s.median_ms if s else None, p25_ms=s.p25_ms if s else None, p75_ms=s.p75_ms if s else None,
            iqr_ms=s.iqr_ms if s else None, reps=s.reps if s else None, inner=s.inner if s else None,
            ratio_vs_baseline=ratio, flops_executed=c.flops, flops_dense_equiv=c.flops_dense,
            gflops_executed=gflops(c.flops, s.median_ms) if s else None,
            gflops_dense_equiv=gflops(c.flops_dense, s.median_ms) if s else None,
            wgrad_flops_executed=wg[0], wgrad_flops_dense=wg[1],
            wgrad_flops_ratio=(wg[0] / wg[1]) if (wg[0] is not None and wg[1]) else None, layer_paths=c.paths)
    return out


def ready_contenders(args, makers, steppers: Dict[str, object], status: Dict[str, Optional[str]],
                     module_of: Callable[[object], nn.Module], remask_flops: int) -> List[Contender]:
    """One Contender per maker (name, _, variant) of parts 1 and 3: each stepper that passed
    its check is warmed up ('auto' layers measure their paths here) and the FLOPs of one
    step counted; the dense baseline is also charged its re-masking multiply
    (``remask_flops``, one per weight), which FlopCounter counts only as dense work. A
    failure is recorded in ``status``."""
    cs = []
    for name, _, variant in makers:
        st = steppers.get(name)
        c = Contender(name, st.step if st else (lambda: None), variant)
        if st is not None and status.get(name) is None:
            try:
                for _ in range(args.warmup_steps):
                    st.step()
                module = module_of(st)
                tot = count_flops(module, st.step)
                c.flops, c.flops_dense = tot["all"]["executed"], tot["all"]["dense"]
                if name == "dense":
                    c.flops = c.flops_dense = c.flops + remask_flops
                c.wgrad = (tot["grad_weight"]["executed"], tot["grad_weight"]["dense"])
                if name != "dense":
                    c.paths = layer_paths(module)
            except Exception as e:
                status[name] = _err(e)
        cs.append(c)
    return cs


def layer_paths(model: nn.Module) -> str:
    """'name=path[sparse ms/dense ms]' per sparse layer: what it runs and, for 'auto', the
    one-time measurement that decided it."""
    import sparseticket.nn as stnn
    parts = []
    for r in stnn.layer_report(model):
        if r["type"] in ("DenseNEqLinear", "NEqConv2d"):
            continue
        s = f"{r['name']}={r['runs']}"
        if r["mode"] == "auto" and r["sparse_ms"] is not None:
            s += f"[{r['sparse_ms']:.2f}/{r['dense_ms']:.2f}ms]"
        parts.append(s)
    return " ".join(parts)


def count_flops(model: nn.Module, run: Callable[[], object]) -> dict:
    """FlopCounter totals of one call of ``run`` (a step or a forward+backward)."""
    from sparseticket.flops import FlopCounter
    with FlopCounter(model) as fc:
        run()
    return fc.totals()


# ----------------------------------------------------------------------------- part 1: model training step


def build_model(name: str, seed: int) -> nn.Module:
    from sparseticket.lottery.models import get_model
    torch.manual_seed(seed)
    return get_model(name, INPUT_SHAPE, NUM_CLASSES)


def make_data(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(batch, *INPUT_SHAPE, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)


#: 'layerwise': every conv/linear layer loses the fraction (the output layer half of it);
#: 'global': one magnitude threshold. Global pruning of Conv-4 takes its 90% almost all
#: from fc1 (1.6M of its 2.4M weights, smaller at init), which leaves the convs, where
#: the time goes, far denser than 90%; layerwise is what "90% of weights pruned" means
#: for every layer. Set by --scope.
SCOPE = {"scope": "layerwise"}


def model_masks(model: nn.Module, fraction: float) -> Dict[str, torch.Tensor]:
    """Magnitude pruning of every conv/linear weight (SCOPE), the output layer at half rate."""
    from sparseticket.pruning import Mask, get_strategy, prunable_weights
    w = prunable_weights(model)
    mask = get_strategy("magnitude", fraction=fraction, scope=SCOPE["scope"],
                        overrides={model.output_layer: fraction / 2}).prune(w, Mask.ones_like(w))
    return {n: mask[n] for n in mask}


class ModelStep:
    """One training step of ``model``; ``after_step`` re-applies masks for the dense baseline."""

    def __init__(self, model: nn.Module, opt, x, y, after_step: Optional[Callable[[], None]] = None):
        self.model, self.opt, self.x, self.y, self.after_step = model, opt, x, y, after_step

    def step(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        self.opt.step()
        if self.after_step is not None:
            self.after_step()
        return loss.detach()


def dense_masked_step(base: nn.Module, masks: Dict[str, torch.Tensor], x, y) -> ModelStep:
    model = copy.deepcopy(base)
    mods = dict(model.named_modules())
    weights = [mods[n].weight for n in masks]
    maskf = [masks[n].to(w.dtype) for n, w in zip(masks, weights, strict=True)]
    with torch.no_grad():
        torch._foreach_mul_(weights, maskf)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)

    def remask():
        with torch.no_grad():
            torch._foreach_mul_(weights, maskf)

    return ModelStep(model, opt, x, y, remask)


def sparse_step(base: nn.Module, masks: Dict[str, torch.Tensor], x, y, mode: str) -> ModelStep:
    import sparseticket.nn as stnn
    from sparseticket.optim import MaskedSGD
    model = stnn.sparsify(copy.deepcopy(base), masks=masks, mode=mode, fuse_relu=True)
    return ModelStep(model, MaskedSGD(model.parameters(), lr=LR, momentum=MOMENTUM), x, y)


#: The "floor" contender of part 1: the same architecture and training loop with every
#: width cut to 16 (input 4x4), so it does almost no arithmetic. Its time is what eager
#: PyTorch charges per step for this graph (module calls, autograd, cross-entropy,
#: optimizer); dense / floor is the largest speedup any drop-in eager layer can give.
FLOOR_MODELS = {"lenet_300_100": dict(input_shape=(1, 4, 4), hidden=(16, 16))}
#: Models whose step sparseticket.nn.MLPStep takes (the sparseticket_mlpstep contender)
MLP_MODELS = {"lenet_300_100"}
FLOOR_VARIANT = "same graph, widths 16, input 4x4, SGD(foreach): eager PyTorch per-step floor"


def floor_step(model_name: str, batch: int, seed: int) -> ModelStep:
    from sparseticket.lottery.models import get_model
    cfg = dict(FLOOR_MODELS[model_name])
    shape = cfg.pop("input_shape")
    torch.manual_seed(seed)
    model = get_model(model_name, shape, NUM_CLASSES, **cfg)
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(batch, *shape, generator=g), torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    return ModelStep(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, foreach=True), x, y)


def _dense_weights(model: nn.Module) -> Dict[str, torch.Tensor]:
    from sparseticket.pruning import prunable_weights
    return prunable_weights(model)


def check_model_steps(ref: ModelStep, other: ModelStep, masks, rtol: float, steps: int = 2) -> Optional[str]:
    """``steps`` steps of both from the same weights and data: same losses, same masked
    weights, pruned weights exactly 0."""
    for i in range(steps):
        lr_, lo = ref.step(), other.step()
        err = check_close(lo.reshape(1), lr_.reshape(1), rtol, rtol)
        if err:
            return f"loss of step {i + 1}: {err}"
    wr, wo = _dense_weights(ref.model), _dense_weights(other.model)
    for n, m in masks.items():
        err = check_close(wo[n], wr[n], rtol, rtol)
        if err:
            return f"{n} after {steps} steps: {err}"
        if bool((wo[n][~m] != 0).any()):
            return f"{n}: a pruned weight is non-zero"
    return None


class MLPModelStep(ModelStep):
    """The step with sparseticket.nn.MLPStep computing the gradients (no autograd) and
    MaskedSGD's update inside the same call, in a ``fixed`` block as a training loop that
    keeps its model and optimizer unchanged would (checks once, not per step)."""

    def __init__(self, model: nn.Module, opt, x, y):
        import sparseticket.nn as stnn
        super().__init__(model, opt, x, y)
        self.fast = stnn.MLPStep(model)
        self._block = contextlib.ExitStack()
        self._step = self._block.enter_context(self.fast.fixed(opt))

    def step(self) -> torch.Tensor:
        return self._step(self.x, self.y)


def mlp_step(base: nn.Module, masks: Dict[str, torch.Tensor], x, y) -> ModelStep:
    import sparseticket.nn as stnn
    from sparseticket.optim import MaskedSGD
    model = stnn.sparsify(copy.deepcopy(base), masks=masks, mode="sparse", fuse_relu=True)
    st = MLPModelStep(model, MaskedSGD(model.parameters(), lr=LR, momentum=MOMENTUM), x, y)
    if st.fast.check(x) is not None:
        raise ValueError(f"MLPStep does not apply: {st.fast.check(x)}")
    return st


def bench_train_step(ctx, model_name: str, sparsity: float):
    args = ctx.args
    batch = args.batch or MODEL_BATCH.get(model_name, 64)
    base = build_model(model_name, args.seed)
    x, y = make_data(batch, args.seed)
    masks = model_masks(base, sparsity)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    density = kept / total
    t0 = time.perf_counter()
    makers = [("dense", lambda: dense_masked_step(base, masks, x, y),
               "nn layers, SGD(momentum=0.9, foreach=True), _foreach_mul_(weights, masks)"),
              ("sparseticket", lambda: sparse_step(base, masks, x, y, "auto"),
               "sparsify(mode='auto', fuse_relu=True) + MaskedSGD"),
              ("sparseticket_sparse", lambda: sparse_step(base, masks, x, y, "sparse"),
               "sparsify(mode='sparse', fuse_relu=True) + MaskedSGD")]
    if model_name in MLP_MODELS:
        makers.append(("sparseticket_mlpstep", lambda: mlp_step(base, masks, x, y),
                       "sparsify(mode='sparse', fuse_relu=True) + MLPStep.fixed (no autograd, update fused) + MaskedSGD"))
    if model_name in FLOOR_MODELS:
        makers.append(("floor", lambda: floor_step(model_name, batch, args.seed), FLOOR_VARIANT))
    steppers: Dict[str, ModelStep] = {}
    status: Dict[str, Optional[str]] = {}
    for name, make, _ in makers:
        try:
            steppers[name] = make()
        except Exception as e:
            status[name] = _err(e)
    # the check: two steps of every contender from the same start, against two dense steps
    if "dense" in steppers:
        for name in steppers:
            if name in ("dense", "floor") or name in status:  # the floor computes another net
                continue
            ref = dense_masked_step(base, masks, x, y)
            try:
                status[name] = check_model_steps(ref, steppers[name], masks, args.rtol)
            except Exception as e:
                status[name] = _err(e)
                if args.verbose:
                    traceback.print_exc()
    cs = ready_contenders(args, makers, steppers, status, lambda st: st.model, remask_flops=total)
    stats = time_group(args, cs, status)
    target = STEP_TARGETS.get(round(sparsity, 4))
    rows = write_group(ctx, cs, status, stats, "dense",
                       targets={"sparseticket": (f">={target:g}x", target)} if target else None,
                       part="train_step", model=model_name, layer="", batch=batch, sparsity=sparsity,
                       density=density, param=f"lr={LR} momentum={MOMENTUM}")
    ctx.results += rows.values()
    _print_rows(f"train_step  {model_name} batch {batch}  pruned {100 * sparsity:g}% (output layer "
                f"{50 * sparsity:g}%; overall density {density:.4f})  [{time.perf_counter() - t0:.1f} s]",
                list(rows.values()), "dense")


# ----------------------------------------------------------------------------- part 2: NEq backward


def neq_model(base: nn.Module, seed: int, skip_output: bool) -> nn.Module:
    """``base`` with NEq layers, a random half of each layer's neurons active."""
    import sparseticket.nn as stnn
    model = stnn.enable_neq(copy.deepcopy(base))
    g = torch.Generator().manual_seed(seed + 2)
    for name, m in stnn.neq_modules(model):
        if skip_output and name == base.output_layer:
            continue
        n = m.weight.shape[0]
        active = torch.zeros(n, dtype=torch.bool)
        active[torch.randperm(n, generator=g)[:int(round(NEQ_ACTIVE_FRACTION * n))]] = True
        m.set_active(active)
    return model


def check_neq(dense: nn.Module, neq: nn.Module, x, y, rtol: float) -> Optional[str]:
    """One forward+backward of each: same loss; active rows' gradients equal the dense
    ones, frozen rows get none."""
    for m in (dense, neq):
        m.zero_grad(set_to_none=True)
    ld, ln = F.cross_entropy(dense(x), y), F.cross_entropy(neq(x), y)
    ld.backward()
    ln.backward()
    err = check_close(ln.detach().reshape(1), ld.detach().reshape(1), rtol, rtol)
    if err:
        return f"loss: {err}"
    dmods = dict(dense.named_modules())
    for name, m in neq.named_modules():
        a = getattr(m, "active", None)
        if a is None:
            continue
        for pname in ("weight", "bias"):
            p, q = getattr(m, pname), getattr(dmods[name], pname)
            if p is None:
                continue
            if p.grad is None:
                return f"{name}.{pname}: no gradient"
            err = check_close(p.grad[a], q.grad[a], rtol, rtol)
            if err:
                return f"{name}.{pname} active rows: {err}"
            if bool((p.grad[~a] != 0).any()):
                return f"{name}.{pname}: a frozen row has a non-zero gradient"
    return None


def bench_neq(ctx, model_name: str):
    # the NEq model runs inside neq.cut_frozen_outputs (as a training epoch would): its
    # second layer's input gradient skips the first layer's frozen channels
    with contextlib.ExitStack() as stack:
        _bench_neq(ctx, model_name, stack)


def _bench_neq(ctx, model_name: str, stack: contextlib.ExitStack):
    import sparseticket.nn as stnn
    from sparseticket.neq import cut_frozen_outputs
    args = ctx.args
    batch = args.batch or MODEL_BATCH.get(model_name, 64)
    dense = build_model(model_name, args.seed)
    x, y = make_data(batch, args.seed)
    t0 = time.perf_counter()
    try:
        neq = neq_model(dense, args.seed, args.neq_skip_output)
        cut = stack.enter_context(cut_frozen_outputs(neq))
        neq_status = check_neq(dense, neq, x, y, args.rtol)
    except Exception as e:
        neq, neq_status = None, _err(e)
        if args.verbose:
            traceback.print_exc()

    def fwd(m, xin=x):
        def run():
            m.zero_grad(set_to_none=True)
            return F.cross_entropy(m(xin), y)  # the graph is built as in training and freed on return
        return run

    def fwd_bwd(m, xin=x):
        def run():
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(xin), y).backward()
        return run

    frozen = "" if neq is None else " ".join(f"{n}:{m.frozen_fraction:g}" for n, m in stnn.neq_modules(neq))
    if neq is not None and cut is not None:  # the fraction the consumer computed in check_neq's step
        done = getattr(dict(neq.named_modules())[cut[1]], "last_input_cut", None)
        frozen += f" cut={cut[1]}<-{cut[0]}:{'none' if done is None else f'{done:g}'}"
    nothing = lambda: None  # noqa: E731
    # the bound: no weight gradient at all (see the module docstring for the biases and
    # the input). A backward that keeps the input gradient full and computes half of the
    # weight gradient takes at least (dense + nowgrad) / 2.
    nowgrad = copy.deepcopy(dense)
    has_conv = False
    for m in nowgrad.modules():
        if isinstance(m, nn.Linear):
            m.weight.requires_grad_(False)
        elif isinstance(m, nn.Conv2d):
            has_conv = True
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    x_nowgrad = x.detach().clone().requires_grad_(True) if has_conv else x
    # enable_neq runs an MLP (LeNet) as one autograd node; neq_modules is the same NEq
    # model with the per-layer nodes, so the table shows what the chain adds
    from sparseticket.nn.fast_step import ChainForward, remove_chains
    neq_modules = None
    if neq is not None and any(isinstance(m.__dict__.get("forward"), ChainForward) for m in neq.modules()):
        neq_modules = copy.deepcopy(neq)
        remove_chains(neq_modules)
    fb = {"dense": Contender("dense", fwd_bwd(dense), "nn layers: forward + loss.backward()"),
          "neq": Contender("neq", fwd_bwd(neq) if neq else nothing, "enable_neq, half active: forward + backward",
                           paths=frozen),
          "nowgrad": Contender("nowgrad", fwd_bwd(nowgrad, x_nowgrad), "nn layers, weights and conv biases "
                                                                         "requires_grad=False: fwd + bwd")}
    if neq_modules is not None:
        fb["neq_modules"] = Contender("neq_modules", fwd_bwd(neq_modules), "enable_neq, half active, chain node "
                                      "removed (a node per layer): forward + backward", paths=frozen)
    fo = {"dense": Contender("dense_forward", fwd(dense), "nn layers: forward (graph built, no backward)"),
          "neq": Contender("neq_forward", fwd(neq) if neq else nothing, "enable_neq, half active: forward"),
          "nowgrad": Contender("nowgrad_forward", fwd(nowgrad, x_nowgrad), "nn layers, weights and conv biases "
                                                                                 "requires_grad=False: forward")}
    status = {"dense": None, "dense_forward": None, "neq": neq_status, "neq_forward": neq_status,
              "nowgrad": None, "nowgrad_forward": None}
    names = ["dense", "neq", "nowgrad"]
    if neq_modules is not None:
        fo["neq_modules"] = Contender("neq_modules_forward", fwd(neq_modules), "the same: forward")
        status["neq_modules"] = status["neq_modules_forward"] = neq_status
        names.append("neq_modules")
    kinds = ("forward", "grad_input", "grad_weight")
    for name, m in (("dense", dense), ("neq", neq), ("nowgrad", nowgrad), ("neq_modules", neq_modules)):
        if name not in names:
            continue
        if status[name] is not None:
            continue
        t = count_flops(m, fb[name].fn)  # one forward + backward
        fb[name].flops = sum(t[k]["executed"] for k in kinds)
        fb[name].flops_dense = sum(t[k]["dense"] for k in kinds)
        fb[name].wgrad = (t["grad_weight"]["executed"], t["grad_weight"]["dense"])
        fo[name].flops, fo[name].flops_dense = t["forward"]["executed"], t["forward"]["dense"]
    # one interleaved run of all six: the backward is (forward+backward) - forward
    stats = time_group(args, list(fb.values()) + list(fo.values()), status)
    colz = dict(part="neq_backward", model=model_name, layer="", batch=batch, sparsity=0.0, density=1.0,
                param=f"active={NEQ_ACTIVE_FRACTION:g}" + (" output_whole" if args.neq_skip_output else ""))
    rows = dict(write_group(ctx, list(fb.values()), status, stats, "dense", **colz))
    rows.update(write_group(ctx, list(fo.values()), status, stats, "dense_forward", **colz))
    bwd = {}
    for name in names:
        a, b = stats.get(name), stats.get(name + "_forward")
        bwd[name] = (a.median_ms - b.median_ms) if (a and b) else None
    ok = bwd["dense"] is not None and bwd["neq"] is not None and bwd["neq"] > 0
    ratio = bwd["dense"] / bwd["neq"] if ok else None
    bound = None  # best backward ratio with half the weight gradient skipped and nothing else changed
    if bwd["dense"] and bwd["nowgrad"] is not None:
        bound = bwd["dense"] / ((1 - NEQ_ACTIVE_FRACTION) * bwd["nowgrad"] + NEQ_ACTIVE_FRACTION * bwd["dense"])
    for name in names:
        c, f = fb[name], fo[name]
        wg = c.wgrad or (None, None)
        wratio = wg[0] / wg[1] if (wg[0] is not None and wg[1]) else None
        bflops = None if c.flops is None else c.flops - f.flops
        bdense = None if c.flops_dense is None else c.flops_dense - f.flops_dense
        target = met = None
        if name == "neq":
            # with the output layer whole, the weight-gradient FLOPs are not exactly halved: speed only
            halved = not args.neq_skip_output
            target = f">={NEQ_TARGET:g}x" + (", wgrad<=0.5" if halved else "")
            if ratio is not None and (wratio is not None or not halved):
                met = "yes" if (ratio >= NEQ_TARGET and (not halved or wratio <= 0.5 + 1e-9)) else "no"
        rows[name + "_backward"] = ctx.writer.write(
            **{**colz, "param": colz["param"] + (" ratio=bound" if name == "nowgrad" and bound is not None else "")},
            contender=name + "_backward", variant=f"median({name}) - median({name}_forward)",
            baseline="dense_backward", correct="ok" if status[name] is None else status[name],
            median_ms=bwd[name], reps=args.reps,
            ratio_vs_baseline=(1.0 if bwd["dense"] else None) if name == "dense" else
                              bound if name == "nowgrad" else ratio if name == "neq" else
                              (bwd["dense"] / bwd[name] if bwd["dense"] and bwd[name] else None),
            target=target, met=met,
            flops_executed=bflops, flops_dense_equiv=bdense, gflops_executed=gflops(bflops, bwd[name]),
            gflops_dense_equiv=gflops(bdense, bwd[name]), wgrad_flops_executed=wg[0], wgrad_flops_dense=wg[1],
            wgrad_flops_ratio=wratio, layer_paths=c.paths)
    ctx.results += rows.values()
    wr = rows["neq_backward"]["wgrad_flops_ratio"]
    _print_rows(f"neq_backward  {model_name} batch {batch}  {100 * NEQ_ACTIVE_FRACTION:g}% of each layer's neurons "
                f"active{' (output layer whole)' if args.neq_skip_output else ''}; weight-gradient FLOPs "
                f"executed/dense = {'–' if wr is None else f'{wr:.3f}'}  [{time.perf_counter() - t0:.1f} s]",
                list(rows.values()), "baseline")


# ----------------------------------------------------------------------------- part 3: single layers


def build_layer(shape: LayerShape, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if shape.kind == "linear":
        layer = nn.Linear(shape.cin, shape.cout)
    else:
        layer = nn.Conv2d(shape.cin, shape.cout, 3, padding=1)
    nn.init.kaiming_normal_(layer.weight, mode="fan_in", nonlinearity="relu")  # as the lottery models
    return layer


def layer_data(shape: LayerShape, seed: int):
    g = torch.Generator().manual_seed(seed + 3)
    if shape.kind == "linear":
        x, gy = torch.randn(shape.batch, shape.cin, generator=g), torch.randn(shape.batch, shape.cout, generator=g)
    else:
        x = torch.randn(shape.batch, shape.cin, shape.hw, shape.hw, generator=g)
        gy = torch.randn(shape.batch, shape.cout, shape.hw, shape.hw, generator=g)
    return x.requires_grad_(shape.input_grad), gy


class LayerStep:
    def __init__(self, layer: nn.Module, opt, x, gy, after_step=None):
        self.layer, self.opt, self.x, self.gy, self.after_step = layer, opt, x.detach().clone(), gy, after_step
        self.x.requires_grad_(x.requires_grad)

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        self.x.grad = None
        self.layer(self.x).backward(self.gy)
        self.opt.step()
        if self.after_step is not None:
            self.after_step()


def dense_layer_step(layer, mask, x, gy) -> LayerStep:
    layer = copy.deepcopy(layer)
    maskf = mask.to(layer.weight.dtype)
    with torch.no_grad():
        layer.weight.mul_(maskf)

    def remask():
        with torch.no_grad():
            layer.weight.mul_(maskf)

    return LayerStep(layer, torch.optim.SGD(layer.parameters(), lr=LR, momentum=MOMENTUM, foreach=True), x, gy,
                     remask)


def sparse_layer_step(layer, mask, x, gy, mode: str) -> LayerStep:
    import sparseticket.nn as stnn
    from sparseticket.optim import MaskedSGD
    seq = stnn.sparsify(nn.Sequential(copy.deepcopy(layer)), masks={"0": mask}, mode=mode)
    return LayerStep(seq, MaskedSGD(seq.parameters(), lr=LR, momentum=MOMENTUM), x, gy)


def check_layer_steps(ref: LayerStep, other: LayerStep, mask, rtol: float) -> Optional[str]:
    for _ in range(2):
        ref.step()
        other.step()
    lo = other.layer[0]
    for what, got, want in (("weight", lo.dense_weight(), ref.layer.weight), ("bias", lo.bias, ref.layer.bias),
                            ("input grad", other.x.grad, ref.x.grad)):
        if want is None and got is None:
            continue
        err = check_close(got, want.detach() if want is not None else None, rtol, rtol) if want is not None \
            else f"{what}: unexpected gradient"
        if err:
            return f"{what} after 2 steps: {err}"
    if bool((lo.dense_weight()[~mask] != 0).any()):
        return "a pruned weight is non-zero"
    return None


def bench_layer(ctx, layer_name: str, sparsity: float):
    from sparseticket.pruning import Mask, get_strategy
    args = ctx.args
    shape = LAYERS[layer_name]
    if args.layer_batch:
        shape = dataclasses.replace(shape, batch=args.layer_batch)
    layer = build_layer(shape, args.seed)
    x, gy = layer_data(shape, args.seed)
    w = {"w": layer.weight.detach()}
    mask = get_strategy("magnitude", fraction=sparsity).prune(w, Mask.ones_like(w))["w"]
    density = int(mask.sum()) / mask.numel()
    t0 = time.perf_counter()
    makers = [("dense", lambda: dense_layer_step(layer, mask, x, gy),
               f"nn.{'Linear' if shape.kind == 'linear' else 'Conv2d'}, SGD(foreach), weight.mul_(mask)"),
              ("sparseticket", lambda: sparse_layer_step(layer, mask, x, gy, "auto"),
               f"{'SparseLinear' if shape.kind == 'linear' else 'SparseConv2d'}(mode='auto') + MaskedSGD")]
    steppers, status = {}, {}
    for name, make, _ in makers:
        try:
            steppers[name] = make()
        except Exception as e:
            status[name] = _err(e)
    if "sparseticket" in steppers and "dense" in steppers:
        try:
            status["sparseticket"] = check_layer_steps(dense_layer_step(layer, mask, x, gy), steppers["sparseticket"],
                                                       mask, args.rtol)
        except Exception as e:
            status["sparseticket"] = _err(e)
            if args.verbose:
                traceback.print_exc()
    cs = ready_contenders(args, makers, steppers, status, lambda st: st.layer, remask_flops=mask.numel())
    stats = time_group(args, cs, status)
    rows = write_group(ctx, cs, status, stats, "dense",
                       targets={"sparseticket": (f">={1 / SLOWDOWN_LIMIT:.3f}x", 1 / SLOWDOWN_LIMIT)},
                       part="layer_step", model="", layer=layer_name, batch=shape.batch, sparsity=sparsity,
                       density=density, param=f"input_grad={int(shape.input_grad)}")
    ctx.results += rows.values()
    _print_rows(f"layer_step  {shape.describe()}  sparsity {100 * sparsity:g}%  [{time.perf_counter() - t0:.1f} s]",
                list(rows.values()), "dense")


# ----------------------------------------------------------------------------- markdown


def _f(v):
    return None if v in (None, "") else float(v)


def render_markdown(rows: List[dict]) -> str:
    """This run's tables (rows as written to the CSV or read back from it)."""
    out = []

    def by(part, contender):
        return [r for r in rows if r["part"] == part and r["contender"] == contender]

    def cell(r):
        if r is None:
            return "–"
        if r.get("correct") not in (None, "ok"):
            return "FAILED"
        ms = _f(r.get("median_ms"))
        ratio = _f(r.get("ratio_vs_baseline"))
        return f"{common.fmt_ms(ms)} ({common.fmt_ratio(ratio)})"

    def find(part, contender, **keys):
        for r in rows:
            if r["part"] == part and r["contender"] == contender and all(str(r[k]) == str(v) for k, v in keys.items()):
                return r
        return None

    dense = by("train_step", "dense")
    if dense:
        out.append("### Whole training step (baseline: dense model, SGD(foreach), masks re-applied)\n")
        table = []
        for d in dense:
            k = dict(model=d["model"], sparsity=d["sparsity"])
            st, sp = find("train_step", "sparseticket", **k), find("train_step", "sparseticket_sparse", **k)
            fl = find("train_step", "floor", **k)
            table.append([d["model"], f"{100 * float(d['sparsity']):g}%", f"{float(d['density']):.4f}",
                          common.fmt_ms(_f(d["median_ms"])), cell(st), (st or {}).get("target") or "",
                          (st or {}).get("met") or "", cell(sp), cell(fl) if fl else "–",
                          (st or {}).get("layer_paths") or ""])
        out.append(common.markdown_table(["model", "pruned", "density", "dense ms", "sparseticket ms (x)", "target",
                                          "met", "mode='sparse' ms (x)", "floor ms (x)",
                                          "auto's choice [sparse/dense ms measured]"],
                                         table, "lllrrrrrrl"))
        if any(r["contender"] == "floor" for r in rows):
            out.append(f"\nfloor: {FLOOR_VARIANT}; its (x) is the largest speedup drop-in layers could reach "
                       "with a node per layer and per ReLU (the chain node of a sparsified MLP can pass it).\n")
    neqs = by("neq_backward", "neq_backward")
    if neqs:
        out.append("\n### NEq, half of each layer's neurons frozen: backward = (forward+backward) − forward\n")
        table = []
        for n in neqs:
            k = dict(model=n["model"])
            db, fd = find("neq_backward", "dense_backward", **k), find("neq_backward", "dense_forward", **k)
            fb, nfb = find("neq_backward", "dense", **k), find("neq_backward", "neq", **k)
            wr = _f(n.get("wgrad_flops_ratio"))
            nw = find("neq_backward", "nowgrad_backward", **k)
            nm = find("neq_backward", "neq_modules_backward", **k)
            table.append([n["model"], common.fmt_ms(_f((fd or {}).get("median_ms"))),
                          common.fmt_ms(_f((db or {}).get("median_ms"))), cell(n), cell(nfb) if fb else "–",
                          "–" if wr is None else f"{wr:.3f}", n.get("target") or "", n.get("met") or "",
                          cell(nw) if nw else "–", cell(nm) if nm else "–"])
        out.append(common.markdown_table(["model", "dense fwd ms", "dense bwd ms", "NEq bwd ms (x)",
                                          "NEq fwd+bwd ms (x)", "wgrad FLOPs exec/dense", "target", "met",
                                          "no-wgrad bwd ms (bound x)", "NEq, a node per layer: bwd ms (x)"], table))
        if any(find("neq_backward", "neq_modules_backward", model=n["model"]) for n in neqs):
            out.append("\nAn MLP after enable_neq runs as one autograd node (the chain); the last column "
                       "is the same NEq model with a node per layer, and the bound assumes those.\n")
    layers = by("layer_step", "sparseticket")
    if layers:
        out.append(f"\n### One layer's training step: sparse module (auto) vs nn layer + SGD + re-mask "
                   f"(flag: more than {100 * (SLOWDOWN_LIMIT - 1):g}% slower)\n")
        table = []
        for s in layers:
            d = find("layer_step", "dense", layer=s["layer"], sparsity=s["sparsity"])
            flag = "**SLOWER**" if s.get("met") == "no" else ("" if s.get("met") else "–")
            table.append([s["layer"], f"{100 * float(s['sparsity']):g}%", common.fmt_ms(_f((d or {}).get("median_ms"))),
                          cell(s), s.get("layer_paths") or "", flag])
        out.append(common.markdown_table(["layer", "sparsity", "dense ms", "sparse ms (x)", "path [measured]", "flag"],
                                         table, "llrrll"))
    return "\n".join(out)


# ----------------------------------------------------------------------------- main


def _fractions(text: str) -> List[float]:
    out = []
    for item in text.split(","):
        v = float(item)
        v = v / 100 if v > 1 else v
        if not 0 <= v < 1:
            raise argparse.ArgumentTypeError(f"sparsity {item!r} must be in [0, 100) percent")
        out.append(v)
    return out


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one sparsity, 3 reps, short samples: checks the harness")
    ap.add_argument("--parts", default="1,2,3", help="comma-separated subset of 1 (train_step), 2 (neq_backward), "
                                                     "3 (layer_step)")
    ap.add_argument("--models", default="lenet_300_100,conv4", help="models of parts 1-2 (lottery registry names)")
    ap.add_argument("--batch", type=int, help="batch for parts 1-2 (default: 60 for LeNet, 64 for Conv-4)")
    ap.add_argument("--scope", choices=["layerwise", "global"], default="layerwise",
                    help="part 1's magnitude pruning: each layer at the fraction (default) or one global threshold")
    ap.add_argument("--sparsities", type=_fractions, help="part 1's pruned fractions (default 90,95,98; --quick 90)")
    ap.add_argument("--layers", default=",".join(LAYERS), help=f"part 3's layers, subset of {','.join(LAYERS)}")
    ap.add_argument("--layer-batch", type=int, help="batch for part 3 (default: the layer's batch in its model)")
    ap.add_argument("--layer-sparsities", type=_fractions,
                    help="part 3's sparsities (default 0,20,50,70,80,90,95,99; --quick 90)")
    ap.add_argument("--neq-skip-output", action="store_true", help="part 2: leave the output layer's neurons all "
                                                                   "active (default: half frozen like every layer)")
    ap.add_argument("--threads", type=int, default=2, help="threads for torch, MKL and OpenMP (default 2)")
    common.add_malloc_arg(ap)
    ap.add_argument("--reps", type=int, help="interleaved repetitions per contender (default 15; --quick 3)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per contender inside the timing (default 2)")
    ap.add_argument("--warmup-steps", type=int, default=3,
                    help="steps run after the check and before counting/timing, so 'auto' layers have chosen")
    ap.add_argument("--min-sample-ms", type=float, help="calls per sample chosen so a sample lasts at least this "
                                                        "(default 50; --quick 1)")
    ap.add_argument("--rtol", type=float, default=1e-4, help="correctness tolerance (relative; absolute is this times "
                                                             "max|reference|)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--csv", help="CSV to append to (default bench/results/modules.csv, modules-quick.csv with "
                                  "--quick); metadata in <stem>.runs.json")
    ap.add_argument("--markdown", action="store_true", help="print this run's markdown tables at the end")
    ap.add_argument("--markdown-run", metavar="RUN_ID", help="print the markdown tables of a recorded run (from "
                                                                 "--csv, or the default CSV) and exit; times nothing")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failing contenders")
    return ap


class Ctx:
    def __init__(self, args, writer):
        self.args, self.writer, self.results = args, writer, []


def main(argv=None) -> int:
    from bench_kernels import busy_warning
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    SCOPE["scope"] = args.scope
    if args.quick:
        args.sparsities = args.sparsities or [0.9]
        args.layer_sparsities = args.layer_sparsities or [0.9]
        args.reps = args.reps or 3
        args.min_sample_ms = args.min_sample_ms or 1.0
        args.warmup = min(args.warmup, 1)
    args.sparsities = args.sparsities or STEP_SPARSITIES
    args.layer_sparsities = args.layer_sparsities or LAYER_SPARSITIES
    args.reps = args.reps or 15
    args.min_sample_ms = args.min_sample_ms or 50.0
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    args.csv = args.csv or os.path.join(results, "modules-quick.csv" if args.quick else "modules.csv")
    if args.markdown_run:
        if not os.path.exists(args.csv):
            raise SystemExit(f"bench: no CSV at {args.csv}")
        rows = [r for r in common.read_csv(args.csv) if r["run_id"] == args.markdown_run]
        if not rows:
            raise SystemExit(f"bench: no rows of run {args.markdown_run!r} in {args.csv}")
        print(render_markdown(rows))
        return 0
    try:
        parts = sorted({int(p) for p in args.parts.split(",") if p.strip()})
    except ValueError:
        raise SystemExit(f"bench: --parts {args.parts!r}: give numbers among 1,2,3") from None
    if not set(parts) <= set(PARTS):
        raise SystemExit(f"bench: --parts {args.parts!r}: choose among 1,2,3")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    layers = [m.strip() for m in args.layers.split(",") if m.strip()]
    bad = [n for n in layers if n not in LAYERS]
    if bad:
        raise SystemExit(f"bench: unknown layer(s) {bad}; choose from {list(LAYERS)}")

    common.set_thread_env(args.threads)
    import sparseticket  # noqa: F401
    from sparseticket.lottery.models import available_models
    bad = [m for m in models if m not in available_models()]
    if bad:
        raise SystemExit(f"bench: unknown model(s) {bad}; known: {available_models()}")
    common.apply_malloc(args.malloc)
    omp = common.pin_threads(args.threads)
    info = common.system_info(args.threads, {"openmp_threads": omp})
    run_id = common.new_run_id()
    cmd = common.command_line(None if argv is None else [sys.argv[0]] + list(argv))
    print(f"# sparseticket module benchmarks (issue 3), run {run_id}\n# {cmd}")
    print(common.format_system_info(info))
    busy = busy_warning(info)
    if busy:
        print("WARNING: " + busy)
    if info.get("sparseticket_backend_cpu") != "c++":
        print("NOTE: sparseticket runs on the pure-PyTorch reference path: its timings say nothing about the kernels.")
    writer = CsvWriter(args.csv, run_id, {"backend": info.get("sparseticket_backend_cpu"),
                                          "torch_version": torch.__version__, "threads": args.threads})
    started = common._dt.datetime.now().isoformat(timespec="seconds")
    common.update_runs_json(args.csv, run_id, command=cmd, argv=[sys.argv[0]] + list(argv or sys.argv[1:]),
                            cwd=os.getcwd(), system=info, started=started,
                            parts=[PARTS[p] for p in parts], models=models, batch=args.batch,
                            layer_batch=args.layer_batch,
                            sparsities=args.sparsities, layers=layers, layer_sparsities=args.layer_sparsities,
                            reps=args.reps, min_sample_ms=args.min_sample_ms, warmup=args.warmup,
                            warmup_steps=args.warmup_steps, quick=args.quick, lr=LR, momentum=MOMENTUM,
                            neq_skip_output=args.neq_skip_output)
    ctx = Ctx(args, writer)
    if 1 in parts:
        for m in models:
            for s in args.sparsities:
                bench_train_step(ctx, m, s)
    if 2 in parts:
        for m in models:
            bench_neq(ctx, m)
    if 3 in parts:
        for name in layers:
            for s in args.layer_sparsities:
                bench_layer(ctx, name, s)

    info["loadavg_1m_at_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    failed = sorted({(r["part"], r["model"] or r["layer"], r["contender"], r["correct"]) for r in ctx.results
                     if r.get("correct") not in (None, "ok")})
    missed = [(r["part"], r["model"] or r["layer"], r["sparsity"], r["contender"]) for r in ctx.results
              if r.get("met") == "no"]
    common.update_runs_json(args.csv, run_id, system=info, failed=failed, missed=missed,
                            finished=common._dt.datetime.now().isoformat(timespec="seconds"))
    print(f"\nelapsed {time.perf_counter() - t_start:.1f} s; wrote {len(writer.rows)} rows to {args.csv} "
          f"(run {run_id}); metadata in {common.runs_json_path(args.csv)}")
    if failed:
        print("FAILED correctness checks (not timed):")
        for part, what, name, why in failed:
            print(f"  {part} / {what} / {name}: {why}")
    if missed:
        print("targets missed: " + "; ".join(f"{p} {w} {100 * s:g}% {c}" for p, w, s, c in missed))
    if args.markdown:
        print()
        print(render_markdown(ctx.results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
