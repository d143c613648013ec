"""Which sparseticket backends are live on this machine, and why the others are not.

    python -m sparseticket.info
"""
from __future__ import annotations

import os
import platform
import sys


def _cpu_flags() -> list:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512vl", "avx512bw", "avx512dq",
                              "avx512_bf16", "avx512_vnni"]
                    return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def report() -> str:
    import torch

    from . import ops

    lines = [f"sparseticket {__import__('sparseticket').__version__}",
             f"python {platform.python_version()}  torch {torch.__version__}  "
             f"(CUDA build: {torch.version.cuda or 'no'}; GPU visible: {torch.cuda.is_available()})",
             f"machine: {platform.machine()}  {platform.processor() or ''}  threads: {torch.get_num_threads()}",
             f"CPU features: {' '.join(_cpu_flags()) or 'unknown'}", ""]
    if ops._C is not None:
        lines.append(f"compiled CPU kernels: live, ISA in use: {ops._C.cpu_isa()} "
                     f"({ops._C.cpu_vector_bytes() * 8}-bit vectors; force with SPARSETICKET_ISA=avx512|avx2|base)")
        if hasattr(ops._C, "cpu_conv_tuning"):
            avx2 = "; with 256-bit vectors the weight gradient shifts gy from density 0.2" \
                if ops._C.cpu_vector_bytes() == 32 else ""
            lines.append(f"direct conv layout thresholds: {ops._C.cpu_conv_tuning()} "
                         f"(measured per CPU vendor, csrc/cpu/ops_conv.cpp{avx2})")
        lines.append(f"compiled CUDA kernels: {'built' if ops._C.with_cuda() else 'not built (torch is not a CUDA build)'}")
        if ops.STALE_OPS:
            lines.append(f"  STALE build: no compiled kernel for {', '.join(ops.STALE_OPS)} (reference used); rebuild "
                         "with: pip install --no-build-isolation -e .")
    else:
        lines.append(f"compiled CPU kernels: NOT live ({ops.EXTENSION_ERROR}); using the pure-PyTorch references")
        lines.append("  build them with: pip install --no-build-isolation -e .")
    try:
        import triton
        tri = f"triton {triton.__version__} installed"
        if os.environ.get("TRITON_INTERPRET") == "1":
            tri += " (TRITON_INTERPRET=1: kernels run on the CPU through the interpreter)"
    except ImportError as e:
        tri = f"triton not installed ({e})"
    lines.append(tri)
    lines.append("")
    lines.append("backend per device:")
    for dev, be in sorted(ops.BACKENDS.items()):
        lines.append(f"  {dev:5s} {be}")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
