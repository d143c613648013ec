"""The IMP runner end to end on the scikit-learn digits (seconds per run)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparseticket.nn as stnn
from sparseticket.lottery import runner as R
from sparseticket.lottery.hparams import IMPHparams
from sparseticket.pruning import Mask


def _hp(tmp_path, **changes):
    # a checkpoint after every epoch, so that the kill-and-resume tests stop mid-level
    base = dict(dataset="digits", model="lenet_300_100", epochs=2, levels=2, batch_size=60, lr=0.05,
                out=str(tmp_path), progress=False, plots=False, kernels="sparse", checkpoint_every=0.0)
    base.update(changes)
    return IMPHparams().replace(**base)


def _masks(run_dir):
    return {p.name: torch.load(p / "mask.pt") for p in sorted(Path(run_dir).glob("level_*"))}


def _finals(run_dir):
    return {p.name: torch.load(p / "final.pt") for p in sorted(Path(run_dir).glob("level_*"))}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _same(a[k], b[k])
        else:
            assert torch.equal(a[k], b[k]), k


KEYS = ("level", "remaining", "train_acc", "test_acc", "val_acc", "steps")


def test_imp_levels_files_and_rerun(tmp_path):
    run = R.IMPRun(_hp(tmp_path, plots=True))
    rows = run.run()
    assert [r["level"] for r in rows] == [0, 1, 2]
    lr = [r["layer_remaining"] for r in rows]
    assert lr[1]["fc3"] == pytest.approx(90.0, abs=0.2) and lr[2]["fc3"] == pytest.approx(81.0, abs=0.2)
    # global 20% over fc1+fc2 (the output layer has its own 10%)
    kept = {n: Mask(torch.load(run.dir / "level_01" / "mask.pt")).kept(n) for n in ("fc1", "fc2")}
    assert sum(kept.values()) == (64 * 300 + 300 * 100) - round(0.2 * (64 * 300 + 300 * 100))
    masks = _masks(run.dir)
    for a, b in (("level_00", "level_01"), ("level_01", "level_02")):
        assert Mask(masks[b]).is_subset_of(Mask(masks[a]))
    for name, sd in _finals(run.dir).items():  # pruned weights are exactly zero in the trained weights
        for layer, m in masks[name].items():
            assert bool((sd[layer + ".weight"][~m] == 0).all())
    for f in ("results.json", "results.csv", "hparams.json", "rewind.pt", "accuracy.png",
              "level_02/ticket.safetensors", "level_02/checkpoint.pt"):
        assert (run.dir / f).exists(), f
    # every file goes through a temporary name and a rename: none is left behind, and the
    # plot is a whole PNG
    assert not list(run.dir.rglob("*.tmp"))
    assert (run.dir / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m2 = Mask(masks["level_02"])   # fp32 values + int32 columns + int32 row pointers (+ biases)
    shapes = {"fc1": (300, 64), "fc2": (100, 300), "fc3": (10, 100)}
    # FLOPs read from the layers: forward executed = 2 * samples * kept weights
    fwd = rows[2]["flops"]["forward"]
    assert fwd["executed"] / fwd["dense"] == pytest.approx(m2.kept() / m2.numel(), rel=1e-9)
    assert rows[0]["flops_executed"] == pytest.approx(rows[0]["flops_dense"] - rows[0]["flops"]["optimizer"]["dense"]
                                                      + rows[0]["flops"]["optimizer"]["executed"])
    # epoch 0's first step creates the momentum buffers (3 FLOPs per element fewer); the
    # steps after it are counted at their full cost
    log0 = torch.load(run.dir / "level_00" / "checkpoint.pt", weights_only=False)["log"]
    assert log0[0]["step"] * 2 == log0[1]["step"]
    n_params = sum(o * i + o for o, i in shapes.values())
    assert log0[1]["flops"]["optimizer"]["executed"] - log0[0]["flops"]["optimizer"]["executed"] == 3 * n_params
    assert rows[2]["ticket_bytes"] == sum(8 * m2.kept(n) + 4 * (o + 1) + 4 * o for n, (o, i) in shapes.items())
    assert rows[2]["dense_bytes"] == sum(4 * (o * i + o) for o, i in shapes.values())
    assert all(0.5 < r["test_acc"] <= 1 for r in rows)
    assert set(rows[1]["modes"]) == {"fc1", "fc2", "fc3"} and set(rows[1]["modes"].values()) == {"sparse"}
    # the same command again resumes: nothing is retrained
    stamp = (run.dir / "level_02" / "metrics.json").stat().st_mtime_ns
    again = R.IMPRun(_hp(tmp_path, plots=True, threads=1)).run()  # run-only fields keep the folder
    assert [r["test_acc"] for r in again] == [r["test_acc"] for r in rows]
    assert (run.dir / "level_02" / "metrics.json").stat().st_mtime_ns == stamp


def test_flops_of_a_parameter_whose_first_gradient_comes_late(tmp_path, monkeypatch):
    """The first step leaves fc3's bias without a gradient, so its momentum buffer is only
    created by the second step: both steps are counted as they ran, and the third stands
    for the rest of the epoch (counted from the second, fc3.bias would be cheap all epoch)."""
    from sparseticket.optim import MaskedSGD
    real_step, calls = MaskedSGD.step, [0]

    def step(self, *a, **k):
        calls[0] += 1
        if calls[0] == 1:
            for g in self.param_groups:
                for p in g["params"]:
                    if p.shape == (10,):  # fc3's bias (10 classes)
                        p.grad = None
        return real_step(self, *a, **k)

    monkeypatch.setattr(MaskedSGD, "step", step)
    run = R.IMPRun(_hp(tmp_path, levels=0))
    run.run()
    log0 = torch.load(run.dir / "level_00" / "checkpoint.pt", weights_only=False)["log"]
    S = log0[0]["step"]
    assert log0[1]["step"] == 2 * S and S > 3
    n_params = sum(o * i + o for o, i in ((300, 64), (100, 300), (10, 100)))
    e0, e1 = (log0[e]["flops"]["optimizer"]["executed"] for e in (0, 1))
    per = e1 / (S * n_params)  # FLOPs per element of a step with every buffer (epoch 1)
    assert per == int(per) and per >= 5
    # epoch 0 = S full steps, less fc3.bias's whole first step, less every buffer's update once
    assert e0 == e1 - per * 10 - 3 * n_params


class _Killed(Exception):
    pass


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return out, R.IMPRun(_hp(out)).run()


def _run_killed_at_write(monkeypatch, hp, kill_after: int) -> None:
    """Run ``hp`` until its ``kill_after``-th atomic_save has been written, then 'kill' it
    there (the exception stands for SIGKILL: nothing after that write happens)."""
    real_save, calls = R.atomic_save, [0]

    def dying_save(obj, path):
        real_save(obj, path)
        calls[0] += 1
        if calls[0] == kill_after:
            raise _Killed(path)

    monkeypatch.setattr(R, "atomic_save", dying_save)
    try:
        with pytest.raises(_Killed):
            R.IMPRun(hp).run()
    finally:
        monkeypatch.setattr(R, "atomic_save", real_save)


@pytest.mark.parametrize("kill_after", [1, 3, 6, 9])
def test_interrupted_run_resumes_to_identical_result(tmp_path, monkeypatch, kill_after, reference_run):
    ref_out, ref = reference_run
    _run_killed_at_write(monkeypatch, _hp(tmp_path / "cut"), kill_after)
    rows = R.IMPRun(_hp(tmp_path / "cut")).run()
    assert [{k: r[k] for k in KEYS} for r in rows] == [{k: r[k] for k in KEYS} for r in ref]
    assert [r["flops"] for r in rows] == [r["flops"] for r in ref]  # counted the same after a resume
    a, b = R.IMPRun(_hp(ref_out)).dir, R.IMPRun(_hp(tmp_path / "cut")).dir
    _same(_masks(a), _masks(b))
    _same(_finals(a), _finals(b))


def test_level_killed_before_its_first_checkpoint_keeps_its_kernel_choice(tmp_path, monkeypatch):
    """With --kernels auto the choice is measured (timing: another run may choose another
    path, which rounds differently). A level killed before its first checkpoint resumes with
    the choice it started with (level_XX/modes.json), not a new measurement."""
    real_pin, real_save = R._pin_modes, R.atomic_save
    chosen = {}

    def pin_alternating(model, x, previous=None):  # a stand-in measurement: fc1 sparse, the rest dense
        ev = real_pin(model, x, previous)
        for name, m in model.named_modules():
            if isinstance(m, stnn.TicketModule):
                m.mode = "sparse" if name == "fc1" else "dense"
        chosen.update(R._modes(model))
        return ev

    def killed_at_first_checkpoint(obj, path):
        if path.name == "checkpoint.pt" and path.parent.name == "level_01":
            raise _Killed(path)
        real_save(obj, path)

    hp = _hp(tmp_path, kernels="auto", checkpoint_every=1e9, levels=1)  # one checkpoint per level, at its end
    monkeypatch.setattr(R, "_pin_modes", pin_alternating)
    monkeypatch.setattr(R, "atomic_save", killed_at_first_checkpoint)
    with pytest.raises(_Killed):
        R.IMPRun(hp).run()
    run_dir = R.IMPRun(hp).dir
    assert not (run_dir / "level_01" / "checkpoint.pt").exists()
    assert json.loads((run_dir / "level_01" / "modes.json").read_text())["modes"] == chosen == {
        "fc1": "sparse", "fc2": "dense", "fc3": "dense"}

    def must_not_measure(*a, **k):
        raise AssertionError("level 1 measured its kernels again")

    monkeypatch.setattr(R, "_pin_modes", must_not_measure)
    monkeypatch.setattr(R, "atomic_save", real_save)
    rows = R.IMPRun(hp).run()
    assert rows[1]["modes"] == chosen


@pytest.mark.parametrize("config", [
    dict(neq=True, neq_eps=0.5, optimizer="adamw", lr=1e-3, epochs=3),            # NEq tracker state, AdamW moments
    dict(neq=True, neq_eps=0.5, baseline="dense", epochs=3),                        # the dense baseline's masker
    dict(rewind="lr", milestones="1", epochs=2),                                    # learning-rate rewinding
])
def test_interrupted_runs_of_other_kinds_resume_to_identical_results(tmp_path, monkeypatch, config):
    """Killed after level 0's first epoch and again in level 1, resumed each time: the same
    rows, masks and final weights as the uninterrupted run, for state beyond plain SGD's."""
    ref = R.IMPRun(_hp(tmp_path / "ref", **config)).run()
    # (writes: rewind.pt, then per level mask.pt, a checkpoint per epoch, final.pt)
    for kill_at in (3, 5 + config["epochs"]):
        _run_killed_at_write(monkeypatch, _hp(tmp_path / "cut", **config), kill_at)
    rows = R.IMPRun(_hp(tmp_path / "cut", **config)).run()
    assert [{k: r[k] for k in KEYS + ("neq_frozen",)} for r in rows] == \
        [{k: r[k] for k in KEYS + ("neq_frozen",)} for r in ref]
    a, b = R.IMPRun(_hp(tmp_path / "ref", **config)).dir, R.IMPRun(_hp(tmp_path / "cut", **config)).dir
    _same(_masks(a), _masks(b))
    _same(_finals(a), _finals(b))


