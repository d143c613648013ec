"""The IMP runner: levels of train -> prune -> rewind, resumable at its checkpoints.

Run folder (named by the hash of the hyperparameters, see ``hparams.py``)::

    hparams.json             what the latest command asked (the hash covers everything but RUN_ONLY
                             and, for iterative runs, --levels)
    rewind.pt                θ0 (and θk for late resetting): dense state dicts
    level_00/mask.pt         the level's keep masks (level 0: all ones)
    level_00/checkpoint.pt   the last checkpointed epoch (every --checkpoint-every seconds of
                             training, and the level's last): model (index buffers left out),
                             the mask's digest, optimizer, NEq, step, timings
    level_01/pruned_from.json  digests of the previous level's final.pt / mask.pt and of this mask
    level_00/transfer.json   transfers: the source level taken
    level_00/theta_k.json    --rewind iter:K: the digest of the θK this level 0 wrote
    level_00/final.pt        trained dense-equivalent weights (the next level prunes these)
    level_00/ticket.safetensors  the compact ticket (sparse runs)
    level_00/metrics.json    written last: the level is done
    results.json/.csv, *.png
    legacy_name.json         a folder adopted from its pre-session-30 name: that name (a link)

Every file is written to a temporary name, fsynced and renamed, so a run killed at any point
resumes from the last checkpointed epoch; the data order of an epoch depends only on
(data_seed, epoch) and each layer's sparse/dense kernel choice is stored with the level,
so a resumed run computes exactly what an uninterrupted one does.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import nn as stnn
from .. import runtime
from ..nn import _mode
from ..flops import FlopCounter
from ..neq import NEqConfig, NEqTracker, cut_frozen_outputs, freeze_prefix
from ..optim import MaskedAdamW, MaskedSGD
from ..pruning import Mask, RandomPruning, get_strategy, prunable_weights
from . import results as res
from .hparams import TRANSFER_RANDOM_SEED_OFFSET, IMPHparams, layer_fractions, milestones, rewind_spec

# ---------------------------------------------------------------------- files


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same folder, fsync, rename: never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------- progress


class _Progress:
    """tqdm when installed and wanted, and only on a terminal (tqdm's disable=None: piped to a
    file or a CI log, a bar's redraws would be thousands of lines per level); else nothing.
    The per-level lines are printed either way."""

    def __init__(self, enabled: bool, total: int, desc: str, initial: int = 0):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self.bar = tqdm(total=total, desc=desc, initial=initial, leave=False, dynamic_ncols=True, unit="step",
                                disable=None)
            except ImportError:
                pass

    def update(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def say(msg: str) -> None:
    try:
        from tqdm.auto import tqdm
        tqdm.write(msg)
    except ImportError:
        print(msg, flush=True)


# ---------------------------------------------------------------------- one level


@dataclass
class LevelPlan:
    """What a level trains: its mask, the weights it starts from, and the first step."""
    name: str                       # folder name, e.g. level_03
    level: int
    mask: Mask
    start: Dict[str, Tensor]        # dense state dict the level starts from (masked on build)
    first_step: int = 0
    train: bool = True              # False: evaluate only (a pre-trained level 0)
    trainable: Optional[Callable[[str], bool]] = None   # parameter name filter (transfer: output only)
    source_level: Optional[int] = None  # transfers: the source run's level taken


class IMPRun:
    """One run folder. ``run()`` executes (or resumes) every level and returns the result rows."""

    def __init__(self, hp: IMPHparams):
        self.hp = hp.validate()
        self.dir = Path(hp.run.out) / hp.run_name()
        if not self.dir.exists():
            _adopt_legacy_folder(hp, self.dir)
        else:
            _link_legacy_name(self.dir)
        self.sparse = hp.experiment.baseline == "sparse"
        self._data = None
        self._template: Optional[nn.Module] = None  # new_model(init_seed), drawn once
        self._rewind_state: Optional[dict] = None    # rewind.pt, read once
        self._pretrained: Optional[dict] = None      # --pretrained, as read by _check_inputs (for rewind.pt)

    # ------------------------------------------------------------------ data / model

    @property
    def data(self):
        if self._data is None:
            from .data import load_dataset
            d = self.hp.data
            self._data = load_dataset(d.dataset, d.root, seed=d.split_seed)
        return self._data

    def new_model(self, seed: int) -> nn.Module:
        """The model drawn from ``seed`` (torch's global generator is left as it was). The
        run's own seed is drawn once and copied after that: the runner builds a model per
        level to load weights into, and drawing it costs 5-10x the copy (LeNet 1.6 ms,
        Conv-4 11.6 ms)."""
        if seed == self.hp.model.init_seed:
            if self._template is None:
                self._template = self._draw_model(seed)
            return _copy_model(self._template)
        return self._draw_model(seed)

    def _draw_model(self, seed: int) -> nn.Module:
        from .models import get_model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return get_model(self.hp.model.model, tuple(self.data.input_shape), self.data.num_classes)

    def prunable(self, model: nn.Module) -> Dict[str, Tensor]:
        return prunable_weights(model, include_conv=self.hp.prune.prune_conv)

    def output_layer(self, model: nn.Module) -> str:
        name = getattr(model, "output_layer", None)
        if name is None:  # the last Linear
            name = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
        return name

    # ------------------------------------------------------------------ the run

    def run(self) -> List[dict]:
        rows: List[dict] = []
        for row in self.levels():
            rows.append(row)
        return rows

    def levels(self):
        """Train the run level by level, yielding each level's row once its results are
        written (``run`` collects them). Between two levels nothing of this run is pending,
        so a caller may interleave two runs' levels, as ``bench/bench_imp.py speed`` does
        to expose the sparse run and its dense baseline to the same machine phases."""
        self._check_layer_names()
        self._check_inputs()
        self.dir.mkdir(parents=True, exist_ok=True)
        with _folder_lock(self.dir):
            yield from self._levels_locked()

    def _levels_locked(self):
        self._check_hparams_file()
        # torch.optim.Optimizer's constructor imports torch._dynamo on first use (about 1 s
        # here); like loading the data, that is a cost of the process, not of level 0, so
        # it is paid here, before any level's clock starts, in both baselines
        importlib.import_module("torch._dynamo")
        exp = self.hp.experiment
        if exp.transfer_from:
            plans = [self._transfer_plan]
        elif exp.control != "none":
            plans = self._control_plans()
        else:
            plans = self._imp_plans()
        rows = []
        for plan_fn in plans:
            # the process-wide settings are applied per level, so a run interleaved with this one
            # (bench_imp speed) cannot leave its thread count behind; the allocator setting is
            # one-way ('retain' cannot be undone), which is why both baselines use the same
            if self.hp.run.threads > 0:
                torch.set_num_threads(self.hp.run.threads)
            runtime.set_malloc(self.hp.run.malloc)  # the same for --baseline dense: it changes speed, not results
            with stnn.use_mode(self.hp.run.kernels):
                rows.append(self.train_level(plan_fn()))
            self._write_results(rows)
            yield rows[-1]

    def _check_layer_names(self):
        """--layer-fractions names prunable layers of the model: checked before level 0
        trains, not at the first prune."""
        names = layer_fractions(self.hp.prune.layer_fractions)
        if not names:
            return
        known = set(self.prunable(self.new_model(self.hp.model.init_seed)))
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"sparseticket: --layer-fractions: {', '.join(map(repr, unknown))} "
                             f"{'is not a' if len(unknown) == 1 else 'are not'} prunable layer"
                             f"{'' if len(unknown) == 1 else 's'} of {self.hp.model.model} "
                             f"(its layers: {', '.join(sorted(known))})")

    def _check_inputs(self):
        """What can only be checked against the data or a file, before any folder exists: a
        late-resetting step past the end of level 0's training, a --pretrained file that is
        not a state dict of the model."""
        kind, k = rewind_spec(self.hp.prune.rewind)
        if kind == "iter" and not self.hp.experiment.transfer_from:
            T = self.hp.train.epochs * math.ceil(self.data.train.x.shape[0] / self.hp.data.batch_size)
            if k > T:
                raise ValueError(f"sparseticket: --rewind iter:{k}: level 0 trains {T} steps ({self.hp.train.epochs} "
                                 f"epoch(s) of {T // self.hp.train.epochs}), so it never reaches step {k}")
        if self.hp.model.pretrained and not (self.dir / "rewind.pt").exists():  # (else it is in there)
            self._pretrained = _load_pretrained(self.new_model(self.hp.model.init_seed), self.hp.model.pretrained)

    def _check_hparams_file(self):
        """hparams.json holds the latest command's hyperparameters (its --levels, --threads,
        --kernels...); the fields that define the result must be the folder's. (The
        pretrained file's contents are in the folder's name, so its path may change.)"""
        path = self.dir / "hparams.json"
        if path.exists():
            recorded = IMPHparams.from_dict(json.loads(path.read_text()))
            if recorded.key(contents=False) != self.hp.key(contents=False):
                raise RuntimeError(f"sparseticket: {self.dir} holds a run with other hyperparameters")
        atomic_json(self.hp.to_dict(), path)

    # ------------------------------------------------------------------ IMP levels

    def _levels(self) -> List[int]:
        return [0, 1] if self.hp.prune.one_shot and self.hp.prune.levels > 0 else list(range(self.hp.prune.levels + 1))

    def _imp_plans(self):
        return [lambda level=level: self._imp_plan(level) for level in self._levels()]

    def _rewind(self) -> dict:
        """θ0 (and θk once level 0 has passed step k): created once, then read back (once
        per IMPRun: the state dicts are only read from)."""
        if self._rewind_state is not None:
            return self._rewind_state
        path = self.dir / "rewind.pt"
        if path.exists():
            self._rewind_state = load(path)
            return self._rewind_state
        if self.hp.model.pretrained:
            theta0 = self._pretrained or _load_pretrained(self.new_model(self.hp.model.init_seed),
                                                          self.hp.model.pretrained)
            self._pretrained = None
        else:
            theta0 = {k: v.clone() for k, v in self.new_model(self.hp.model.init_seed).state_dict().items()}
        state = {"init": theta0}
        atomic_save(state, path)
        self._rewind_state = state
        return state

    def _imp_plan(self, level: int) -> LevelPlan:
        name = f"level_{level:02d}"
        ldir = self.dir / name
        ldir.mkdir(exist_ok=True)
        rewind = self._rewind()
        kind, k = rewind_spec(self.hp.prune.rewind)
        mask_path = ldir / "mask.pt"
        prev = self.dir / f"level_{level - 1:02d}"
        if level == 0:
            if mask_path.exists():
                mask = Mask(load(mask_path))
            else:
                mask = Mask.ones_like(self.prunable(self.new_model(self.hp.model.init_seed)))
                atomic_save(mask.state_dict(), mask_path)
        else:
            # A level is pruned from the previous level's final.pt and mask.pt, and with lr
            # rewinding starts from that final.pt: if they change afterwards (that level was
            # trained again, a file was replaced), this level and every later one would go on
            # from stale inputs. pruned_from.json holds their digests, checked on every
            # resume; a folder from before it is pruned again and compared instead.
            record = ldir / "pruned_from.json"
            trained, current = load(prev / "final.pt"), Mask(load(prev / "mask.pt"))
            inputs = {"final": _state_digest(trained), "mask": current.digest()}
            if mask_path.exists() and record.exists():
                recorded = json.loads(record.read_text())
                if {k: recorded.get(k) for k in inputs} != inputs:
                    raise RuntimeError(f"sparseticket: {ldir} was pruned from other weights or masks of {prev.name} "
                                       f"than it holds now ({prev.name} was trained again or its final.pt / mask.pt "
                                       f"changed since {name} was pruned); move {name} and every later level away "
                                       f"to continue from {prev.name}")
                mask = Mask(load(mask_path))
                if mask.digest() != recorded.get("pruned"):
                    raise RuntimeError(f"sparseticket: {mask_path} is not the mask pruned for {name} (the file "
                                       f"changed since); move {name} and every later level away to prune it again")
            else:
                mask = self._prune(trained, current, level)
                if mask_path.exists() and Mask(load(mask_path)).digest() != mask.digest():
                    raise RuntimeError(f"sparseticket: {mask_path} is not what pruning {prev.name}'s final.pt and "
                                       f"mask.pt gives now (a file changed since {name} was pruned, or {prev.name} "
                                       f"was trained again); move {name} and every later level away to continue "
                                       f"from {prev.name}")
                if not mask_path.exists():
                    atomic_save(mask.state_dict(), mask_path)
                atomic_json({**inputs, "pruned": mask.digest()}, record)
        if level == 0:
            return LevelPlan(name, 0, mask, rewind["init"], 0, train=not self.hp.model.pretrained)
        if kind == "lr":
            start = trained  # the previous level's final.pt, read above
        elif kind == "iter" and k > 0:
            done0 = self.dir / "level_00" / "metrics.json"
            if "iter" in rewind:
                start = rewind["iter"]
                own = self.dir / "level_00" / "theta_k.json"  # (absent in folders from before it)
                if own.exists() and json.loads(own.read_text())["iter_digest"] != _state_digest(start):
                    raise RuntimeError(f"sparseticket: {self.dir / 'rewind.pt'} holds another θ{k} than the one "
                                       f"level_00 wrote (a level 0 trained since in a folder moved away wrote "
                                       f"it); move level_00 and every later level away to train them again")
            elif done0.exists() and json.loads(done0.read_text())["steps"] == k:
                start = load(self.dir / "level_00" / "final.pt")  # θT (a run from before it was captured)
            else:
                raise RuntimeError(f"sparseticket: rewinding to iteration {k}, but level 0 never reached it")
        else:
            start = rewind["init"]
        return LevelPlan(name, level, mask, start, k if kind == "iter" else 0)

    def _prune(self, trained: Dict[str, Tensor], current: Mask, level: int) -> Mask:
        p = self.hp.prune
        model = self.new_model(self.hp.model.init_seed)
        model.load_state_dict(trained)
        weights = self.prunable(model)
        overrides = layer_fractions(p.layer_fractions)
        out_name = self.output_layer(model)
        if out_name in weights and out_name not in overrides:
            overrides[out_name] = p.output_fraction if p.output_fraction is not None else p.fraction / 2
        fraction = p.fraction
        if p.one_shot:  # all levels at once: keep (1 - f)^levels of every layer
            fraction = 1 - (1 - fraction) ** p.levels
            overrides = {n: 1 - (1 - f) ** p.levels for n, f in overrides.items()}
        strategy = get_strategy(p.strategy, fraction=fraction, scope=p.scope, overrides=overrides,
                                **({"seed": self.hp.model.init_seed + level} if p.strategy == "random" else {}))
        return strategy.prune(weights, current)

    # ------------------------------------------------------------------ controls, transfer

    def main_run(self) -> "IMPRun":
        return IMPRun(self.hp.replace(control="none"))

    def _control_plans(self):
        main = self.main_run()
        say(f"[{self.hp.experiment.control}] needs the main run {main.dir.name}: running/resuming it first")
        main.run()
        return [lambda level=level: self._control_plan(main, level) for level in main._levels()[1:]]

    def _control_plan(self, main: "IMPRun", level: int) -> LevelPlan:
        """The control of the main run's level: trained from the step the ticket starts at
        (K under --rewind iter:K, else 0), for as many steps. random_reinit: the ticket's
        mask on fresh weights from the init distribution. random_prune: a random mask with
        the ticket's kept count per layer on the weights the ticket starts from (θ0, θK);
        under --rewind lr, where a ticket goes on from its previous level's trained weights,
        the control goes on from its own: a random mask inside its previous level's mask,
        on its previous level's trained weights (level 1: the main run's trained level 0)."""
        name = f"level_{level:02d}"
        (self.dir / name).mkdir(exist_ok=True)
        ticket = main._imp_plan(level)  # the main run's level, its files checked as on a resume
        if self.hp.experiment.control == "random_reinit":
            start = self.new_model(self.hp.model.init_seed + 7919 * (level + 1)).state_dict()
            return LevelPlan(name, level, ticket.mask, start, ticket.first_step)
        start, within = ticket.start, Mask.ones_like(ticket.mask)
        if rewind_spec(self.hp.prune.rewind)[0] == "lr" and level > 1:
            prev = self.dir / f"level_{level - 1:02d}"
            start, within = load(prev / "final.pt"), Mask(load(prev / "mask.pt"))
        mask = RandomPruning(seed=self.hp.model.init_seed + level).prune_like(within, ticket.mask)
        return LevelPlan(name, level, mask, start, ticket.first_step)

    def _transfer_plan(self) -> LevelPlan:
        exp = self.hp.experiment
        src_dir = Path(exp.transfer_from)
        if not (src_dir / "hparams.json").exists():
            raise FileNotFoundError(f"sparseticket: --transfer-from {src_dir}: not a run folder (no hparams.json)")
        target = self.new_model(self.hp.model.init_seed)
        out_name = self.output_layer(target)
        weights = self.prunable(target)
        # the source level is chosen once and recorded: a resumed transfer (or one whose level
        # is done) keeps it even if the source run has finished more levels since
        (self.dir / "level_00").mkdir(exist_ok=True)
        record, recorded = self.dir / "level_00" / "transfer.json", self.dir / "level_00" / "mask.pt"
        if record.exists():
            lname = json.loads(record.read_text())["source_level"]
        else:
            finished = [f"level_{i:02d}" for i in _finished_levels(src_dir)]
            if not finished:
                raise RuntimeError(f"sparseticket: --transfer-from {src_dir}: no finished level")
            if exp.transfer_level < -len(finished):
                raise RuntimeError(f"sparseticket: --transfer-level {exp.transfer_level}: the source {src_dir} has "
                                   f"{len(finished)} finished level(s)")
            lname = finished[exp.transfer_level] if exp.transfer_level < 0 else f"level_{exp.transfer_level:02d}"
            if recorded.exists():
                # a transfer started before the record existed: the source level it took is
                # the one whose mask it recorded (the flags' choice first, if that matches)
                want = Mask(load(recorded)).digest()
                matches = [name for name in finished if _transfer_mask(
                    Mask(load(src_dir / name / "mask.pt")), weights, out_name)[0].digest() == want]
                if not matches:
                    raise RuntimeError(f"sparseticket: {recorded} matches no finished level of the transfer source "
                                       f"{src_dir}; move {recorded.parent} away to start the transfer again")
                lname = lname if lname in matches else matches[-1]
        if not (src_dir / lname / "metrics.json").exists():
            raise RuntimeError(f"sparseticket: --transfer-from {src_dir}: level {lname} is not finished")
        masks, new_head = _transfer_mask(Mask(load(src_dir / lname / "mask.pt")), weights, out_name)
        if exp.transfer_init == "source":
            source = load(src_dir / lname / "final.pt")
        elif exp.transfer_init == "init":
            source = load(src_dir / "rewind.pt")["init"]
        else:  # a fresh draw: not init_seed's, which is the source's θ0 whenever the seeds agree
            source = self.new_model(self.hp.model.init_seed + TRANSFER_RANDOM_SEED_OFFSET).state_dict()
        start = {k: v.clone() for k, v in target.state_dict().items()}
        for key, value in source.items():  # everything but a re-shaped head carries over
            if key in start and start[key].shape == value.shape:
                start[key] = value.clone()
        if new_head:  # (another number of classes): freshly initialised
            for key in (f"{out_name}.weight", f"{out_name}.bias"):
                if key in start:
                    start[key] = target.state_dict()[key].clone()
        if not record.exists():
            atomic_json({"source": str(src_dir), "source_level": lname}, record)
        source_level = int(lname[len("level_"):])
        latest = _finished_levels(src_dir)
        if exp.transfer_level < 0 and len(latest) >= -exp.transfer_level:
            now = latest[exp.transfer_level]
            if now != source_level:
                say(f"[transfer] this transfer took the source's level {source_level} (--transfer-level "
                    f"{exp.transfer_level} when it started); the source has finished more levels since, and "
                    f"--transfer-level {now} transfers the one it names now")
        trainable = (lambda p: p.startswith(out_name + ".")) if exp.freeze_features else None
        return LevelPlan("level_00", 0, masks, start, 0, trainable=trainable, source_level=source_level)

    # ------------------------------------------------------------------ build a level's model

    def build(self, plan: LevelPlan) -> nn.Module:
        model = self.new_model(self.hp.model.init_seed)
        model.load_state_dict(plan.start)
        with torch.no_grad():
            for name, m in model.named_modules():
                if name in plan.mask:
                    m.weight.mul_(plan.mask[name].to(m.weight.dtype))
        pruned = {n: m for n, m in plan.mask.items() if not bool(m.all())}
        if self.sparse and pruned:
            # Linear/Conv2d+ReLU as one node (the same numbers); not with NEq, which measures the
            # layers' pre-activation outputs
            stnn.sparsify(model, masks=pruned, mode="auto", fuse_relu=not self.hp.neq.neq)
        if plan.trainable is not None:
            for n, p in model.named_parameters():
                p.requires_grad_(plan.trainable(n))
        return model

    def optimizer(self, model: nn.Module):
        t = self.hp.train
        params = [p for p in model.parameters() if p.requires_grad]
        if self.sparse:
            if t.optimizer == "sgd":
                return MaskedSGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
            return MaskedAdamW(params, lr=t.lr, betas=(t.momentum, 0.999), weight_decay=t.weight_decay)
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, foreach=True)
        return torch.optim.AdamW(params, lr=t.lr, betas=(t.momentum, 0.999), weight_decay=t.weight_decay,
                                 foreach=True)

    def lr_at(self, step: int, steps_per_epoch: int) -> float:
        t = self.hp.train
        passed = sum(1 for m in milestones(t.milestones) if step >= m * steps_per_epoch)
        return t.lr * t.gamma ** passed

    # ------------------------------------------------------------------ train one level

    def train_level(self, plan: LevelPlan) -> dict:
        ldir = self.dir / plan.name
        done = ldir / "metrics.json"
        if done.exists():
            row = json.loads(done.read_text())
            self._print_level(row, resumed=True)
            return row
        data, hp = self.data, self.hp  # loaded before the clock starts: both baselines share it
        t_level = time.perf_counter()
        train_x, train_y = data.train.x, data.train.y
        n = train_x.shape[0]
        bs = hp.data.batch_size
        S = math.ceil(n / bs)
        T = hp.train.epochs * S if plan.train else 0
        if plan.first_step > T:
            raise ValueError(f"sparseticket: rewind iteration {plan.first_step} is past the end of training ({T})")

        digest = plan.mask.digest()
        if not (ldir / "mask.pt").exists():  # controls and transfers record what they trained too
            atomic_save(plan.mask.state_dict(), ldir / "mask.pt")
        elif Mask(load(ldir / "mask.pt")).digest() != digest:
            raise RuntimeError(f"sparseticket: {ldir / 'mask.pt'} is not the mask this level computes now from "
                               f"its inputs (the previous level, the main run or the transfer source changed "
                               f"since the level started); move {ldir} away to train the level again")
        model = self.build(plan)
        ckpt_path = ldir / "checkpoint.pt"
        state = load(ckpt_path) if ckpt_path.exists() else None
        if state is not None and state.get("mask_digest", digest) != digest:  # (written before digests: unchecked)
            raise RuntimeError(f"sparseticket: {ckpt_path} was written for another mask than {ldir / 'mask.pt'} "
                               f"(was the mask file changed?); move {ldir} away to train the level again")
        tracker = self._neq_tracker(model, state) if plan.train else None
        pinned = ldir / "modes.json"  # the level's kernel choice, written when it starts
        record = json.loads(pinned.read_text()) if pinned.exists() else None
        if state is not None:
            _set_modes(model, state["modes"])
            step, log, setup_s = state["step"], state["log"], state["setup_seconds"]
            evidence = state.get("mode_evidence", {})
        else:
            step, log = plan.first_step, []
            setup_s = 0.0
            # the kernel choice is part of the level's state (another path rounds
            # differently): written before training, so that a level killed before its
            # first checkpoint resumes with the choice it started with, not a new measurement
            if record is not None and record.get("mask_digest") == digest:
                _set_modes(model, record["modes"])
                evidence = record["mode_evidence"]
            else:
                evidence = _pin_modes(model, train_x[:bs], self._previous_choice(plan)) if self.sparse else {}
                record = {"mask_digest": digest, "modes": _modes(model), "mode_evidence": evidence,
                          "kernels": hp.run.kernels}
                atomic_json(record, pinned)
        modes = _modes(model)
        # the --kernels the level's choice was made under (older folders' modes.json: this command's)
        kernels = (record or {}).get("kernels") or hp.run.kernels
        # (not with NEq: its layers register their own masks, and a plain layer's keep mask with them)
        # (a checkpoint that holds a ticket for such a layer, written before this existed, resumes it as a ticket)
        held = {k[:-len(".weight_values")] for k in state["model"] if k.endswith(".weight_values")} if state else set()
        plain = _plain_dense_path(model, skip=held) if self.sparse and plan.train and tracker is None else {}
        if state is None:
            setup_s = time.perf_counter() - t_level
        opt = self.optimizer(model) if plan.train else None
        masker = None if self.sparse else _DenseMasker(model, plan.mask, tracker, opt)
        if state is not None:
            _load_checkpoint_model(model, state["model"])
            if opt is not None:
                opt.load_state_dict(state["optimizer"])
        rewind_kind, rewind_k = rewind_spec(hp.prune.rewind)
        capture_k = (plan.level == 0 and rewind_kind == "iter" and rewind_k > 0 and hp.experiment.control == "none"
                     and not hp.experiment.transfer_from)

        # the sparse MLPs' gradients without autograd (bit-identical; any other model, and
        # the steps the FLOP counter watches, take the autograd path inside MLPStep)
        fast = stnn.MLPStep(model) if self.sparse and plan.train else None
        counter = FlopCounter(model)
        bar = _Progress(hp.run.progress, T - plan.first_step, f"{self.dir.name[:24]} {plan.name}",
                        initial=step - plan.first_step)
        epoch_counts: Optional[Dict[int, dict]] = None  # batch size -> FLOPs of one step (see below)
        # checkpoints every hp.run.checkpoint_every seconds, not every epoch: a LeNet epoch
        # takes ~50 ms and its checkpoint (2 MB, fsynced) ~2.6 ms, 7% of the accelerated run
        last_save = time.perf_counter()
        while step < T:
            epoch = step // S
            t0 = time.perf_counter()
            _train_mode(model)  # (each epoch: the evaluation passes leave train() behind them)
            lr = self.lr_at(step, S)
            for g in opt.param_groups:
                g["lr"] = lr
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(hp.train.data_seed * 1000003 + epoch))
            losses = []
            # FLOPs are read from what the layers dispatch on the first step of each batch
            # size and multiplied out: modes are pinned for the level and masks fixed, so
            # every other step of that size does the same work; with NEq, whose frozen
            # sets change between epochs, the first step of each size in each epoch. A step
            # that creates a momentum buffer is cheaper (no buffer to update), so it is
            # counted on its own and never stands for the others: every step taken while
            # some parameter still lacks its buffer is counted, and it is such a step if the
            # optimizer's buffers grew (a parameter whose first gradient comes late, or never,
            # keeps the counter on until then).
            sizes: Dict[int, int] = {}
            once: List[Dict[str, Dict[str, float]]] = []
            if tracker is not None or epoch_counts is None:
                epoch_counts = {}
            sampled = epoch_counts
            # (within an epoch nothing changes the model or the optimizer but the steps
            # themselves and the counted steps' FLOP hooks, which take fast.step)
            with _neq_cuts(model, tracker if self.sparse else None, prefix=hp.train.optimizer == "sgd"), \
                    (fast.fixed(opt) if fast is not None else contextlib.nullcontext()) as fixed_step:
                for b in range(step - epoch * S, S):
                    if capture_k and step == rewind_k:
                        self._save_iter_rewind(model)
                    idx = perm[b * bs:(b + 1) * bs]
                    x, y = train_x.index_select(0, idx), train_y.index_select(0, idx)
                    maybe_cold = not _momentum_ready(opt)
                    buffers = _momentum_buffers(opt) if maybe_cold else 0
                    count = maybe_cold or idx.numel() not in sampled
                    if count:
                        counter.reset()
                        counter.start()
                    if fast is not None:  # (its step applies each layer's update right after its backward)
                        loss = fast.step(x, y, opt) if count else fixed_step(x, y)
                    else:
                        loss = F.cross_entropy(model(x), y)
                        opt.zero_grad(set_to_none=True)
                        if loss.requires_grad:  # not when freeze_prefix froze every layer
                            loss.backward()
                        if masker is not None:
                            masker.before_step()
                        opt.step()
                        if masker is not None:
                            masker.after_step()
                    cold = maybe_cold and _momentum_buffers(opt) != buffers
                    if count:
                        counter.stop()
                        if cold:
                            once.append(counter.totals())
                        else:
                            sampled[idx.numel()] = counter.totals()
                    if not cold:
                        sizes[idx.numel()] = sizes.get(idx.numel(), 0) + 1
                    step += 1
                    losses.append(loss.detach())
                    bar.update(1)
            train_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            frozen = None
            if tracker is not None:
                frozen = tracker.step()["total"]
            neq_s = time.perf_counter() - t1
            val_acc = evaluate(model, data.val.x, data.val.y, hp.train.eval_batch_size)
            entry = dict(epoch=epoch, step=step, lr=lr, loss=float(torch.stack(losses).mean()) if losses else None,
                         val_acc=val_acc, train_seconds=train_s, neq_seconds=neq_s, frozen=frozen,
                         threads=torch.get_num_threads(),
                         flops=_sum_flops([_scale_flops(sampled, sizes)] + once), seconds=time.perf_counter() - t0)
            log.append(entry)
            if step >= T or time.perf_counter() - last_save >= hp.run.checkpoint_every:
                atomic_save(dict(model=_checkpoint_model(model), mask_digest=digest, optimizer=opt.state_dict(),
                                 step=step, log=log, modes=modes, mode_evidence=evidence, setup_seconds=setup_s,
                                 neq=None if tracker is None else tracker.state_dict()), ckpt_path)
                last_save = time.perf_counter()
            log[-1]["seconds"] = time.perf_counter() - t0  # the checkpoint write is part of the run's cost
        bar.close()
        if capture_k and step == rewind_k:  # θK with K the last step: after the last batch
            self._save_iter_rewind(model)

        t_eval = time.perf_counter()
        row = self._finish_level(plan, model, log, modes, setup_s, evidence, kernels, plain)
        row["eval_seconds"] = time.perf_counter() - t_eval
        row["seconds"] = setup_s + sum(e["seconds"] for e in log) + row["eval_seconds"]
        atomic_json(row, done)
        self._print_level(row)
        return row

    def _neq_tracker(self, model: nn.Module, state):
        """The level's NEq tracker (None without --neq); restored from the checkpoint if any."""
        q = self.hp.neq
        if not q.neq:
            return None
        cfg = NEqConfig(eps=q.neq_eps, mu_eq=q.neq_mu, rule=q.neq_rule, val_size=q.neq_val_size,
                        modules=lambda n, m: isinstance(m, (nn.Linear, nn.Conv2d, stnn.TicketModule)))
        if self.sparse:
            stnn.enable_neq(model)
            tracker = NEqTracker(model, self.data.val.x, cfg, baseline=state is None)
            if state is not None and state.get("neq") is not None:
                tracker.load_state_dict(state["neq"], apply=True)
            return tracker
        return _DenseNEq(model, self.data.val.x, cfg, state)

    def _previous_choice(self, plan: LevelPlan) -> Dict[str, Tuple[str, Optional[list]]]:
        """Per layer, the mode the previous level of this IMP run pinned and the measurement
        behind it (see _pin_modes); empty at level 0, for controls and transfers."""
        if plan.level == 0 or self.hp.experiment.control != "none" or self.hp.experiment.transfer_from:
            return {}
        prev = self.dir / f"level_{plan.level - 1:02d}" / "metrics.json"
        if not prev.exists():
            return {}
        m = json.loads(prev.read_text())
        evidence = m.get("mode_evidence") or {}
        return {n: (mode, evidence.get(n)) for n, mode in m.get("modes", {}).items()}

    def _save_iter_rewind(self, model: nn.Module) -> None:
        """θK into rewind.pt whenever level 0 trains through step K: a resumed level 0 writes
        the same weights again, a level 0 trained anew (its folder moved away) its own."""
        path = self.dir / "rewind.pt"
        state = load(path)
        state["iter"] = _dense_state(model)
        atomic_save(state, path)
        self._rewind_state = state
        # which θK this level 0 wrote: the levels after it check rewind.pt against it, so a
        # level 0 trained anew and then thrown away (its θK left in rewind.pt) is caught
        atomic_json({"iter_digest": _state_digest(state["iter"])}, self.dir / "level_00" / "theta_k.json")

    def _finish_level(self, plan: LevelPlan, model: nn.Module, log: List[dict], modes: dict, setup_s: float,
                      evidence: dict, kernels: str, plain: Optional[Dict[str, Tensor]] = None) -> dict:
        ldir = self.dir / plan.name
        data, bs = self.data, self.hp.train.eval_batch_size
        train_acc = evaluate(model, data.train.x, data.train.y, bs)
        test_acc = evaluate(model, data.test.x, data.test.y, bs)
        row = dict(run=self.dir.name, baseline=self.hp.experiment.baseline, control=self.hp.experiment.control,
                   transfer=bool(self.hp.experiment.transfer_from), source_level=plan.source_level, level=plan.level,
                   remaining=100.0 * plan.mask.density, layer_remaining={n: 100.0 * d for n, d in
                                                                         plan.mask.layer_density().items()},
                   train_acc=train_acc, test_acc=test_acc, val_acc=log[-1]["val_acc"] if log else None,
                   epochs=len(log), first_step=plan.first_step, steps=log[-1]["step"] if log else 0,
                   setup_seconds=setup_s,
                   train_seconds=sum(e["train_seconds"] for e in log), modes=modes, mode_evidence=evidence,
                   flops=_sum_flops([e["flops"] for e in log]),
                   neq_frozen=log[-1]["frozen"] if log else None,
                   # RUN_ONLY settings (not in the folder's hash): the thread counts its epochs
                   # trained with ('1,2' if a resume changed it) and the --kernels its kernel
                   # choice was made under (fixed when the level starts; per layer: modes)
                   threads=_threads(log), kernels=kernels)
        # the ticket as sparseticket stores it: layers trained as plain ones (_plain_dense_path) back in compact form
        ticket = stnn.sparsify(_copy_model(model), masks=plain, mode="dense") if plain else model
        if self.sparse:
            path = ldir / "ticket.safetensors"
            try:
                stnn.save_safetensors(ticket, str(path) + ".tmp", metadata={"level": str(plan.level)})
                res.replace_synced(str(path) + ".tmp", path)
                row["ticket_file_bytes"] = path.stat().st_size
            except ImportError:
                row["ticket_file_bytes"] = None
        row.update(res.ticket_bytes(ticket))
        if plain:  # as training held them: the dense weights and their keep masks
            row["memory_bytes"] = (res.ticket_bytes(model)["memory_bytes"]
                                   + sum(k.numel() * k.element_size() for k in plain.values()))
        total = row["flops"].get("all", {"dense": 0.0, "executed": 0.0})
        row["flops_dense"], row["flops_executed"] = total["dense"], total["executed"]
        atomic_save(_dense_state(model), ldir / "final.pt")
        return row

    # ------------------------------------------------------------------ output

    def _print_level(self, row: dict, resumed: bool = False) -> None:
        modes = ", ".join(f"{n}:{m[0]}" for n, m in row["modes"].items()) or "all dense"
        say(f"{row['run'][:28]:28s} level {row['level']:2d}  remaining {row['remaining']:6.2f}%  "
            f"test {100 * row['test_acc']:5.2f}%  train {100 * row['train_acc']:5.2f}%  "
            f"{row['seconds']:7.2f} s  FLOPs {_ratio(row.get('flops_executed'), row.get('flops_dense'))} of dense  "
            f"[{modes}]" + ("  (done earlier)" if resumed else ""))

    def _write_results(self, rows: List[dict]) -> None:
        # with fewer --levels than the folder has finished, the later levels stay listed
        top = max((r["level"] for r in rows), default=-1)
        later = [json.loads(m.read_text()) for level, m in _metrics_files(self.dir).items()
                 if level > top]  # (read only those: not every level's again)
        rows = sorted(rows + later, key=lambda r: r["level"])
        rows = [{**r, "run": self.dir.name} for r in rows]  # (levels finished under a folder's old name)
        res.write_rows(rows, self.dir / "results")
        if not self.hp.run.plots:
            return
        res.plot_run(self.dir)
        if self.hp.experiment.control != "none":  # the papers' figure: the tickets next to the control
            main = self.main_run()
            res.plot_accuracy({"IMP (rewound tickets)": res.read_rows(main.dir), self.hp.experiment.control: rows},
                              self.dir / "accuracy_with_control.png", f"{self.hp.model.model} on {self.hp.data.dataset}")


