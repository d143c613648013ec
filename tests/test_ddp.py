"""torch.distributed DDP with two gloo processes on the CPU.

Sparse and NEq models trained by DDP, each rank on half of the global batch, end where
one process training on the whole batch ends (DDP averages the ranks' gradients of their
mean losses, which is the gradient of the mean loss over the global batch); float64 makes
the check tight. Also: the buckets DDP all-reduces hold the compact gradients (nnz values,
not O·I); masks agree on every rank; the recipe for a mask change that alters nnz (a new
Parameter: rebuild DDP), and what happens without it; NEq decisions taken on different
per-rank data agree (the tracker broadcasts rank 0's); DDP built inside freeze_prefix.

One spawn runs every scenario (process start-up and gloo set-up dominate); each test
reads its part of the results and replays the scenario in one process.
"""
import os
import socket
import time
from datetime import timedelta

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparseticket.nn as stnn
from sparseticket.neq import NEqConfig, NEqTracker, freeze_prefix
from sparseticket.optim import MaskedSGD

WORLD = 2
BATCH = 16  # global; each rank gets BATCH // WORLD
F64 = torch.float64
TIMEOUT_S = 120


# ----------------------------------------------------------------------------- scenarios (ranks and reference)


def _batch(step, shape, n_classes, rank):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn((BATCH,) + shape, generator=g, dtype=F64)
    y = torch.randint(0, n_classes, (BATCH,), generator=g)
    if rank is None:
        return x, y
    return x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]


def _train(net, opt, steps, shape, n_classes, rank, log=None):
    """Steps of mean cross-entropy; ``log`` gets the bytes all-reduced in each step."""
    per_step = []
    for s in steps:
        x, y = _batch(s, shape, n_classes, rank)
        if log is not None:
            log.clear()
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if log is not None:
            per_step.append(sum(log))
    return per_step


def _ddp(model, rank, **kw):
    """(DDP wrapper with a comm hook logging bucket bytes, the log); the model itself for rank None."""
    if rank is None:
        return model, None
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    net, log = DDP(model, **kw), []

    def hook(state, bucket):
        log.append(bucket.buffer().numel() * bucket.buffer().element_size())
        return allreduce_hook(None, bucket)

    net.register_comm_hook(None, hook)
    return net, log


def _sparse_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).to(F64)
    return stnn.sparsify(model, amount=0.8, scope="layerwise", mode="sparse")


def _sparse_layers(model):
    return [m for m in model if isinstance(m, stnn.TicketModule)]


def _gathered_masks_agree(model, rank):
    """Every rank's keep masks (and active masks) gathered and compared on this rank."""
    if rank is None:
        return True
    import torch.distributed as dist

    agree = True
    for m in model.modules():
        mine = [m.mask()] if isinstance(m, stnn.TicketModule) else []
        if getattr(m, "active", None) is not None:
            mine.append(m.active)
        for t in mine:
            t = t.to(torch.uint8).contiguous()
            got = [torch.empty_like(t) for _ in range(WORLD)]
            dist.all_gather(got, t)
            agree &= all(torch.equal(g, got[0]) for g in got)
    return agree


def _prune_further(model, fraction):
    """Magnitude masks dropping ``fraction`` of each layer's kept weights (a new nnz)."""
    layers = {str(i): m for i, m in enumerate(model) if isinstance(m, stnn.TicketModule)}
    masks = stnn.magnitude_masks({n: m.dense_weight() for n, m in layers.items()},
                                 {n: m.mask() for n, m in layers.items()}, fraction, scope="layerwise")
    for n, m in layers.items():
        m.set_mask(masks[n])


def sparse_scenario(rank):
    model = _sparse_mlp()
    net, log = _ddp(model, rank, forward_sync_buffers=False)
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    out = {"numel": [sum(p.numel() for p in model.parameters())]}
    out["bytes"] = _train(net, opt, range(0, 3), (20,), 4, rank, log)
    # same nnz, new structure: the Parameter object stays, so the DDP wrapper stays valid
    first = model[0]
    first.set_mask(torch.roll(first.mask(), 1, dims=1))
    out["bytes"] += _train(net, opt, range(3, 5), (20,), 4, rank, log)
    # another nnz: new Parameters, so DDP is rebuilt (MaskedSGD follows by itself)
    _prune_further(model, 0.5)
    net, log = _ddp(model, rank, forward_sync_buffers=False)
    out["numel"].append(sum(p.numel() for p in model.parameters()))
    out["bytes"] += _train(net, opt, range(5, 8), (20,), 4, rank, log)
    out["dense_numel"] = sum(m.out_features * m.in_features + m.out_features for m in _sparse_layers(model))
    out["agree"] = _gathered_masks_agree(model, rank)
    out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def _neq_convnet():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 3 * 3, 5)).to(F64)
    stnn.sparsify(model, amount=0.5, scope="layerwise", mode="sparse", filter=lambda name, m: name != "0")
    return stnn.enable_neq(model)  # layer 0: NEqConv2d; 2: SparseConv2d; 5: SparseLinear