def test_checkpoint_leaves_out_index_buffers_and_checks_values_against_the_mask(reference_run):
    """The per-epoch checkpoint holds a ticket's values, not its index buffers (the level's
    mask.pt determines them); loading it into a model built from another mask fails."""
    run = R.IMPRun(_hp(reference_run[0]))
    ckpt = torch.load(run.dir / "level_01" / "checkpoint.pt", weights_only=False)
    state = ckpt["model"]
    assert "fc1.weight_values" in state
    assert not [k for k in state if k.rsplit(".", 1)[-1] in R._TICKET_INDEX_BUFFERS]
    mask = Mask(torch.load(run.dir / "level_01" / "mask.pt"))
    assert ckpt["mask_digest"] == mask.digest()
    plan = run._imp_plan(1)
    model = run.build(plan)
    R._load_checkpoint_model(model, state)
    assert torch.equal(model.fc1.weight_values.detach(), state["fc1.weight_values"])
    assert torch.equal(model.fc1.mask(), mask["fc1"])
    sparser = run.build(run._imp_plan(2))  # level 2's mask keeps fewer weights than level 1's values
    with pytest.raises(RuntimeError, match="'fc1'.*inconsistent ticket"):
        R._load_checkpoint_model(sparser, state)


def _killed_at_first_checkpoint(monkeypatch, hp, level=None):
    """Run ``hp`` until its first checkpoint.pt (in ``level``'s folder, if given) is written,
    as a kill there would leave it."""
    real_save = R.atomic_save

    def dying_save(obj, path):
        real_save(obj, path)
        if Path(path).name == "checkpoint.pt" and level in (None, Path(path).parent.name):
            raise _Killed(path)

    monkeypatch.setattr(R, "atomic_save", dying_save)
    with pytest.raises(_Killed):
        R.IMPRun(hp).run()
    monkeypatch.setattr(R, "atomic_save", real_save)


