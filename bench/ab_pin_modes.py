#!/usr/bin/env python
"""In-process A/B of the IMP runner's per-level path measurement (``_pin_modes``): the
convolutions measured on ``CONV_MEASURE_BATCH`` images of the batch against all of it.

    python bench/ab_pin_modes.py                                  # Conv-4, 64 / 51 / 41% kept, batch 64
    python bench/ab_pin_modes.py --model conv2 --densities 0.5 --rounds 5

Per density, a model sparsified with random masks of that density (every conv and linear
layer, mode 'auto', fused ReLUs as the runner has them) is measured by ``_pin_modes`` on
one batch, with the convolutions' batch at ``CONV_MEASURE_BATCH`` (``part``) and at the
whole batch (``whole``), alternating, the measurement cache cleared before each call.
Printed: the median seconds per call of each, and per layer the path each chose with the
sparse/dense time ratio behind it (from the last round). Wall-clock on a shared machine:
the choices near a ratio of 1/1.1 may differ between rounds for either setting.
"""
import argparse
import copy
import statistics
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="conv4")
    p.add_argument("--densities", default="0.64,0.51,0.41")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import torch
    import sparseticket.nn as stnn
    from sparseticket import runtime
    from sparseticket.lottery import runner as R
    from sparseticket.lottery.models import get_model

    torch.set_num_threads(a.threads)
    runtime.retain_freed_memory()
    torch.manual_seed(0)
    base = get_model(a.model, (1, 28, 28), 10)
    x = torch.randn(a.batch_size, 1, 28, 28)
    part = R.CONV_MEASURE_BATCH
    print(f"{a.model}, batch {a.batch_size}, convolutions measured on {part} images ('part') or all ('whole')")
    for dens in [float(d) for d in a.densities.split(",")]:
        masks = {n: torch.rand_like(m.weight) < dens for n, m in base.named_modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
        times = {"part": [], "whole": []}
        chosen = {}
        for r in range(a.rounds):
            for setting in (("part", "whole") if r % 2 == 0 else ("whole", "part")):
                m = stnn.sparsify(copy.deepcopy(base), masks=masks, mode="auto", fuse_relu=True)
                stnn.clear_cache()
                R.CONV_MEASURE_BATCH = part if setting == "part" else a.batch_size
                try:
                    t = time.perf_counter()
                    ev = R._pin_modes(m, x)
                    times[setting].append(time.perf_counter() - t)
                finally:
                    R.CONV_MEASURE_BATCH = part
                chosen[setting] = {n: (layer.mode[0], round(ev[n][0] / ev[n][1], 2) if n in ev else None)
                                   for n, layer in m.named_modules() if isinstance(layer, stnn.TicketModule)}
        print(f"{dens:.3f} kept: part {statistics.median(times['part']):.2f} s, "
              f"whole {statistics.median(times['whole']):.2f} s")
        for setting in ("part", "whole"):
            print(f"    {setting:5s} " + "  ".join(f"{n}:{c}{'' if r is None else f'({r})'}"
                                            for n, (c, r) in chosen[setting].items()))


if __name__ == "__main__":
    main()