NEQ_EPS = 0.02


def neq_scenario(rank, frozen=None):
    """Rank: trackers on per-rank validation data decide after 3 steps (one broadcasting,
    one not). Reference (rank None): applies ``frozen`` (rank 0's decisions) at that point."""
    model = _neq_convnet()
    net, _ = _ddp(model, rank)  # buffers (``active`` included) synced from rank 0 at every forward
    opt = MaskedSGD(model.parameters(), lr=0.2, momentum=0.5)
    out = {}
    if rank is not None:
        val = torch.randn(24, 2, 8, 8, generator=torch.Generator().manual_seed(50 + rank), dtype=F64)
        local = NEqTracker(model, val, NEqConfig(rule="code", eps=NEQ_EPS, broadcast=False))
        shared = NEqTracker(model, val, NEqConfig(rule="code", eps=NEQ_EPS))
    _train(net, opt, range(0, 3), (2, 8, 8), 5, rank)
    if rank is not None:
        local.measure()
        local.update()
        shared.step()
        out["local"], out["frozen"] = local.frozen(), shared.frozen()
        out["agree"] = _gathered_masks_agree(model, rank)
    else:
        for name, f in frozen.items():
            model.get_submodule(name).set_active(~f if f.any() else None)
    out["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    _train(net, opt, range(3, 6), (2, 8, 8), 5, rank)
    out["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return out


def prefix_scenario(rank):
    """A fully frozen first layer cut off by freeze_prefix, with DDP built inside the block
    (DDP registers only parameters that require grad)."""
    torch.manual_seed(2)
    model = stnn.enable_neq(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4)).to(F64))
    model[0].set_active(torch.zeros(32, dtype=torch.bool))
    model[2].set_active(torch.arange(4) % 2 == 0)
    opt = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9)
    with freeze_prefix(model):
        net, _ = _ddp(model, rank)
        _train(net, opt, range(0, 3), (20,), 4, rank)
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def stale_scenario(rank):
    """A mask change that alters nnz with the old DDP wrapper kept: the next step trains
    unsynchronised (the new Parameter is unknown to DDP, and its bucket never completes),
    the one after raises."""
    import torch.distributed as dist

    model = _sparse_mlp()
    net, _ = _ddp(model, rank)
    opt = MaskedSGD(model.parameters(), lr=0.1)
    _train(net, opt, range(0, 1), (20,), 4, rank)
    _prune_further(model, 0.5)
    _train(net, opt, range(1, 2), (20,), 4, rank)
    v = model[0].weight_values.detach()
    got = [torch.empty_like(v) for _ in range(WORLD)]
    dist.all_gather(got, v)
    out = {"synced_after_stale_step": torch.equal(got[0], got[1]), "error": None}
    try:
        _train(net, opt, range(2, 3), (20,), 4, rank)
    except RuntimeError as e:
        out["error"] = str(e)
    return out


def check_scenario(rank):
    """stnn.check_same_masks on masks that agree, then on a rank-1 mask rolled by one column
    (the same nnz, which DDP's constructor would not notice), then on NEq active sets."""
    out = {}

    def check(model):
        try:
            stnn.check_same_masks(model)
            return "ok"
        except RuntimeError as e:
            return str(e)

    model = _sparse_mlp()
    out["same"] = check(model)
    if rank == 1:
        model[2].set_mask(torch.roll(model[2].mask(), 1, dims=1))
    out["differ"] = check(model)
    torch.manual_seed(3)
    neq = stnn.enable_neq(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4)).to(F64))
    out["neq_same"] = check(neq)
    if rank == 1:
        neq[0].set_active(torch.arange(32) % 2 == 0)
    out["neq_differ"] = check(neq)
    return out


def prefix_outside_scenario(rank):
    """DDP built before freeze_prefix: it waits for the prefix's gradients, which never come."""
    torch.manual_seed(2)
    model = stnn.enable_neq(nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4)).to(F64))
    model[0].set_active(torch.zeros(32, dtype=torch.bool))
    net, _ = _ddp(model, rank)
    opt = MaskedSGD(model.parameters(), lr=0.1)
    out = {"steps": 0, "error": None}
    with freeze_prefix(model):
        try:
            for s in range(3):
                _train(net, opt, range(s, s + 1), (20,), 4, rank)
                out["steps"] += 1
        except RuntimeError as e:
            out["error"] = str(e)
    return out