@pytest.mark.parametrize("every", [0.0, 3600.0])
def test_checkpoint_interval(tmp_path, monkeypatch, every):
    """--checkpoint-every: 0 writes a level's checkpoint after every epoch, a long interval only
    after its last epoch; killed at that write, the rerun ends where an uninterrupted run does
    (the interval is not part of the run's hash: both runs share a folder name)."""
    real_save = R.atomic_save
    written = []

    def counting_save(obj, path):
        real_save(obj, path)
        if Path(path).name == "checkpoint.pt":
            written.append((Path(path).parent.name, obj["step"]))

    monkeypatch.setattr(R, "atomic_save", counting_save)
    ref = R.IMPRun(_hp(tmp_path / "ref", epochs=3, levels=1, checkpoint_every=every))
    ref.run()
    steps_per_epoch = math.ceil(ref.data.train.x.shape[0] / 60)
    epochs = [s // steps_per_epoch for _, s in written]
    assert epochs == ([1, 2, 3, 1, 2, 3] if every == 0 else [3, 3])
    monkeypatch.setattr(R, "atomic_save", real_save)
    hp = _hp(tmp_path / "cut", epochs=3, levels=1, checkpoint_every=every)
    _killed_at_first_checkpoint(monkeypatch, hp, "level_01")
    cut = R.IMPRun(hp)
    assert cut.dir.name == ref.dir.name
    cut.run()
    _same(_finals(ref.dir), _finals(cut.dir))


@pytest.mark.parametrize("every", [-1.0, float("nan")])
def test_checkpoint_interval_must_be_non_negative(tmp_path, every):
    with pytest.raises(ValueError, match="--checkpoint-every must be >= 0 seconds"):
        R.IMPRun(_hp(tmp_path, checkpoint_every=every))


@pytest.mark.parametrize("kernels", ["sparse", "dense"])
def test_fused_and_fixed_steps_train_as_the_two_calls(tmp_path, monkeypatch, kernels):
    """The runner's MLPStep.fixed blocks (update fused, checks once per epoch; counted steps
    through MLPStep.step) end every level bit-identical to fast(x, y); opt.step(), through
    weight decay, learning-rate milestones and an iteration rewind."""
    import contextlib

    import sparseticket.nn as stnn
    cfg = dict(epochs=3, levels=2, weight_decay=1e-3, milestones="1,2", rewind="iter:5", kernels=kernels)
    fused = R.IMPRun(_hp(tmp_path / "fused", **cfg))
    fused.run()

    def two_calls(self, x, y, opt):
        loss = self(x, y)
        opt.step()
        return loss

    @contextlib.contextmanager
    def unfixed(self, opt):
        yield lambda x, y: two_calls(self, x, y, opt)

    monkeypatch.setattr(stnn.MLPStep, "step", two_calls)
    monkeypatch.setattr(stnn.MLPStep, "fixed", unfixed)
    plain = R.IMPRun(_hp(tmp_path / "plain", **cfg))
    plain.run()
    _same(_finals(fused.dir), _finals(plain.dir))


def _moved_one_weight(mask_path):
    """Move one kept weight of fc1 to a pruned column of the same row: every count stays."""
    m = torch.load(mask_path)
    fc1 = m["fc1"].clone()
    r = int((~fc1).any(1).nonzero()[0])
    kept, pruned = int(fc1[r].nonzero()[0]), int((~fc1[r]).nonzero()[0])
    fc1[r, kept], fc1[r, pruned] = False, True
    m["fc1"] = fc1
    torch.save(m, mask_path)


def test_resume_refuses_a_mask_or_checkpoint_that_do_not_belong(tmp_path, monkeypatch):
    """Killed in level 2. mask.pt changed with every per-row count kept (the values would
    load into other columns without complaint): the level's mask is pruned again and
    compared, and the resume stops. A checkpoint.pt of another level (another mask) in the
    level's folder: its mask digest stops the resume."""
    _killed_at_first_checkpoint(monkeypatch, _hp(tmp_path), "level_02")
    run = R.IMPRun(_hp(tmp_path))
    mask_path = run.dir / "level_02" / "mask.pt"
    kept = mask_path.read_bytes()
    _moved_one_weight(mask_path)
    with pytest.raises(RuntimeError, match="level_02/mask.pt is not the mask pruned for level_02"):
        run.run()
    (run.dir / "level_02" / "pruned_from.json").unlink()  # a folder from before the record: pruned again
    with pytest.raises(RuntimeError, match="level_02/mask.pt is not what pruning level_01's final.pt and mask.pt"):
        R.IMPRun(_hp(tmp_path)).run()
    mask_path.write_bytes(kept)
    ckpt = run.dir / "level_02" / "checkpoint.pt"
    ckpt.write_bytes((run.dir / "level_01" / "checkpoint.pt").read_bytes())
    with pytest.raises(RuntimeError, match="checkpoint.pt was written for another mask"):
        R.IMPRun(_hp(tmp_path)).run()


def test_level_refuses_a_recorded_mask_its_inputs_no_longer_give(tmp_path):
    """A control level whose recorded mask.pt is not what the main run now gives fails
    naming the file, instead of training one mask and reporting another."""
    R.IMPRun(_hp(tmp_path, levels=1)).run()
    ctl = R.IMPRun(_hp(tmp_path, levels=1, control="random_reinit"))
    ctl.run()
    (ctl.dir / "level_01" / "metrics.json").unlink()
    _moved_one_weight(ctl.dir / "level_01" / "mask.pt")
    with pytest.raises(RuntimeError, match="mask.pt is not the mask this level computes"):
        ctl.run()


def test_transfer_resumes_from_the_source_level_it_started_with(tmp_path, monkeypatch):
    """--transfer-level -1 takes the source's latest finished level once: a transfer killed
    while the source had one finished level, resumed after it finished another, ends as the
    uninterrupted transfer from the first."""
    src = R.IMPRun(_hp(tmp_path / "src"))
    src.run()
    later = src.dir / "level_02" / "metrics.json"
    later.rename(later.with_suffix(".hidden"))   # the source as it was with level 1 finished
    ref = R.IMPRun(_hp(tmp_path / "ref", transfer_from=str(src.dir), epochs=3)).run()
    _killed_at_first_checkpoint(monkeypatch, _hp(tmp_path / "cut", transfer_from=str(src.dir), epochs=3))
    later.with_suffix(".hidden").rename(later)  # the source finishes level 2 meanwhile
    cut = R.IMPRun(_hp(tmp_path / "cut", transfer_from=str(src.dir), epochs=3))
    rows = cut.run()
    assert [{k: r[k] for k in KEYS} for r in rows] == [{k: r[k] for k in KEYS} for r in ref]
    assert json.loads((cut.dir / "level_00" / "transfer.json").read_text())["source_level"] == "level_01"
    a = R.IMPRun(_hp(tmp_path / "ref", transfer_from=str(src.dir), epochs=3)).dir
    _same(_masks(a), _masks(cut.dir))
    _same(_finals(a), _finals(cut.dir))
    # a new transfer run from the same source now takes level 2
    fresh = R.IMPRun(_hp(tmp_path / "new", transfer_from=str(src.dir), epochs=3)).run()
    assert fresh[0]["remaining"] == pytest.approx(src.run()[2]["remaining"])
    # a transfer folder written before transfer.json existed: the source level is the one
    # whose mask its level_00/mask.pt holds, not the source's latest
    (cut.dir / "level_00" / "transfer.json").unlink()
    (cut.dir / "level_00" / "metrics.json").unlink()
    again = R.IMPRun(_hp(tmp_path / "cut", transfer_from=str(src.dir), epochs=3)).run()
    assert [{k: r[k] for k in KEYS} for r in again] == [{k: r[k] for k in KEYS} for r in ref]
    assert json.loads((cut.dir / "level_00" / "transfer.json").read_text())["source_level"] == "level_01"
    # and one whose mask matches no finished source level says so
    (cut.dir / "level_00" / "transfer.json").unlink()
    (cut.dir / "level_00" / "metrics.json").unlink()
    _moved_one_weight(cut.dir / "level_00" / "mask.pt")
    with pytest.raises(RuntimeError, match="matches no finished level of the transfer source"):
        R.IMPRun(_hp(tmp_path / "cut", transfer_from=str(src.dir), epochs=3)).run()
    assert not (cut.dir / "level_00" / "transfer.json").exists()


def test_resume_refuses_a_level_pruned_from_weights_that_changed(tmp_path, monkeypatch):
    """Killed in level 2, then level 1's trained weights change (it was trained again):
    level 2's recorded mask is no longer what pruning them gives, and the resume stops
    naming the levels to move away instead of training level 2 on the stale mask."""
    _killed_at_first_checkpoint(monkeypatch, _hp(tmp_path), "level_02")
    run = R.IMPRun(_hp(tmp_path))
    final = run.dir / "level_01" / "final.pt"
    sd = torch.load(final)
    g = torch.Generator().manual_seed(1)
    torch.save({k: v * torch.rand(v.shape, generator=g) if k.endswith("weight") else v for k, v in sd.items()}, final)
    with pytest.raises(RuntimeError, match="level_02 was pruned from other weights or masks of level_01"):
        run.run()
    torch.save(sd, final)  # put back: the run resumes
    assert [r["level"] for r in R.IMPRun(_hp(tmp_path)).run()] == [0, 1, 2]


def _no_plain(model, skip=()):
    return {}


def test_dense_pinned_layers_train_as_plain_layers_bit_for_bit(tmp_path, monkeypatch):
    """With every ticket layer pinned to its dense path (--kernels dense) the runner trains
    them as plain layers with keep masks (_plain_dense_path): final weights, accuracies,
    masks and the exported ticket are those of the run that keeps them as tickets, and
    the pruned weights are exactly 0."""
    seen = []
    real = R._plain_dense_path

    def spy(model, skip=()):
        out = real(model, skip)
        seen.append((sorted(out), [type(m).__name__ for m in model.modules()]))
        return out

    monkeypatch.setattr(R, "_plain_dense_path", spy)
    rows = R.IMPRun(_hp(tmp_path / "plain", kernels="dense")).run()
    assert [names for names, _ in seen[1:]] == [["fc1", "fc2", "fc3"]] * 2  # levels 1 and 2 (level 0 is unpruned)
    assert all("SparseLinear" not in types and "FusedReLU" not in types for _, types in seen[1:])
    monkeypatch.setattr(R, "_plain_dense_path", _no_plain)
    ref = R.IMPRun(_hp(tmp_path / "ticket", kernels="dense")).run()
    assert [{k: r[k] for k in KEYS} for r in rows] == [{k: r[k] for k in KEYS} for r in ref]
    assert [r["ticket_bytes"] for r in rows] == [r["ticket_bytes"] for r in ref]
    a, b = R.IMPRun(_hp(tmp_path / "plain", kernels="dense")).dir, R.IMPRun(_hp(tmp_path / "ticket", kernels="dense")).dir
    _same(_masks(a), _masks(b))
    _same(_finals(a), _finals(b))
    from safetensors.torch import load_file
    _same(load_file(a / "level_02" / "ticket.safetensors"), load_file(b / "level_02" / "ticket.safetensors"))
    final, mask = _finals(a)["level_02"], _masks(a)["level_02"]
    for n, m in mask.items():
        assert final[n + ".weight"][~m].abs().sum() == 0, n


@pytest.mark.parametrize("first_format", ["plain", "ticket"])
def test_dense_pinned_level_resumes_to_identical_result(tmp_path, monkeypatch, first_format):
    """A level trained with plain dense-path layers, killed and resumed, ends as an
    uninterrupted run; so does one whose checkpoint still holds those layers as tickets
    (written before _plain_dense_path existed): it resumes them as tickets."""
    ref = R.IMPRun(_hp(tmp_path / "ref", kernels="dense")).run()
    real_save, calls = R.atomic_save, [0]

    def dying_save(obj, path):
        real_save(obj, path)
        calls[0] += 1
        if path.name == "checkpoint.pt" and path.parent.name == "level_01":
            raise _Killed(path)

    monkeypatch.setattr(R, "atomic_save", dying_save)
    if first_format == "ticket":
        monkeypatch.setattr(R, "_plain_dense_path", _no_plain)
    with pytest.raises(_Killed):
        R.IMPRun(_hp(tmp_path / "cut", kernels="dense")).run()
    monkeypatch.undo()
    state = torch.load(next((tmp_path / "cut").glob("*/level_01/checkpoint.pt")), weights_only=False)["model"]
    assert ("fc1.weight_values" in state) == (first_format == "ticket")
    rows = R.IMPRun(_hp(tmp_path / "cut", kernels="dense")).run()
    assert [{k: r[k] for k in KEYS} for r in rows] == [{k: r[k] for k in KEYS} for r in ref]
    a, b = R.IMPRun(_hp(tmp_path / "ref", kernels="dense")).dir, R.IMPRun(_hp(tmp_path / "cut", kernels="dense")).dir
    _same(_masks(a), _masks(b))
    _same(_finals(a), _finals(b))


def test_sigkill_then_resume(tmp_path):
    """A real SIGKILL in the middle of level 1; the rerun ends where an uninterrupted run does."""
    args = ["--dataset", "digits", "--epochs", "3", "--levels", "2", "--kernels", "sparse", "--progress", "false",
            "--plots", "false", "--checkpoint-every", "0"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "sparseticket", "imp"] + args
    subprocess.run(cmd + ["--out", str(tmp_path / "ref")], check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "cut")], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "cut").glob("*/level_01/checkpoint.pt")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((tmp_path / "cut").glob("*/level_02/metrics.json")), "the run finished before the kill"
    subprocess.run(cmd + ["--out", str(tmp_path / "cut")], check=True, env=env, capture_output=True)
    ref = json.loads(next((tmp_path / "ref").glob("*/results.json")).read_text())
    cut = json.loads(next((tmp_path / "cut").glob("*/results.json")).read_text())
    assert [{k: r[k] for k in KEYS} for r in cut] == [{k: r[k] for k in KEYS} for r in ref]
    _same(_masks(next((tmp_path / "ref").glob("imp_*"))), _masks(next((tmp_path / "cut").glob("imp_*"))))