# ---------------------------------------------------------------------- helpers


def _adopt_legacy_folder(hp: IMPHparams, new: Path) -> None:
    """A folder named before session 30 that holds this experiment (its hash covered
    --levels and the --pretrained path) is renamed to the experiment's present name, so
    this command and every later one, with any --levels, go on in it. Where several do,
    the one with the most finished levels. Not for --pretrained runs (the old name does not
    vouch for the file's contents) nor for controls with --rewind other than init (their
    definition changed in session 30: the levels would mix two kinds of control)."""
    if hp.model.pretrained or (hp.experiment.control != "none" and hp.prune.rewind != "init"):
        return
    prefix, key = hp.run_name().rsplit("_", 1)[0], hp.key(contents=False)
    found = []
    for folder in Path(hp.run.out).glob(f"{prefix}_*"):
        if folder.is_symlink():  # (an old name left pointing at an adopted folder)
            continue
        try:
            recorded = IMPHparams.from_dict(json.loads((folder / "hparams.json").read_text()))
            legacy = folder.name == recorded.run_name(legacy=True)
            if legacy and recorded.key(contents=False) == key:
                found.append((len(_finished_levels(folder)), folder.name, folder))
        except Exception:  # (any folder that is not a readable run of this kind: not ours)
            continue
    if not found:
        return
    old = max(found)[2]
    try:
        with _folder_lock(old):  # (not while a process of an older version runs it)
            if new.exists():  # another process adopted one meanwhile
                return
            # the old name stays, as a link: transfers record their source's path. The name
            # is written into the folder first, so that a process killed between the rename
            # and the link leaves what the next command needs to make the link.
            atomic_json({"name": old.name}, old / LEGACY_NAME)
            os.rename(old, new)
            _link_legacy_name(new)
    except FileNotFoundError:  # another process adopted it meanwhile
        return
    others = sorted(f.name for _, _, f in found if f != old)
    say(f"continuing {old.name} (named before session 30) as {new.name}, linked from the old name"
        + (f"; also of this experiment, left as they are: {', '.join(others)}" if others else ""))


