"""Pruning strategies and masks (sparseticket.pruning) and the runner's hyperparameters."""
import argparse

import pytest
import torch

from sparseticket.lottery.hparams import IMPHparams, add_arguments, from_args, layer_fractions, rewind_spec
from sparseticket.pruning import Mask, MagnitudePruning, RandomPruning, get_strategy


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(30, 40, generator=g), "b": torch.randn(7, 30, generator=g),
            "c": torch.randn(4, 3, 3, 3, generator=g)}


def _by_hand(weights, mask, fraction):
    """Global magnitude pruning written the obvious way: sort all kept |w|, cut the lowest."""
    flat = torch.cat([weights[n].abs().flatten()[mask[n].flatten()] for n in weights])
    k = int(round(fraction * flat.numel()))
    if k == 0:
        return {n: mask[n].clone() for n in weights}
    threshold = flat.sort().values[k - 1]
    return {n: mask[n] & (weights[n].abs() > threshold) for n in weights}


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_global_magnitude_matches_threshold(fraction):
    w = _weights()
    mask = Mask.ones_like(w)
    for _ in range(3):
        new = MagnitudePruning(fraction=fraction).prune(w, mask)
        expect = _by_hand(w, mask, fraction)
        for n in w:
            assert torch.equal(new[n], expect[n]), n
        assert new.is_subset_of(mask)
        assert new.kept() == mask.kept() - int(round(fraction * mask.kept()))
        mask = new


def test_layerwise_and_overrides():
    w = _weights(1)
    mask = Mask.ones_like(w)
    new = get_strategy("magnitude", fraction=0.5, scope="layerwise", overrides={"b": 0.1}).prune(w, mask)
    assert new.kept("a") == 600 and new.kept("c") == 54
    assert new.kept("b") == 210 - 21
    # each layer's lowest |w| went
    for n, frac in (("a", 0.5), ("b", 0.1)):
        dropped = w[n].abs()[~new[n]]
        kept = w[n].abs()[new[n]]
        assert dropped.max() <= kept.min()
    # global scope with an override: the override layer is pruned on its own
    g = get_strategy("magnitude", fraction=0.2, overrides={"b": 0.1}).prune(w, mask)
    assert g.kept("b") == 210 - 21
    assert g.kept("a") + g.kept("c") == (1200 + 108) - round(0.2 * (1200 + 108))


def test_random_pruning_counts_and_seed():
    w = _weights()
    ticket = MagnitudePruning(fraction=0.7).prune(w, Mask.ones_like(w))
    r1 = RandomPruning(seed=3).prune_like(Mask.ones_like(w), ticket)
    r2 = RandomPruning(seed=3).prune_like(Mask.ones_like(w), ticket)
    r3 = RandomPruning(seed=4).prune_like(Mask.ones_like(w), ticket)
    for n in w:
        assert r1.kept(n) == ticket.kept(n)
        assert torch.equal(r1[n], r2[n])
    assert any(not torch.equal(r1[n], r3[n]) for n in w)
    assert any(not torch.equal(r1[n], ticket[n]) for n in w)
    it = RandomPruning(fraction=0.5, seed=0).prune(w, Mask.ones_like(w))
    assert it.kept() == 1518 - 759


def test_mask_validation_errors():
    with pytest.raises(ValueError, match="binary"):
        Mask({"a": torch.tensor([0.0, 0.5])})
    with pytest.raises(TypeError, match="layer 'a'"):
        Mask({"a": [1, 0]})
    w = _weights()
    m = Mask.ones_like(w)
    with pytest.raises(ValueError, match="layer 'a'.*shape"):
        MagnitudePruning().prune({**w, "a": torch.randn(3, 3)}, m)
    with pytest.raises(KeyError, match="'zz'"):
        MagnitudePruning(overrides={"zz": 0.1}).prune(w, m)
    with pytest.raises(ValueError, match="fraction"):
        MagnitudePruning(fraction=1.5)
    with pytest.raises(ValueError, match="unknown pruning strategy"):
        get_strategy("snip")