def test_dense_baseline_is_the_same_experiment(tmp_path):
    sparse = R.IMPRun(_hp(tmp_path)).run()
    dense_run = R.IMPRun(_hp(tmp_path, baseline="dense"))
    dense = dense_run.run()
    assert dense_run.dir != R.IMPRun(_hp(tmp_path)).dir
    assert all(r["modes"] == {} for r in dense)
    for s, d in zip(sparse, dense):
        assert s["remaining"] == pytest.approx(d["remaining"], abs=0.05)
        assert abs(s["test_acc"] - d["test_acc"]) < 0.05
    # level 0 is the same computation; level 1's masks agree except for near-ties
    m_s, m_d = _masks(R.IMPRun(_hp(tmp_path)).dir)["level_01"], _masks(dense_run.dir)["level_01"]
    agree = sum(int((m_s[n] == m_d[n]).sum()) for n in m_s) / sum(m.numel() for m in m_s.values())
    assert agree > 0.99


def test_controls(tmp_path):
    main = R.IMPRun(_hp(tmp_path)).run()
    reinit = R.IMPRun(_hp(tmp_path, control="random_reinit"))
    rrows = reinit.run()
    assert [r["level"] for r in rrows] == [1, 2] and all(r["control"] == "random_reinit" for r in rrows)
    main_dir = R.IMPRun(_hp(tmp_path)).dir
    _same(_masks(main_dir)["level_02"], _masks(reinit.dir)["level_02"])   # the ticket's structure...
    start = R.IMPRun(_hp(tmp_path))._rewind()["init"]
    assert not torch.equal(start["fc1.weight"], reinit.new_model(0 + 7919 * 3).state_dict()["fc1.weight"])
    rp = R.IMPRun(_hp(tmp_path, control="random_prune"))
    prow = rp.run()
    m_rand, m_tick = Mask(_masks(rp.dir)["level_02"]), Mask(_masks(main_dir)["level_02"])
    for n in m_tick:                                                          # ...or its layerwise sparsity
        assert m_rand.kept(n) == m_tick.kept(n)
    assert not torch.equal(m_rand["fc1"], m_tick["fc1"])
    assert [r["remaining"] for r in prow] == pytest.approx([r["remaining"] for r in main[1:]])


def test_controls_follow_rewind(tmp_path):
    """A control trains what the ticket trains: from step K under late resetting, and
    random_prune on the weights the ticket starts from (θK; under learning-rate rewinding
    its own previous level's trained weights), not always θ0 from step 0 (reviews 43, 44)."""
    main = R.IMPRun(_hp(tmp_path, rewind="iter:5", levels=1))
    mrows = main.run()
    theta_k = torch.load(main.dir / "rewind.pt")["iter"]
    rp = R.IMPRun(_hp(tmp_path, rewind="iter:5", levels=1, control="random_prune"))
    rows = rp.run()
    plan = rp._control_plan(main, 1)
    assert plan.first_step == 5
    _same(plan.start, theta_k)
    ri = R.IMPRun(_hp(tmp_path, rewind="iter:5", levels=1, control="random_reinit"))
    rrows = ri.run()
    rplan = ri._control_plan(main, 1)
    assert rplan.first_step == 5 and not torch.equal(rplan.start["fc1.weight"], theta_k["fc1.weight"])
    _same(rplan.mask.state_dict(), torch.load(main.dir / "level_01" / "mask.pt"))
    # as many steps as the ticket: from K to T, and as many FLOPs (the same kept counts per layer)
    for r in rows + rrows:
        assert (r["first_step"], r["steps"]) == (mrows[1]["first_step"], mrows[1]["steps"]) == (5, mrows[0]["steps"])
        assert r["flops_executed"] == pytest.approx(mrows[1]["flops_executed"], rel=1e-12)
    import csv                                          # the CSV has it too (it was in the JSON only)
    with open(main.dir / "results.csv") as f:
        assert [r["first_step"] for r in csv.DictReader(f)] == ["0", "5"]
    # learning-rate rewinding: the random-prune control is iterative, like the ticket
    lr_main = R.IMPRun(_hp(tmp_path, rewind="lr", levels=2))
    lr_main.run()
    lr_rp = R.IMPRun(_hp(tmp_path, rewind="lr", levels=2, control="random_prune"))
    lr_rp.run()
    _same(lr_rp._control_plan(lr_main, 1).start, torch.load(lr_main.dir / "level_00" / "final.pt"))
    plan2 = lr_rp._control_plan(lr_main, 2)
    _same(plan2.start, torch.load(lr_rp.dir / "level_01" / "final.pt"))
    assert plan2.mask.is_subset_of(Mask(torch.load(lr_rp.dir / "level_01" / "mask.pt")))
    ticket2 = Mask(torch.load(lr_main.dir / "level_02" / "mask.pt"))
    assert all(plan2.mask.kept(n) == ticket2.kept(n) for n in ticket2)
    # so every kept weight of level 2 starts from a trained, non-zero value
    for n in ticket2:
        assert bool((plan2.start[n + ".weight"][plan2.mask[n]] != 0).all())