#: In a folder adopted from a pre-session-30 name: that name (a link to the folder is kept there)
LEGACY_NAME = "legacy_name.json"


def _link_legacy_name(folder: Path) -> None:
    """The link from an adopted folder's old name, made again if it is missing (the process
    that renamed the folder died before making it)."""
    try:
        name = str(json.loads((folder / LEGACY_NAME).read_text())["name"])
    except (OSError, ValueError, KeyError, TypeError):  # none (the usual case), or not readable
        return
    link = folder.parent / name
    if name not in ("", ".", "..") and "/" not in name and not os.path.lexists(link):
        try:
            os.symlink(folder.name, link, target_is_directory=True)
        except FileExistsError:  # another process made it meanwhile
            pass


def _metrics_files(run_dir: Path) -> Dict[int, Path]:
    """{level: its metrics.json} for a run folder's finished levels."""
    return {int(m.parent.name[len("level_"):]): m for m in Path(run_dir).glob("level_*/metrics.json")}


def _finished_levels(run_dir: Path) -> List[int]:
    """The numbers of a run folder's finished levels (those with a metrics.json), in order."""
    return sorted(_metrics_files(run_dir))


def _threads(log: List[dict]):
    counts = sorted({e.get("threads", torch.get_num_threads()) for e in log}) or [torch.get_num_threads()]
    return counts[0] if len(counts) == 1 else ",".join(map(str, counts))