def test_hparams_cli_roundtrip_and_hash():
    p = argparse.ArgumentParser()
    add_arguments(p)
    hp = from_args(p.parse_args(["--lr", "0.1", "--neq", "--layer-fractions", "fc1=0.3", "--rewind", "iter:50"]))
    assert hp.train.lr == 0.1 and hp.neq.neq is True and hp.prune.rewind == "iter:50"
    assert IMPHparams.from_dict(hp.to_dict()) == hp
    # run-only fields do not change the folder; results-changing ones do
    assert hp.replace(out="elsewhere", threads=1, progress=False).run_name() == hp.run_name()
    assert hp.replace(lr=0.2).run_name() != hp.run_name()
    assert hp.replace(baseline="dense").run_name() != hp.run_name()
    # an iterative level does not depend on how many follow it; a one-shot run's mask does
    assert hp.replace(levels=20).run_name() == hp.run_name()
    one = hp.replace(one_shot=True)
    assert one.replace(levels=20).run_name() != one.run_name()
    assert hp.run_name(legacy=True) != hp.replace(levels=20).run_name(legacy=True)
    assert layer_fractions("fc1=0.3, fc3=0.1") == {"fc1": 0.3, "fc3": 0.1}
    assert rewind_spec("iter:7") == ("iter", 7) and rewind_spec("lr") == ("lr", 0)
    for bad in (["--rewind", "iter:x"], ["--layer-fractions", "fc1"], ["--epochs", "0"], ["--fraction", "1.0"],
                ["--milestones", "a,b"], ["--layer-fractions", "fc1=1.5"], ["--layer-fractions", "fc1=1.0"],
                ["--layer-fractions", "fc1=nan"], ["--layer-fractions", "fc1=-0.1"], ["--model", "lenet5"],
                ["--dataset", "mnist10k"], ["--lr", "-0.1"]):
        with pytest.raises(ValueError):
            from_args(p.parse_args(bad))
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        IMPHparams.from_dict({"train": {"lrr": 1}})


def test_mask_digest_tells_masks_apart():
    """Equal masks give equal digests (whatever the insertion order or source dtype); moving
    one kept weight, renaming a layer or reshaping one changes it."""
    g = torch.Generator().manual_seed(0)
    a = {"fc1": torch.rand(30, 17, generator=g) > 0.5, "fc2": torch.rand(5, 30, generator=g) > 0.5}
    m = Mask(a)
    assert Mask({"fc2": a["fc2"].float(), "fc1": a["fc1"].clone()}).digest() == m.digest()
    moved = a["fc1"].clone()
    r = int((~moved).any(1).nonzero()[0])
    moved[r, int(moved[r].nonzero()[0])], moved[r, int((~moved[r]).nonzero()[0])] = False, True
    assert Mask({"fc1": moved, "fc2": a["fc2"]}).digest() != m.digest()
    assert Mask({"fc0": a["fc1"], "fc2": a["fc2"]}).digest() != m.digest()
    assert Mask({"fc1": a["fc1"].reshape(17, 30), "fc2": a["fc2"]}).digest() != m.digest()
    assert Mask({}).digest() == Mask({}).digest() != m.digest()


def test_lowest_selection_equals_the_stable_sort():
    """_drop_lowest's selection (kthvalue plus ties by position) picks exactly the first k
    of a stable argsort: random scores, heavy ties, all equal, NaNs and -0.0, every k."""
    from sparseticket.pruning.strategies import _lowest
    g = torch.Generator().manual_seed(0)
    for trial in range(600):
        n = int(torch.randint(1, 120, (1,), generator=g))
        kind = trial % 4
        if kind == 0:
            s = torch.rand(n, generator=g)
        elif kind == 1:
            s = torch.randint(0, 5, (n,), generator=g).float()
        elif kind == 2:
            s = torch.zeros(n)
        else:
            s = torch.randint(0, 3, (n,), generator=g).float()
            s[torch.rand(n, generator=g) < 0.2] = float("nan")
            s[0] = -0.0
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        want = torch.zeros(n, dtype=torch.bool)
        want[torch.argsort(s, stable=True)[:k]] = True
        assert torch.equal(_lowest(s, k), want), (trial, k)