def test_rewinding_variants_and_one_shot(tmp_path):
    it = R.IMPRun(_hp(tmp_path, rewind="iter:5"))
    rows = it.run()
    rw = torch.load(it.dir / "rewind.pt")
    assert "iter" in rw and not torch.equal(rw["iter"]["fc1.weight"], rw["init"]["fc1.weight"])
    assert rows[1]["steps"] == rows[0]["steps"]            # training ends at the same step T...
    assert rows[1]["epochs"] == rows[0]["epochs"]            # ...epoch 0 partly skipped
    lr = R.IMPRun(_hp(tmp_path, rewind="lr"))
    lr.run()
    plan = lr._imp_plan(2)
    _same(plan.start, torch.load(lr.dir / "level_01" / "final.pt"))
    run = R.IMPRun(_hp(tmp_path, rewind="iter:100000"))
    with pytest.raises(ValueError, match="never reaches step 100000"):  # found before level 0 trains
        run.run()
    assert not run.dir.exists()
    # K = T, the last step: θK is level 0's trained weights, taken after its last batch
    T = rows[0]["steps"]
    last = R.IMPRun(_hp(tmp_path, rewind=f"iter:{T}", levels=1))
    last.run()
    _same(torch.load(last.dir / "rewind.pt")["iter"], torch.load(last.dir / "level_00" / "final.pt"))
    with pytest.raises(ValueError, match="with --pretrained: level 0 is evaluated"):
        R.IMPRun(_hp(tmp_path, rewind="iter:5", pretrained=str(tmp_path / "any.pt")))
    one = R.IMPRun(_hp(tmp_path, one_shot=True, levels=3)).run()
    assert [r["level"] for r in one] == [0, 1]
    assert one[1]["layer_remaining"]["fc3"] == pytest.approx(100 * 0.9 ** 3, abs=0.2)


def test_raising_levels_continues_the_folder(tmp_path):
    """--levels is not part of an iterative run's hash (review 43): raising it trains the
    new levels in the same folder, lowering it keeps the later levels in the results, and
    hparams.json and each level's row say which command's settings ran."""
    short = R.IMPRun(_hp(tmp_path, levels=1, threads=1))
    short.run()
    first = {n: torch.load(short.dir / n / "final.pt") for n in ("level_00", "level_01")}
    longer = R.IMPRun(_hp(tmp_path, levels=2, threads=2))
    assert longer.dir == short.dir
    rows = longer.run()
    assert [r["level"] for r in rows] == [0, 1, 2]
    for n, sd in first.items():  # the finished levels were resumed, not trained again
        _same(sd, torch.load(longer.dir / n / "final.pt"))
    assert [r["threads"] for r in rows] == [1, 1, 2] and {r["kernels"] for r in rows} == {"sparse"}
    recorded = json.loads((longer.dir / "hparams.json").read_text())
    assert recorded["prune"]["levels"] == 2 and recorded["run"]["threads"] == 2
    again = R.IMPRun(_hp(tmp_path, levels=1)).run()
    assert [r["level"] for r in again] == [0, 1]
    listed = json.loads((longer.dir / "results.json").read_text())
    assert [r["level"] for r in listed] == [0, 1, 2]
    # the same result-defining fields but another --lr: refused by the recorded hparams
    hp = _hp(tmp_path, levels=1)
    (tmp_path / hp.replace(lr=0.07).run_name()).mkdir()
    (tmp_path / hp.replace(lr=0.07).run_name() / "hparams.json").write_text(json.dumps(hp.to_dict()))
    with pytest.raises(RuntimeError, match="other hyperparameters"):
        R.IMPRun(hp.replace(lr=0.07)).run()


def test_a_resumed_level_reports_the_settings_it_ran_with(tmp_path, monkeypatch):
    """A level started under --kernels dense on 1 thread, killed, and finished by a command
    with --kernels sparse on 2 threads ran its layers dense (the choice is fixed at the
    level's start): its row says kernels 'dense' and threads '1,2' (review 44)."""
    _killed_at_first_checkpoint(monkeypatch, _hp(tmp_path, levels=1, kernels="dense", threads=1), level="level_01")
    rows = R.IMPRun(_hp(tmp_path, levels=1, kernels="sparse", threads=2)).run()
    assert rows[1]["modes"] == {"fc1": "dense", "fc2": "dense", "fc3": "dense"}
    assert (rows[1]["kernels"], rows[1]["threads"]) == ("dense", "1,2")
    assert (rows[0]["kernels"], rows[0]["threads"]) == ("dense", 1)


def test_a_folder_named_before_session_30_is_continued(tmp_path):
    """A folder named by the old hash (which covered --levels) is renamed to the present
    name by the first command of its experiment, whatever its --levels, so every later
    command finds it too (review 45: it was found once, then lost). Several such folders:
    the one with the most levels. Not for --pretrained runs, whose old name does not vouch
    for the file's contents, nor for controls whose definition changed."""
    hp = _hp(tmp_path, levels=1)
    run = R.IMPRun(hp)
    run.run()
    new = run.dir
    old = tmp_path / hp.run_name(legacy=True)
    run.dir.rename(old)
    import shutil                                   # another legacy folder of the experiment, with fewer levels
    shorter = tmp_path / hp.replace(levels=0).run_name(legacy=True)
    shutil.copytree(old, shorter)
    shutil.rmtree(shorter / "level_01")
    (shorter / "hparams.json").write_text(json.dumps(hp.replace(levels=0).to_dict()))
    (tmp_path / "imp_lenet_300_100_digits_sparse_junk").mkdir()   # (odd folders are skipped)
    (tmp_path / "imp_lenet_300_100_digits_sparse_junk" / "hparams.json").write_text("null")
    level1 = (old / "level_01" / "metrics.json").read_text()
    transfer = _hp(tmp_path / "t", transfer_from=str(old), split_seed=1)   # (records its source's path)
    (done,) = R.IMPRun(transfer).run()
    more = R.IMPRun(hp.replace(levels=2))
    assert more.dir == new and new.is_dir() and not new.is_symlink() and shorter.exists()
    assert old.is_symlink() and old.resolve() == new.resolve()   # the old name still leads to it
    assert [r["level"] for r in more.run()] == [0, 1, 2]
    assert {r["run"] for r in json.loads((new / "results.json").read_text())} == {new.name}
    (again,) = R.IMPRun(transfer).run()                           # the transfer still finds its source
    assert again == done
    assert (new / "level_01" / "metrics.json").read_text() == level1   # the longer folder's level 1, not retrained
    for levels in (2, 1, 3):                      # found again by every later command
        assert R.IMPRun(hp.replace(levels=levels)).dir == new
    assert R.IMPRun(hp.replace(lr=0.07)).dir != new
    path = tmp_path / "pre.pt"
    torch.save(torch.load(new / "level_00" / "final.pt"), path)
    pre = _hp(tmp_path, levels=1, pretrained=str(path))
    R.IMPRun(pre).run()
    R.IMPRun(pre).dir.rename(tmp_path / pre.run_name(legacy=True))
    assert not R.IMPRun(pre).dir.exists()          # a new folder: trained again
    assert (tmp_path / pre.run_name(legacy=True)).exists()
    ctl = _hp(tmp_path, levels=1, rewind="iter:5", control="random_prune")
    (tmp_path / ctl.run_name(legacy=True)).mkdir()
    (tmp_path / ctl.run_name(legacy=True) / "hparams.json").write_text(json.dumps(ctl.to_dict()))
    assert not R.IMPRun(ctl).dir.exists()


def test_no_progress_bar_off_a_terminal(monkeypatch):
    """Piped to a file (or a CI log) the bars were written anyway: every redraw of every level,
    ~1,000 lines per LeNet level of the README's command."""
    pytest.importorskip("tqdm")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = R._Progress(True, 10, "level_00")
    assert bar.bar is None or bar.bar.disable
    bar.update(3)
    bar.close()


def test_the_python_api_of_the_docs():
    """docs/LOTTERY.md's imports (review 48: sparseticket.lottery exported nothing)."""
    from sparseticket.lottery import IMPHparams, IMPRun
    assert IMPRun is R.IMPRun and IMPHparams().replace(levels=3).prune.levels == 3


def test_a_kill_between_adopting_a_folder_and_linking_its_old_name(tmp_path, monkeypatch):
    """The old name's link is made after the rename: a process killed in between left the
    folder without it, and no later command made it (the folder already had its new name),
    so transfers that recorded the old name lost their source. The name is now written
    into the folder before the rename, and the next command links it."""
    hp = _hp(tmp_path, levels=0)
    run = R.IMPRun(hp)
    run.run()
    old = tmp_path / hp.run_name(legacy=True)
    run.dir.rename(old)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed after the rename")

    monkeypatch.setattr(R.os, "symlink", killed)
    with pytest.raises(KeyboardInterrupt):
        R.IMPRun(hp.replace(levels=1))
    monkeypatch.undo()
    assert run.dir.is_dir() and not os.path.lexists(old)    # renamed, not linked
    assert R.IMPRun(hp.replace(levels=2)).dir == run.dir
    assert old.is_symlink() and old.resolve() == run.dir.resolve()
    assert json.loads((run.dir / R.LEGACY_NAME).read_text()) == {"name": old.name}
    old.unlink()                                              # (removed by hand: made again, once)
    R.IMPRun(hp)
    assert old.is_symlink()
    assert [r["level"] for r in R.IMPRun(hp).run()] == [0]