def _train_mode(model: nn.Module) -> None:
    """model.train(), except batch-norm layers whose parameters are all frozen (a transfer
    with --freeze-features): those keep their running statistics, as frozen features must
    (in training mode they would normalise with the batch's and re-estimate them on the
    target task)."""
    model.train()
    if all(p.requires_grad for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        # the predictions compared once at the end: per batch, the compare, sum and int()
        # cost ~50 us, a quarter of a 3%-dense LeNet's evaluation
        preds = [model(x[i:i + batch_size]).argmax(1) for i in range(0, x.shape[0], batch_size)]
        correct = int((torch.cat(preds) == y).sum()) if preds else 0
    model.train(was)
    return correct / max(1, x.shape[0])


def _plain_dense_path(model: nn.Module, skip=()) -> Dict[str, Tensor]:
    """Each SparseLinear / SparseConv2d pinned to its dense path becomes, in place, the plain
    nn.Linear / nn.Conv2d it stands for (the masked dense weight), its keep mask registered
    with the masked optimizers, which then keep its pruned weights at exactly 0; a fused
    ReLU goes back to the nn.ReLU after it (one a max-pool applies, ``relu_after``, stays
    there, with its FusedReLU placeholder). The dense path runs the same products on the
    same weight, so the level trains bit for bit as before, but without materialising the
    weight from the ticket and compressing its gradient back at every step and every
    evaluation batch (in situ on the Intel Xeon, LeNet-300-100's 80% level: ~725 -> ~650 us
    a step with MLPStep and MaskedSGD; docs/PERF_LOG.md, session 19). Layers with frozen
    neurons, or a fused activation not followed by its FusedReLU in an nn.Sequential, stay.
    Layers named in ``skip`` stay too. Returns {name: keep mask} of the layers replaced."""
    names = {id(m): n for n, m in model.named_modules()}
    done: Dict[int, nn.Module] = {}
    keeps: Dict[str, Tensor] = {}
    for parent in list(model.modules()):
        keys = list(parent._modules)
        for i, key in enumerate(keys):
            child = parent._modules[key]
            if not isinstance(child, (stnn.SparseLinear, stnn.SparseConv2d)):
                continue
            if id(child) not in done:
                if (_mode.resolve(child.mode) != "dense" or child._buffers.get("active") is not None
                        or names[id(child)] in skip):
                    continue
                nxt = parent._modules[keys[i + 1]] if i + 1 < len(keys) else None
                if child.activation is not None and not (isinstance(parent, nn.Sequential)
                                                         and isinstance(nxt, stnn.FusedReLU)):
                    continue
                keep = child.mask()
                dense = child.to_dense()
                stnn.register_param(dense.weight, keep=lambda k=keep: k)
                done[id(child)] = dense
                keeps[names[id(child)]] = keep
            if child.activation is not None:
                parent._modules[keys[i + 1]] = nn.ReLU()
            parent._modules[key] = done[id(child)]
    return keeps


def _state_digest(sd: Dict[str, Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and values (not of its file: torch.save
    writes a fresh serialization id each time, so equal weights saved twice differ in bytes)."""
    import hashlib
    h = hashlib.sha256()
    for k in sorted(sd):
        v = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _transfer_mask(src_mask: Mask, weights: Dict[str, Tensor], out_name: str) -> Tuple[Mask, bool]:
    """The target's masks from a source run's: each layer's where the shapes agree, and a
    dense one for a head of another shape; and whether there is such a new head."""
    masks, new_head = {}, False
    for n, w in weights.items():
        if n in src_mask and tuple(src_mask[n].shape) == tuple(w.shape):
            masks[n] = src_mask[n]
        elif n == out_name:
            masks[n] = torch.ones(w.shape, dtype=torch.bool)
            new_head = True
        else:
            raise ValueError(f"sparseticket: transfer: layer '{n}' has shape {tuple(w.shape)} here but "
                             f"{None if n not in src_mask else tuple(src_mask[n].shape)} in the source run")
    return Mask(masks), new_head


def _copy_model(model: nn.Module) -> nn.Module:
    import copy
    return copy.deepcopy(model)


# A ticket's index buffers: the level's mask.pt determines them (the level's model is
# built from it), so the per-epoch checkpoint leaves them out: at 80% of LeNet's weights
# they were two thirds of its bytes, and its write (fsync included) is paid every epoch.
_TICKET_INDEX_BUFFERS = ("crow", "col", "ccol", "row", "perm")


def _index_keys(model: nn.Module) -> set:
    return {f"{n}.{b}" if n else b for n, m in model.named_modules() if isinstance(m, stnn.TicketModule)
            for b in _TICKET_INDEX_BUFFERS}


def _checkpoint_model(model: nn.Module) -> Dict[str, Tensor]:
    """``model.state_dict()`` without its tickets' index buffers (see _TICKET_INDEX_BUFFERS)."""
    skip = _index_keys(model)
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def _load_checkpoint_model(model: nn.Module, sd: Dict[str, Tensor]) -> None:
    """Load what _checkpoint_model saved (or a full state dict) into the level's freshly
    built model: index buffers the checkpoint lacks are the model's own, built from the
    same mask; a values tensor whose length disagrees with them fails loading."""
    own = model.state_dict()
    stnn.load_state_dict(model, {**{k: own[k] for k in _index_keys(model) if k not in sd and k in own}, **sd})


def _dense_state(model: nn.Module) -> Dict[str, Tensor]:
    """The plain dense state dict (masked weights) of a model with sparse layers or not."""
    if not any(isinstance(m, stnn.TicketModule) for m in model.modules()):
        return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(".active")}
    import copy
    dense = stnn.densify(copy.deepcopy(model))
    return {k: v.detach().clone() for k, v in dense.state_dict().items() if not k.endswith(".active")}


def _ratio(a, b) -> str:
    return f"{100 * a / b:5.1f}%" if a is not None and b else "    -"


def _momentum_ready(opt: torch.optim.Optimizer) -> bool:
    """Whether every parameter that takes momentum already has its buffer."""
    for g in opt.param_groups:
        if float(g.get("momentum", 0)) != 0:
            for p in g["params"]:
                if p.requires_grad and "momentum_buffer" not in opt.state.get(p, ()):
                    return False
    return True


def _momentum_buffers(opt: torch.optim.Optimizer) -> int:
    """How many parameters have a momentum buffer."""
    return sum(1 for g in opt.param_groups if float(g.get("momentum", 0)) != 0 for p in g["params"]
               if "momentum_buffer" in opt.state.get(p, ()))


def _scale_flops(sampled: Dict[int, dict], sizes: Dict[int, int]) -> Dict[str, Dict[str, float]]:
    """{kind: {dense, executed}} of an epoch from one counted step per batch size."""
    return _sum_flops([{kind: {k: n * x for k, x in v.items()} for kind, v in sampled[size].items()}
                       for size, n in sizes.items()])


def _sum_flops(parts: List[Dict[str, Dict[str, float]]]) -> Dict[str, Dict[str, float]]:
    out: Dict[str, Dict[str, float]] = {}
    for part in parts:
        for kind, v in part.items():
            o = out.setdefault(kind, {"dense": 0.0, "executed": 0.0})
            o["dense"] += v["dense"]
            o["executed"] += v["executed"]
    return out


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """One process at a time in a run folder: two would train the same levels and write the
    same files (a --control started while its main run still trains, a command run twice).
    An advisory lock on <folder>/.lock (fcntl.flock; where there is none, no lock), held
    while the run's levels are produced and released when the process dies."""
    try:
        import fcntl
    except ImportError:  # (not POSIX)
        yield
        return
    f = open(folder / ".lock", "a+")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RuntimeError(f"sparseticket: the run folder {folder} is in use by {holder}; wait for it to "
                               f"finish (rerunning the command then resumes or reuses the run)") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()}\n")
        f.flush()
        yield
    finally:
        f.close()  # (closing releases the lock)


def _modes(model: nn.Module) -> Dict[str, str]:
    return {n: m.mode for n, m in model.named_modules() if isinstance(m, stnn.TicketModule)}


def _set_modes(model: nn.Module, modes: Dict[str, str]) -> None:
    for n, m in model.named_modules():
        if n in modes:
            m.mode = modes[n]


#: a layer the previous level measured stays dense without a new measurement when its
#: sparse time, scaled by the drop in kept weights, still exceeds the dense time by this
#: factor (sparse kernel time is about proportional to the kept weights)
CLEARLY_DENSE = 1.3
# Density at or above which a layer runs dense without being measured: no sparse kernel here
# has beaten dense at 75-80% on a layer that matters for time (LeNet's fc1 / fc2 at 80%
# tie with MLPStep; Conv-4's 64-128 channel convs lose at 80%, docs/PERF_LOG.md, session 6)
DENSE_WITHOUT_MEASURING = 0.75
#: _pin_modes measures convolutions on this many images of the batch: their time grows
#: with the batch and the ratio of the two paths hardly moves (Conv-4 at 41-64% kept,
#: 16 images against 64: the convs' ratios within 0.00-0.13, the choices the same except
#: for layers at the threshold, which flip either way between runs; `python
#: bench/ab_pin_modes.py`, docs/PERF_LOG.md, session 23), while measuring a Conv-4 level's
#: layers on 64 images took ~1 s, a tenth of a sparse level (0.4 s this way)
CONV_MEASURE_BATCH = 16


def _pin_modes(model: nn.Module, x: Tensor, previous: Optional[Dict[str, Tuple[str, Optional[list]]]] = None
               ) -> Dict[str, list]:
    """Measure each sparse layer's sparse vs dense path once on a real batch (training
    shapes, gradients on), then force the winner for the whole level: the choice is then
    part of the level's state, so a resumed level runs the same kernels. Returns, per
    layer, the measurement its choice rests on: [sparse s, dense s, density when measured].

    ``previous`` (the previous, denser level of this run: mode and measurement per layer)
    spares measurements whose outcome is known: a layer that ran sparse stays sparse (a
    sparser ticket cannot make the dense path win), and one whose measured sparse time,
    scaled down by its new density, is still CLEARLY_DENSE times the dense time stays
    dense. Measuring costs ~0.1 s per LeNet layer and 0.3-0.4 s per Conv-4 layer (2.1-2.8 s
    for Conv-4's seven at 64-80% density, a tenth of such a level): a layer that keeps at
    least DENSE_WITHOUT_MEASURING of its weights is pinned dense without measuring, and
    convolutions are measured on CONV_MEASURE_BATCH images of the batch (the other layers
    on all of it)."""
    previous = previous or {}
    evidence: Dict[str, list] = {}
    for name, m in model.named_modules():
        if isinstance(m, stnn.TicketModule) and _mode.resolve(m.mode) is None and m.density >= DENSE_WITHOUT_MEASURING:
            m.mode = "dense"
    for name, m in model.named_modules():
        if not isinstance(m, stnn.TicketModule) or name not in previous:
            continue
        mode, ev = previous[name]
        if mode == "sparse":
            m.mode = _mode.resolve(m.mode) or "sparse"
        elif ev is not None and ev[0] * m.density / max(ev[2], 1e-12) > CLEARLY_DENSE * ev[1]:
            m.mode = _mode.resolve(m.mode) or "dense"
        else:
            continue
        if ev is not None:
            evidence[name] = ev
    was = model.training
    model.eval()  # BatchNorm must not update its running statistics on this pass
    saved = dict(_mode.MEASURE)
    # the choice holds for a whole level: spend up to 60 ms per layer on it, not 20 ms
    # (with 20 ms a noisy machine made LeNet's fc1 pick the sparse path at 80% density)
    _mode.MEASURE.update(budget_s=0.06, max_reps=41)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, stnn.TicketModule)]
    convs = [(n, m) for n, m in layers if isinstance(m, stnn.SparseConv2d) and m.mode == "auto"]
    try:
        with torch.enable_grad():
            if convs and x.shape[0] > CONV_MEASURE_BATCH:
                # the convolutions first, on part of the batch (the other layers run dense
                # meanwhile, unmeasured), then the rest on the whole batch
                rest = [m for _, m in layers if m.mode == "auto" and not isinstance(m, stnn.SparseConv2d)]
                for m in rest:
                    m.mode = "dense"
                try:
                    model(x[:CONV_MEASURE_BATCH])
                finally:
                    for m in rest:
                        m.mode = "auto"
                _pin_measured(convs, evidence)
            model(x)
    finally:
        _mode.MEASURE.update(saved)
        model.train(was)
    _pin_measured(layers, evidence)
    return evidence


