#!/usr/bin/env python
"""In-process A/B of the serial-work threshold (csrc/cpu/parallel.h) on a whole training step.

    python bench/ab_serial_work.py --model lenet_300_100 --densities 0.03,0.1,0.2,0.5,0.8

One sparsified model per density (random masks, output layer included), MaskedSGD, 2
threads; blocks of steps alternate between threshold 0 (every op on the thread pool) and
the default, reversing the order each round, and the table shows the median microseconds
per step of each. Wall-clock on a shared VM: read the ratio, not the absolute times.
"""
import argparse

import torch
import torch.nn.functional as F
from ab_common import interleaved_blocks


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet_300_100")
    p.add_argument("--densities", default="0.03,0.1,0.2,0.5,0.8")
    p.add_argument("--rounds", type=int, default=14)
    p.add_argument("--steps", type=int, default=150, help="steps per block")
    p.add_argument("--batch-size", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import sparseticket.nn as stnn
    from sparseticket import runtime
    from sparseticket.lottery.models import get_model
    from sparseticket.optim import MaskedSGD

    torch.set_num_threads(a.threads)
    runtime.retain_freed_memory()
    default = runtime.set_serial_work(0)
    runtime.set_serial_work(default)
    print(f"{'density':>8} {'pool (0) us':>12} {f'default ({default}) us':>22} {'pool/default':>13}")
    for dens in [float(d) for d in a.densities.split(",")]:
        torch.manual_seed(0)
        m = get_model(a.model, (1, 28, 28), 10)
        masks = {n: torch.rand_like(mod.weight) < dens for n, mod in m.named_modules()
                 if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d))}
        stnn.sparsify(m, masks=masks, mode="auto")
        opt = MaskedSGD(m.parameters(), lr=0.01, momentum=0.9)
        X, Y = torch.randn(2048, 1, 28, 28), torch.randint(0, 10, (2048,))
        bs = a.batch_size

        def step(i):
            j = (i * bs) % (X.shape[0] - bs)
            loss = F.cross_entropy(m(X[j:j + bs]), Y[j:j + bs])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for i in range(30):
            step(i)
        pos = [0]  # every block steps through the same batches, from the first

        def block_start(w):
            runtime.set_serial_work(w)
            pos[0] = 0

        def call():
            step(pos[0])
            pos[0] += 1

        if default == 0:
            raise SystemExit("ab_serial_work: the serial-work threshold is already 0; nothing to compare")
        med = interleaved_blocks({default: call, 0: call}, a.rounds, a.steps, before=block_start)
        runtime.set_serial_work(default)
        pool, dflt = med[0], med[default]
        print(f"{dens:8.3f} {pool:12.0f} {dflt:22.0f} {pool / dflt:13.3f}")


if __name__ == "__main__":
    main()