def test_pretrained_counts_by_contents(tmp_path):
    weights = R.IMPRun(_hp(tmp_path)).new_model(5).state_dict()
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(weights, a)
    b.write_bytes(a.read_bytes())   # (torch.save names its archive's folder after the file)
    name = _hp(tmp_path, pretrained=str(a)).run_name()
    assert _hp(tmp_path, pretrained=str(b)).run_name() == name      # the same weights at another path
    weights["fc1.weight"][0, 0] += 1
    torch.save(weights, a)
    os.utime(a, ns=(time.time_ns(), time.time_ns() + 10**9))       # (a new modification time, whatever the clock)
    assert _hp(tmp_path, pretrained=str(a)).run_name() != name      # other weights under the same path
    with pytest.raises(ValueError, match="no such file"):
        R.IMPRun(_hp(tmp_path, pretrained=str(tmp_path / "missing.pt")))


def test_transfer_and_pretrained(tmp_path):
    src = R.IMPRun(_hp(tmp_path))
    src.run()
    tr = R.IMPRun(_hp(tmp_path, transfer_from=str(src.dir), split_seed=1, freeze_features=True,
                      transfer_init="source"))
    rows = tr.run()
    assert len(rows) == 1 and rows[0]["transfer"] and rows[0]["remaining"] == pytest.approx(
        R.IMPRun(_hp(tmp_path)).run()[-1]["remaining"])
    final, source = torch.load(tr.dir / "level_00" / "final.pt"), torch.load(src.dir / "level_02" / "final.pt")
    assert torch.equal(final["fc1.weight"], source["fc1.weight"])          # features frozen
    assert not torch.equal(final["fc3.weight"], source["fc3.weight"])      # the head trained
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        R.IMPRun(_hp(tmp_path, transfer_from=str(tmp_path / "nope"))).run()
    # pruning a pre-trained checkpoint: level 0 is evaluated, not trained, and rewinds go to it
    path = tmp_path / "pre.pt"
    torch.save(source, path)
    pre = R.IMPRun(_hp(tmp_path / "p", pretrained=str(path), levels=1))
    prow = pre.run()
    assert prow[0]["steps"] == 0 and prow[1]["steps"] > 0
    _same(torch.load(pre.dir / "rewind.pt")["init"], source)


def test_frozen_features_keep_batch_norm_statistics(tmp_path):
    """--freeze-features on a model with batch norm: the features, running statistics
    included, are the source's after the transfer; only the head changed (review 44: the
    statistics were re-estimated on the target task)."""
    src = R.IMPRun(_hp(tmp_path, model="resnet20", levels=1, epochs=1, batch_size=128))
    src.run()
    tr = R.IMPRun(_hp(tmp_path, model="resnet20", levels=1, epochs=1, batch_size=128, transfer_from=str(src.dir),
                      split_seed=1, freeze_features=True, transfer_init="source"))
    tr.run()
    final, source = torch.load(tr.dir / "level_00" / "final.pt"), torch.load(src.dir / "level_01" / "final.pt")
    head = tr.output_layer(tr.new_model(0))
    stats = [k for k in source if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert stats
    for k in source:
        if k.startswith(head + "."):
            assert not torch.equal(final[k], source[k]), k
        else:
            assert torch.equal(final[k], source[k]), k


def test_transfer_of_the_last_level_says_when_the_source_moved_on(tmp_path, capsys):
    """--transfer-level -1 takes the source's last finished level once (a killed transfer
    resumes on it); after the source trains more levels in place, the same command says
    that a later level exists and how to transfer it (review 44), and every row names the
    source level it took."""
    src = R.IMPRun(_hp(tmp_path, levels=1))
    src.run()
    cmd = dict(transfer_from=str(src.dir), split_seed=1)
    (row,) = R.IMPRun(_hp(tmp_path / "t", **cmd)).run()
    assert row["source_level"] == 1
    assert "finished level" not in capsys.readouterr().out
    R.IMPRun(_hp(tmp_path, levels=2)).run()
    (same,) = R.IMPRun(_hp(tmp_path / "t", **cmd)).run()
    assert same["source_level"] == 1
    assert "the source has finished more levels since, and --transfer-level 2 transfers the one it names now" \
        in capsys.readouterr().out
    (new,) = R.IMPRun(_hp(tmp_path / "t", transfer_level=2, **cmd)).run()
    assert new["source_level"] == 2 and new["remaining"] < row["remaining"]


def test_unknown_layer_in_layer_fractions_fails_before_training(tmp_path):
    run = R.IMPRun(_hp(tmp_path, layer_fractions="fc1=0.3,fc9=0.5"))
    with pytest.raises(ValueError, match=r"--layer-fractions: 'fc9' is not a prunable layer of lenet_300_100 "
                                         r"\(its layers: fc1, fc2, fc3\)"):
        run.run()
    assert not run.dir.exists()  # nothing trained, no folder left behind


def test_transfer_inits_differ(tmp_path):
    """--transfer-init: θ_S, the source's θ0, or a fresh draw, which must not be θ0 when the
    source and the target share --init-seed (the default)."""
    src = R.IMPRun(_hp(tmp_path, levels=1))
    src.run()
    theta0 = torch.load(src.dir / "rewind.pt", weights_only=False)["init"]
    starts = {}
    for init in ("source", "init", "random"):
        tr = R.IMPRun(_hp(tmp_path, levels=1, transfer_from=str(src.dir), split_seed=1, transfer_init=init))
        tr.dir.mkdir(parents=True, exist_ok=True)
        starts[init] = tr._transfer_plan().start
    final = torch.load(src.dir / "level_01" / "final.pt", weights_only=False)
    for k in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert torch.equal(starts["init"][k], theta0[k]), k
        assert torch.equal(starts["source"][k], final[k]), k
        assert not torch.equal(starts["random"][k], theta0[k]), k
        assert starts["random"][k].std() == pytest.approx(theta0[k].std(), rel=0.2), k  # the same init law


def test_neq_inside_levels(tmp_path):
    for baseline in ("sparse", "dense"):
        rows = R.IMPRun(_hp(tmp_path, neq=True, neq_eps=0.5, epochs=3, baseline=baseline)).run()
        assert all(r["neq_frozen"] is not None for r in rows)
        assert any(r["neq_frozen"] > 0 for r in rows), baseline


@pytest.mark.parametrize("eps", [0.5, 50.0])
def test_neq_frozen_prefix_gets_no_backward_and_trains_the_same(tmp_path, monkeypatch, eps):
    """The accelerated NEq run cuts the backward at the fully frozen prefix (and, with an
    NEqConv2d after the first partial layer, its frozen outputs); the parameters it trains
    are bit-identical to the run without the cuts. eps=50 freezes every layer, so no
    parameter requires grad in the later epochs."""
    import contextlib
    seen = []
    real = R.freeze_prefix

    @contextlib.contextmanager
    def recording(model, **kw):
        with real(model, **kw) as prefix:
            seen.append(len(prefix))
            yield prefix

    monkeypatch.setattr(R, "freeze_prefix", recording)
    hp = dict(neq=True, neq_eps=eps, epochs=3, levels=1)
    cut = R.IMPRun(_hp(tmp_path / "cut", **hp))
    cut.run()
    assert max(seen) >= 1
    monkeypatch.setattr(R, "_neq_cuts", lambda *a, **k: contextlib.ExitStack())
    full = R.IMPRun(_hp(tmp_path / "full", **hp))
    full.run()
    _same(_finals(cut.dir), _finals(full.dir))


def test_neq_frozen_output_cut_fires_in_a_conv_run_and_trains_the_same(tmp_path, monkeypatch):
    """Conv-2 on digits with NEq: the layer after the first partially frozen conv computes
    its input gradient for the source's active channels only (cut_frozen_outputs), and the
    run's final weights are bit-identical to the run without the cuts."""
    import contextlib
    import sparseticket.nn.conv as C
    cuts = []
    real = C._input_cut

    def spy(consumer, x):
        needed = real(consumer, x)
        cuts.append(needed is not None)
        return needed

    monkeypatch.setattr(C, "_input_cut", spy)
    hp = dict(model="conv2", neq=True, neq_eps=0.02, epochs=4, levels=1, batch_size=120)
    cut = R.IMPRun(_hp(tmp_path / "cut", **hp))
    cut.run()
    assert sum(cuts) > 0
    monkeypatch.setattr(R, "_neq_cuts", lambda *a, **k: contextlib.ExitStack())
    full = R.IMPRun(_hp(tmp_path / "full", **hp))
    full.run()
    _same(_finals(cut.dir), _finals(full.dir))


def test_pin_modes_reuses_the_previous_levels_measurement(monkeypatch):
    """A layer sparse at the previous level stays sparse, one whose scaled sparse time is
    still clearly slower stays dense, and neither is measured again; the rest is measured."""
    import torch.nn as nn
    import sparseticket.nn as stnn
    from sparseticket.nn import _mode

    torch.manual_seed(0)
    model = stnn.sparsify(nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4)),
                          amount=0.5, scope="layerwise")
    dens = {n: m.density for n, m in model.named_modules() if isinstance(m, stnn.TicketModule)}
    measured = []
    real = _mode.measure
    monkeypatch.setattr(_mode, "measure", lambda s, d, *a, **k: measured.append(1) or real(s, d, *a, **k))
    previous = {
        "0": ("sparse", [1e-3, 2e-3, 0.6]),
        # measured at density 0.6: 3 ms sparse vs 1 ms dense; scaled to 0.5: 2.5 ms > 1.3 ms -> dense
        "2": ("dense", [3e-3, 1e-3, dens["2"] * 1.2]),
        # close call: scaled sparse time 1.0 ms vs 1 ms dense -> measured again
        "4": ("dense", [1.2e-3, 1e-3, dens["4"] * 1.2]),
    }
    _mode.clear_cache()
    evidence = R._pin_modes(model, torch.randn(5, 12), previous)
    assert [model[i].mode for i in (0, 2, 4)] == ["sparse", "dense", model[4].mode]
    assert model[4].mode in ("sparse", "dense")
    assert len(measured) == 1  # only layer 4
    assert evidence["0"] == previous["0"][1] and evidence["2"] == previous["2"][1]
    assert evidence["4"][2] == dens["4"] and evidence["4"][0] > 0 and evidence["4"][1] > 0