def _pin_measured(layers: List[Tuple[str, nn.Module]], evidence: Dict[str, list]) -> None:
    """Pin each of ``layers`` still in 'auto' to the path its measurement chose (else the
    global mode, else the density rule), recording the measurement in ``evidence``."""
    for name, m in layers:
        if m.mode == "auto" and m._choice is not None:
            t = _mode._TIMINGS.get(getattr(m, "_last_key", None))
            if t is not None:
                evidence[name] = [t[0], t[1], m.density]
        m.mode = _mode.resolve(m.mode) or m._choice or ("sparse" if m.density < _mode.HEURISTIC_DENSITY else "dense")


def _load_pretrained(model: nn.Module, path: str) -> Dict[str, Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(sd, dict) and "state_dict" in sd:
                sd = sd["state_dict"]
    except Exception as e:  # (pickle, zip and safetensors errors alike)
        raise ValueError(f"sparseticket: --pretrained {path}: not a readable state dict "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"sparseticket: --pretrained {path}: not a state dict (a dict of tensors)")
    try:
        if any(k.endswith(".weight_values") for k in sd):
            stnn.load_state_dict(model, sd)
            return _dense_state(model)
        model.load_state_dict(sd)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(f"sparseticket: --pretrained {path} does not fit the model "
                         f"({type(e).__name__}: {str(e).strip()[:500]})") from None
    return {k: v.clone() for k, v in model.state_dict().items()}


class _DenseMasker:
    """The dense baseline: plain layers, torch.optim, masks re-applied after every step
    (and, with NEq, frozen rows put back after the step, as dense NEq code does)."""

    def __init__(self, model: nn.Module, mask: Mask, neq: Optional["_DenseNEq"], opt):
        mods = dict(model.named_modules())
        pairs = [(mods[n].weight, m) for n, m in mask.items() if not bool(m.all())]
        self.weights = [w for w, _ in pairs]
        self.masks = [m.to(w.dtype) for w, m in pairs]
        self.neq, self.opt = neq, opt
        self._restore = None

    def before_step(self) -> None:
        self._restore = self.neq.snapshot(self.opt) if self.neq is not None else None

    def after_step(self) -> None:
        if self.weights:
            with torch.no_grad():
                torch._foreach_mul_(self.weights, self.masks)
        if self._restore is not None:
            self._restore()


def _neq_cuts(model: nn.Module, tracker: Optional[NEqTracker], prefix: bool) -> ExitStack:
    """For an epoch of the accelerated run with NEq: the fully frozen prefix gets no
    backward (``freeze_prefix``; only when ``prefix``) and the layer after the first
    partially frozen one skips the input gradient at its frozen outputs
    (``cut_frozen_outputs``: an NEqConv2d consumer, or a SparseConv2d one on its dense
    path; see ``frontier_cut``). Parameter gradients are those of
    the full backward, so the run trains as without them. ``prefix`` is for SGD: the
    prefix's parameters then get no step at all, which MaskedSGD's frozen rows equal,
    while AdamW's per-tensor step count would stop advancing for them. The dense baseline
    runs NEq the way dense code does (full backward)."""
    stack = ExitStack()
    if tracker is not None:
        order = list(tracker.execution_order) or None
        if prefix:
            stack.enter_context(freeze_prefix(model, order=order))
        stack.enter_context(cut_frozen_outputs(model, order=order))
    return stack


class _DenseNEq:
    """NEq on the dense baseline the way dense code does it: the tracker decides, the full
    gradient is computed, and frozen rows (weights, bias and optimizer state) are put back
    after the step."""

    def __init__(self, model: nn.Module, val: Tensor, cfg: NEqConfig, state):
        self.tracker = NEqTracker(model, val, cfg, baseline=state is None)
        if state is not None and state.get("neq") is not None:
            self.tracker.load_state_dict(state["neq"], apply=False)

    def snapshot(self, opt) -> Optional[Callable[[], None]]:
        """A function putting back the frozen rows' parameters and optimizer state as they are now."""
        saved = []
        for name, layer in self.tracker.layers.items():
            if layer.frozen is None or not bool(layer.frozen.any()):
                continue
            rows = layer.frozen.nonzero().squeeze(1)
            for p in layer.module.parameters(recurse=False):
                saved.append((p, rows, p.detach().index_select(0, rows)))
        if not saved:
            return None
        states = []
        if opt is not None:
            for p, rows, _ in saved:
                st = opt.state.get(p, {})
                for k, v in st.items():
                    if isinstance(v, Tensor) and v.shape[:1] == p.shape[:1] and v.dim() > 0:
                        states.append((v, rows, v.index_select(0, rows)))

        def restore():
            with torch.no_grad():
                for t, rows, old in saved + states:
                    t.index_copy_(0, rows, old)
        return restore

    def step(self) -> dict:
        """Measure and decide (the modules stay plain: ``snapshot`` applies the decision)."""
        self.tracker.measure()
        return self.tracker.update()

    def state_dict(self):
        return self.tracker.state_dict()

