#!/usr/bin/env python
"""In-process A/B of the sparse step's paths: sparsify(fuse_relu=True) with and without its MLP chain node, MLPStep (Python and C++), its fused update and fixed block.

    python bench/ab_step_paths.py --model lenet_300_100 --densities 0.03,0.1,0.33 --rounds 60
    python bench/ab_step_paths.py --model conv4 --densities 0.134,0.41 --batch-size 64 --steps 5 --rounds 20

A model MLPStep cannot take (Conv-4) compares ``unfused``, ``fused`` and ``conv_relu`` (the
fusion before session 23: every conv applies its ReLU, the max-pools none; ``fused`` has
the pools apply the ReLU of the conv before them, MaxPool2d's ``relu_after``).

Per density, one model sparsified three times from the same weights and random masks
(output layer included): ``unfused`` (modules and autograd), ``fused`` (each layer+ReLU
pair one op and one autograd node, sparse_linear_relu / sparse_conv2d_relu; the chain
below removed), ``chain`` (what ``sparsify(fuse_relu=True)`` gives an MLP: all its layers
one autograd node, ``sparseticket.nn.fast_step.ChainForward``; the drop-in training
loop is unchanged), ``mlp_py`` (the fused model's
gradients by sparseticket.nn.MLPStep's Python op sequence, no autograd) and ``mlpstep``
(the same sequence as one C++ call, MLPStep's default on the CPU), ``step`` (``fast.step(x, y,
opt)``: MaskedSGD's update inside that call) and ``fixed`` (the same in a ``fast.fixed(opt)``
block: checks once). All train with MaskedSGD on the same
batch; blocks of steps alternate, the order reversed every round, and the table has the
median microseconds per step and the ratios to ``unfused`` (and of ``mlpstep`` to
``step`` and ``fixed``). Before timing, one step of
each is checked to give bit-identical losses. Wall-clock on a shared VM: read the ratios,
not the absolute times.
"""
import argparse
import contextlib
import copy

import torch
import torch.nn.functional as F
from ab_common import interleaved_blocks


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet_300_100")
    p.add_argument("--densities", default="0.03,0.1,0.33")
    p.add_argument("--mode", default="sparse", choices=["sparse", "auto"])
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--steps", type=int, default=60, help="steps per block")
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import sparseticket.nn as stnn
    from sparseticket import runtime
    from sparseticket.lottery.models import get_model
    from sparseticket.nn.fast_step import remove_chains
    from sparseticket.optim import MaskedSGD

    torch.set_num_threads(a.threads)
    runtime.retain_freed_memory()
    print(f"{'density':>8} {'unfused us':>11} {'fused us':>9} {'chain us':>9} {'mlp_py us':>10} {'mlpstep us':>11} {'step us':>8} "
          f"{'fixed us':>9} {'unfused/fused':>14} {'fused/chain':>12} {'unfused/mlp_py':>15} {'unfused/mlpstep':>16} "
          f"{'mlp_py/mlpstep':>15} {'mlpstep/step':>13} {'mlpstep/fixed':>14}")
    blocks = contextlib.ExitStack()  # the fixed contenders' blocks, open while they are timed
    for dens in [float(d) for d in a.densities.split(",")]:
        torch.manual_seed(0)
        base = get_model(a.model, (1, 28, 28), 10)
        masks = {n: torch.rand_like(m.weight) < dens for n, m in base.named_modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        x = torch.randn(a.batch_size, 1, 28, 28)
        y = torch.randint(0, 10, (a.batch_size,))

        def make(fuse, mlp_step=False, native=True, fused_update=None, chain=False, pool_relu=True):
            m = stnn.sparsify(copy.deepcopy(base), masks=masks, mode=a.mode, fuse_relu=fuse)
            if not chain:
                remove_chains(m)
            if not pool_relu:  # each conv applies its ReLU again, the pool after it none
                kids = list(m.children())
                for i, pool in enumerate(kids):
                    if isinstance(pool, stnn.MaxPool2d) and pool.relu_after:
                        pool.relu_after = False
                        kids[i - 2].set_activation("relu")
            opt = MaskedSGD(m.parameters(), lr=0.01, momentum=0.9)
            fast = stnn.MLPStep(m, native=native)
            if fused_update == "step":
                return lambda: fast.step(x, y, opt)
            if fused_update == "fixed":
                fixed_step = blocks.enter_context(fast.fixed(opt))
                return lambda: fixed_step(x, y)

            def step():
                if mlp_step:
                    loss = fast(x, y)
                else:
                    loss = F.cross_entropy(m(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                return loss.detach()
            return step

        fs = {"unfused": make(False), "fused": make(True)}
        mlp = stnn.MLPStep(stnn.sparsify(copy.deepcopy(base), masks=masks, mode=a.mode, fuse_relu=True)).reason is None
        if not mlp:  # a conv net: also the fusion as it was before the ReLU moved after the pool
            fs["conv_relu"] = make(True, pool_relu=False)
        if mlp:
            fs.update(chain=make(True, chain=True), mlp_py=make(True, True, native=False), mlpstep=make(True, True),
                      step=make(True, fused_update="step"), fixed=make(True, fused_update="fixed"))
        if a.mode == "sparse":  # 'auto' may pick different paths for the contenders
            losses = [f() for f in fs.values()]
            assert all(torch.equal(losses[0], v) for v in losses), "the contenders' steps differ"
        for f in fs.values():
            for _ in range(20):
                f()
        med = interleaved_blocks(fs, a.rounds, a.steps, warmup=5)
        u, f = med["unfused"], med["fused"]
        if not mlp:
            cr = med["conv_relu"]
            print(f"{dens:8.3f} {u:11.0f} {f:9.0f}   conv_relu {cr:.0f} us, conv_relu/fused {cr / f:.3f}   "
                  f"{u / f:14.3f}", flush=True)
            continue
        c, p, s, st, fx = med["chain"], med["mlp_py"], med["mlpstep"], med["step"], med["fixed"]
        print(f"{dens:8.3f} {u:11.0f} {f:9.0f} {c:9.0f} {p:10.0f} {s:11.0f} {st:8.0f} {fx:9.0f} {u / f:14.3f} {f / c:12.3f} {u / p:15.3f} "
              f"{u / s:16.3f} {p / s:15.3f} {s / st:13.3f} {s / fx:14.3f}", flush=True)


if __name__ == "__main__":
    main()