def test_pin_modes_keeps_nearly_dense_layers_dense_without_measuring(monkeypatch):
    """At >= DENSE_WITHOUT_MEASURING of its weights kept a layer is pinned dense unmeasured;
    a sparser one is measured; a forced mode is left alone."""
    import torch.nn as nn
    import sparseticket.nn as stnn
    from sparseticket.nn import _mode

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = {"0": torch.rand(10, 12) < 0.9, "2": torch.rand(8, 10) < 0.3, "4": torch.rand(4, 8) < 0.9}
    model = stnn.sparsify(model, masks=masks)
    model[4].mode = "sparse"
    assert model[0].density >= R.DENSE_WITHOUT_MEASURING > model[2].density
    measured = []
    real = _mode.measure
    monkeypatch.setattr(_mode, "measure", lambda s, d, *a, **k: measured.append(1) or real(s, d, *a, **k))
    _mode.clear_cache()
    evidence = R._pin_modes(model, torch.randn(5, 12), {})
    assert model[0].mode == "dense" and "0" not in evidence
    assert model[2].mode in ("sparse", "dense") and "2" in evidence and len(measured) == 1
    assert model[4].mode == "sparse"


def test_pin_modes_measures_convolutions_on_part_of_the_batch(monkeypatch):
    """Convolutions are measured on CONV_MEASURE_BATCH images, the other layers on the
    whole batch; every layer ends pinned with its evidence."""
    import torch.nn as nn
    import sparseticket.nn as stnn
    from sparseticket.nn import _mode

    torch.manual_seed(0)
    model = stnn.sparsify(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                        nn.Linear(4 * 36, 10), nn.ReLU(), nn.Linear(10, 3)),
                          amount=0.6, scope="layerwise")
    monkeypatch.setattr(R, "CONV_MEASURE_BATCH", 3)
    measured = []
    real = _mode.measure
    monkeypatch.setattr(_mode, "measure", lambda s, d, *a, **k: measured.append(1) or real(s, d, *a, **k))
    _mode.clear_cache()
    evidence = R._pin_modes(model, torch.randn(8, 1, 6, 6), {})
    assert len(measured) == 3 and set(evidence) == {"0", "3", "5"}
    assert all(model[i].mode in ("sparse", "dense") for i in (0, 3, 5))
    batch = {i: model[i]._last_key[11 if i == 0 else 4] for i in (0, 3, 5)}  # the batch bucket of each key
    assert batch == {0: _mode.batch_bucket(3), 3: _mode.batch_bucket(8), 5: _mode.batch_bucket(8)}


def test_stale_inputs_are_refused_whatever_the_mask_says(tmp_path, monkeypatch):
    """Random pruning ignores the weights, so a changed level_01/final.pt gives the same
    level-2 mask; with lr rewinding level 2 starts from that file all the same, and the
    resume is refused on its recorded digest."""
    cfg = dict(strategy="random", rewind="lr")
    _killed_at_first_checkpoint(monkeypatch, _hp(tmp_path, **cfg), "level_02")
    run = R.IMPRun(_hp(tmp_path, **cfg))
    final = run.dir / "level_01" / "final.pt"
    sd = torch.load(final)
    torch.save({k: v * 0.5 for k, v in sd.items()}, final)
    with pytest.raises(RuntimeError, match="level_02 was pruned from other weights or masks of level_01"):
        run.run()


def test_late_resetting_after_level_0_is_trained_again(tmp_path):
    """--rewind iter:K: a level 0 trained anew (its folder moved away) writes its own θK;
    and a folder from before θT was captured (iter:T, no 'iter' in rewind.pt) rewinds
    level 1 to level 0's final weights, which θT is."""
    run = R.IMPRun(_hp(tmp_path, rewind="iter:5", levels=1))
    run.run()
    path = run.dir / "rewind.pt"
    state = torch.load(path)
    fresh = {k: v.clone() for k, v in state["iter"].items()}
    state["iter"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["iter"].items()}  # a stale θK
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="rewind.pt holds another θ5 than the one level_00 wrote"):
        R.IMPRun(_hp(tmp_path, rewind="iter:5", levels=1)).run()
    for name in ("level_00", "level_01"):
        (run.dir / name).rename(tmp_path / f"old_{name}")
    R.IMPRun(_hp(tmp_path, rewind="iter:5", levels=1)).run()
    _same(torch.load(path)["iter"], fresh)

    T = json.loads((tmp_path / "old_level_00" / "metrics.json").read_text())["steps"]
    last = R.IMPRun(_hp(tmp_path / "T", rewind=f"iter:{T}", levels=1))
    ref = last.run()
    state = torch.load(last.dir / "rewind.pt")
    del state["iter"]
    torch.save(state, last.dir / "rewind.pt")
    (last.dir / "level_01").rename(tmp_path / "T_level_01")
    rows = R.IMPRun(_hp(tmp_path / "T", rewind=f"iter:{T}", levels=1)).run()
    assert [{k: r[k] for k in KEYS} for r in rows] == [{k: r[k] for k in KEYS} for r in ref]


