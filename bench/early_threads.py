"""Set OMP_NUM_THREADS / MKL_NUM_THREADS from a script's ``--threads`` before torch loads.

OpenMP runtimes read these variables once, when they load (at ``import torch``), so the
benchmark scripts call ``early_threads(sys.argv[1:])`` before importing anything else.
Torch-free on purpose.
"""
from __future__ import annotations

import os


def early_threads(argv, default: int = 2) -> int:
    n = default
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    return n