# ----------------------------------------------------------------------------- processes


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        res = {"sparse": sparse_scenario(rank), "neq": neq_scenario(rank), "prefix": prefix_scenario(rank),
               "check": check_scenario(rank)}
        # these two leave a DDP reducer mid-reduction: last
        res["prefix_outside"] = prefix_outside_scenario(rank)
        res["stale"] = stale_scenario(rank)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def _assert_states_close(a, b, what):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=f"{what}: {k}")
        else:
            assert torch.equal(a[k], b[k]), f"{what}: {k}"


# ----------------------------------------------------------------------------- tests


def test_sparse_ddp_matches_one_process(ranks):
    ref = sparse_scenario(None)
    for r, res in enumerate(ranks):
        _assert_states_close(res["sparse"]["state"], ref["state"], f"rank {r}")


def test_allreduce_moves_compact_gradients(ranks):
    res = ranks[0]["sparse"]
    before, after = res["numel"]
    assert res["bytes"] == [before * 8] * 5 + [after * 8] * 3  # float64: weight_values (nnz) + biases, per step
    assert before < 0.3 * res["dense_numel"] and after < before  # nnz, not O·I
    assert ranks[1]["sparse"]["bytes"] == res["bytes"]


def test_masks_identical_on_every_rank(ranks):
    for res in ranks:
        assert res["sparse"]["agree"] and res["neq"]["agree"]
    s0, s1 = ranks[0]["sparse"]["state"], ranks[1]["sparse"]["state"]
    for k in s0:
        if k.endswith(("crow", "col")):
            assert torch.equal(s0[k], s1[k])


def test_check_same_masks_names_the_layers_that_differ(ranks):
    """Same-nnz mask differences, which DDP's constructor lets through, are caught on every
    rank, naming the layer and the ranks."""
    for res in ranks:
        c = res["check"]
        assert c["same"] == "ok" and c["neq_same"] == "ok"
        assert c["differ"].startswith("sparseticket: the masks differ between ranks")
        assert "2 (kept weights): rank(s) [1] differ from rank 0" in c["differ"] and "0 (kept" not in c["differ"]
        assert "0 (NEq active set): rank(s) [1] differ from rank 0" in c["neq_differ"]


def test_check_same_masks_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        stnn.check_same_masks(_sparse_mlp())


def test_neq_decisions_agree_across_ranks_and_training_matches(ranks):
    r0, r1 = ranks[0]["neq"], ranks[1]["neq"]
    # each rank's own decisions differ (different validation data) ...
    assert any(not torch.equal(r0["local"][n], r1["local"][n]) for n in r0["local"])
    # ... the broadcast ones are rank 0's everywhere
    for n in r0["frozen"]:
        assert torch.equal(r0["frozen"][n], r1["frozen"][n])
        assert torch.equal(r0["frozen"][n], r0["local"][n])
    assert any(f.any() for f in r0["frozen"].values()), "pick NEQ_EPS so that something freezes"
    ref = neq_scenario(None, frozen=r0["frozen"])
    for r, res in enumerate((r0, r1)):
        _assert_states_close(res["state"], ref["state"], f"rank {r}")
    # frozen rows kept their bits through the DDP steps
    for name, f in r0["frozen"].items():
        if not f.any():
            continue
        for suffix in ("weight", "bias"):
            key = f"{name}.{suffix}"
            if key in r0["state"]:
                assert torch.equal(r0["state"][key][f], r0["before"][key][f])


def test_ddp_built_inside_freeze_prefix(ranks):
    ref = prefix_scenario(None)
    for r, res in enumerate(ranks):
        _assert_states_close(res["prefix"]["state"], ref["state"], f"rank {r}")


def test_stale_ddp_after_nnz_change_desyncs_then_fails(ranks):
    """Why the recipe rebuilds DDP: kept, the old wrapper does not sync the new Parameter."""
    for res in ranks:
        assert not res["stale"]["synced_after_stale_step"]
        assert res["stale"]["error"] is not None and "finished reduction" in res["stale"]["error"]


def test_ddp_built_before_freeze_prefix_fails_at_second_step(ranks):
    for res in ranks:
        assert res["prefix_outside"]["steps"] == 1
        assert "finished reduction" in res["prefix_outside"]["error"]