def test_cli_usage_errors_and_transfer_level_out_of_range(tmp_path, capsys):
    from sparseticket.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["imp", "--pretrained", str(tmp_path / "x.pt"), "--rewind", "iter:5", "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "sparseticket imp: error: --rewind iter:5 with --pretrained" in capsys.readouterr().err
    src = R.IMPRun(_hp(tmp_path / "src", levels=1))
    src.run()
    with pytest.raises(RuntimeError, match="--transfer-level -5: the source .* has 2 finished level"):
        R.IMPRun(_hp(tmp_path / "t", transfer_from=str(src.dir), transfer_level=-5)).run()


@pytest.mark.parametrize("flags, message", [
    (["--momentum", "-1"], "--momentum must be in [0, 1), got -1.0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
    (["--gamma", "-1", "--milestones", "1"], "--gamma must be > 0, got -1.0"),
    (["--milestones=-1"], "--milestones are epochs >= 0, got '-1'"),
    (["--neq", "--neq-val-size", "0"], "--neq-val-size: must be a positive integer or None, got 0"),
    (["--neq", "--neq-mu", "2"], "--neq-mu: must be in [0, 1], got 2.0"),
])
def test_cli_rejects_bad_training_flags(tmp_path, capsys, flags, message):
    """Hyperparameters no run can use are usage errors before anything runs (review 44:
    optimizer and NEq tracebacks after a folder was made, or a negative learning rate)."""
    from sparseticket.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["imp", "--dataset", "digits", "--out", str(tmp_path), *flags])
    assert e.value.code == 2
    assert f"sparseticket imp: error: {message}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cli_bad_inputs_found_before_a_folder_exists(tmp_path, capsys):
    """A --pretrained file that is not a state dict, or another model's, and a late-resetting
    step past the end of level 0: a one-line error (exit 2) before any folder is made, not a
    traceback after it (review 44). Errors the runner raises later (a folder that does not fit
    the command) are one line too, exit 1."""
    from sparseticket.__main__ import main
    out = tmp_path / "runs"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pt"
    torch.save(R.IMPRun(_hp(tmp_path, model="conv2")).new_model(0).state_dict(), other)
    common = ["imp", "--dataset", "digits", "--out", str(out), "--progress", "false", "--plots", "false"]
    for flags, message in ((["--pretrained", str(junk)], f"--pretrained {junk}: not a readable state dict"),
                           (["--pretrained", str(other)], f"--pretrained {other} does not fit the model"),
                           (["--epochs", "1", "--rewind", "iter:1000"],
                            "--rewind iter:1000: level 0 trains 21 steps (1 epoch(s) of 21), so it never reaches "
                            "step 1000")):
        assert main(common + flags) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"sparseticket imp: error: {message}") and "Traceback" not in err, err
        assert not out.exists()
    hp = _hp(out, epochs=1, levels=0)
    clash = out / hp.run_name()
    clash.mkdir(parents=True)
    (clash / "hparams.json").write_text(json.dumps(hp.replace(lr=0.5).to_dict()))
    assert main(common + ["--epochs", "1", "--levels", "0", "--lr", "0.05", "--batch-size", "60",
                          "--kernels", "sparse"]) == 1
    assert "holds a run with other hyperparameters" in capsys.readouterr().err


def test_cli_compare_dense_table_files_and_plots(tmp_path, capsys):
    """`sparseticket imp --compare-dense` (the README's main command with small settings):
    the dense twin runs too, and the comparison is printed, written and plotted."""
    from sparseticket.__main__ import main
    pytest.importorskip("matplotlib")
    argv = ["imp", "--dataset", "digits", "--levels", "1", "--epochs", "1", "--batch-size", "60", "--lr", "0.05",
            "--kernels", "sparse", "--progress", "false", "--out", str(tmp_path), "--compare-dense"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    sparse = R.IMPRun(_hp(tmp_path, levels=1, epochs=1, kernels="sparse"))
    dense = R.IMPRun(_hp(tmp_path, levels=1, epochs=1, kernels="sparse", baseline="dense"))
    assert f"run folder: {sparse.dir}" in out and f"dense baseline: {dense.dir}" in out
    rows = json.loads((sparse.dir / "results.json").read_text())
    dense_rows = json.loads((dense.dir / "results.json").read_text())
    table = (sparse.dir / "comparison.csv").read_text().splitlines()
    assert table[0].split(",") == ["level", "remaining", "test_acc", "dense_test_acc", "seconds", "dense_seconds",
                                   "speedup"] and len(table) == 3
    for r, d, line in zip(rows, dense_rows, table[1:]):
        f = line.split(",")
        assert int(f[0]) == r["level"] == d["level"]
        assert float(f[2]) == pytest.approx(r["test_acc"]) and float(f[3]) == pytest.approx(d["test_acc"])
        assert float(f[4]) == pytest.approx(r["seconds"]) and float(f[5]) == pytest.approx(d["seconds"])
        assert float(f[6]) == pytest.approx(d["seconds"] / r["seconds"])
    lines = [ln for ln in out.splitlines() if ln.strip().startswith(("0 ", "1 ", "total"))]
    total = sum(d["seconds"] for d in dense_rows) / sum(r["seconds"] for r in rows)
    assert len(lines) == 3 and lines[-1].rstrip().endswith(f"{total:.2f}x")
    for png in ("time_per_level.png", "accuracy_vs_dense.png", "accuracy.png"):
        assert (sparse.dir / png).stat().st_size > 1000, png
    # the comparison covers every level both folders finished (review 44): extended without
    # --compare-dense it is refreshed (the twin lacks level 2, so still levels 0-1); extended
    # with it, levels 0-2; a command asking for fewer levels does not shrink it
    levels = lambda: [int(ln.split(",")[0]) for ln in (sparse.dir / "comparison.csv").read_text().splitlines()[1:]]
    before = (sparse.dir / "comparison.csv").stat().st_ino   # (written anew: a new file renamed over it)
    two = [a for a in argv if a != "--compare-dense"] + ["--levels", "2"]   # (the last --levels counts)
    assert main(two) == 0
    assert levels() == [0, 1] and (sparse.dir / "comparison.csv").stat().st_ino != before
    assert main(two + ["--compare-dense"]) == 0
    assert levels() == [0, 1, 2]
    assert main(argv) == 0
    assert levels() == [0, 1, 2]
    capsys.readouterr()
    # a control with no levels to run says so instead of naming a results file it has not written
    assert main(argv[:-1] + ["--control", "random_prune", "--levels", "0"]) == 0
    assert "no level to run" in capsys.readouterr().out


def test_a_run_folder_in_use_is_refused(tmp_path):
    """Two processes in one run folder would train the same levels: the second is refused
    with a clear error while the first holds the folder's lock, and runs once it is free."""
    fcntl = pytest.importorskip("fcntl")
    run = R.IMPRun(_hp(tmp_path, levels=1, epochs=1))
    run.dir.mkdir(parents=True)
    with open(run.dir / ".lock", "a+") as other:  # (another open file: flock treats it as another process)
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("process 12345\n")
        other.flush()
        with pytest.raises(RuntimeError, match=r"run folder .* is in use by process 12345"):
            run.run()
        assert not list(run.dir.glob("level_*"))
    rows = run.run()  # released: the run goes ahead, and a killed one leaves no lock behind
    assert [r["level"] for r in rows] == [0, 1]
    gen = R.IMPRun(_hp(tmp_path, levels=1, epochs=1)).levels()
    next(gen)  # holds the lock while suspended between levels ...
    with pytest.raises(RuntimeError, match="is in use"):
        R.IMPRun(_hp(tmp_path, levels=1, epochs=1)).run()
    gen.close()  # ... and frees it when closed
    assert len(R.IMPRun(_hp(tmp_path, levels=1, epochs=1)).run()) == 2


def test_installed_console_script(tmp_path):
    """The `sparseticket` command that pip installs (setup.py's console_scripts) runs an
    IMP level end to end; skipped only where the package is not installed (CI installs it)."""
    import importlib.metadata as md
    import shutil
    import sysconfig
    try:
        eps = md.distribution("sparseticket").entry_points
    except md.PackageNotFoundError:
        pytest.skip("sparseticket is not pip-installed here (scripts/setup.sh installs it)")
    (ep,) = [e for e in eps if e.group == "console_scripts" and e.name == "sparseticket"]
    assert ep.value == "sparseticket.__main__:main"
    script = shutil.which("sparseticket") or os.path.join(sysconfig.get_path("scripts"), "sparseticket")
    assert os.path.exists(script), "pip installed the package but not its console script"
    # the script imports the sparseticket this test imported (a checkout's, whatever the
    # editable install points at)
    root = str(Path(stnn.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([script, "imp", "--dataset", "digits", "--levels", "1", "--epochs", "1", "--out",
                        str(tmp_path), "--progress", "false", "--plots", "false", "--threads", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "level  1  remaining  80.2" in p.stdout
    (folder,) = tmp_path.glob("imp_lenet_300_100_digits_sparse_*")
    assert [r["level"] for r in json.loads((folder / "results.json").read_text())] == [0, 1]
    bad = subprocess.run([script, "imp", "--lr", "-1"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--lr must be >= 0" in bad.stderr
