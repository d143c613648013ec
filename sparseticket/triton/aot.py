"""Compile every Triton kernel ahead of time for real GPUs, without a GPU.

    python -m sparseticket.triton.aot               # first autotune config, sm_80 and sm_90
    python -m sparseticket.triton.aot --all-configs # every autotune config (slower)
    python -m sparseticket.triton.aot --quick       # one variant per kernel (what the tests run)

Triton's compiler does not need a device: given a signature and a target it lowers a kernel
through TTIR/TTGIR/LLVM to PTX and runs ptxas to a cubin. This catches what the CPU
interpreter cannot: code that does not type-check or lower for NVIDIA (pointer casts, fp64
dots, scalar types), ptxas failures, and tiles whose shared memory exceeds the SM's limit.
It does not run the code: numerics are checked by the interpreter tests, speed by
``bench/bench_gpu.py`` on a GPU.

Must run with TRITON_INTERPRET unset (interpreted kernels are not compilable objects).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Tuple

#: dynamic shared memory a block may use (bytes): A100 163 KB, H100 227 KB
SHARED_LIMIT = {80: 166912, 90: 232448}
ARCHS = (80, 90)


@dataclass
class Variant:
    kernel: str
    arch: int
    dtype: str
    constexprs: Dict[str, object]
    options: Dict[str, object] = field(default_factory=dict)


def _kernels():
    """name -> (autotuner or JITFunction, signature builder(dtype) -> {arg: type}, constexpr variants(dtype))."""
    import triton.language as tl

    from . import grad_weight, optim, sddmm, spmm

    tl_dt = {"fp32": tl.float32, "fp64": tl.float64}

    def rowsplit_sig(dt):
        return dict(d_ptr=f"*{dt}", stride_d_row="i32", stride_d_b="i32", val_ptr=f"*{dt}", ptr_ptr="*i32",
                    idx_ptr="*i32", order_ptr="*i32", bias_ptr=f"*{dt}", out_ptr=f"*{dt}", stride_out_b="i32",
                    stride_out_row="i32", n_rows="i32", B="i32", nnz="i32", n_cols="i32", row_len_bucket="i32")

    def rowsplit_cx(dt):
        return [dict(HAS_ORDER=True, HAS_BIAS=b, ACC=tl_dt[dt]) for b in (True, False)]

    def sddmm_sig(dt):
        return dict(g_ptr=f"*{dt}", stride_g_row="i32", stride_g_b="i32", x_ptr=f"*{dt}", stride_x_col="i32",
                    stride_x_b="i32", crow_ptr="*i32", col_ptr="*i32", active_ptr="*i1", out_ptr=f"*{dt}",
                    nnz="i32", n_rows="i32", n_cols="i32", B="i32", n_search="i32")

    def sddmm_cx(dt):
        return [dict(HAS_ACTIVE=a, ACC=tl_dt[dt]) for a in (True, False)]

    def gw_sig(dt):
        return dict(gy_ptr=f"*{dt}", stride_gy_b="i32", stride_gy_o="i32", x_ptr=f"*{dt}", stride_x_b="i32",
                    stride_x_i="i32", order_ptr="*i32", n_active_ptr="*i32", out_ptr=f"*{dt}",
                    stride_out_o="i32", stride_out_i="i32", O="i32", I="i32", B="i32")

    def gw_cx(dt):
        precisions = ("ieee", "tf32") if dt == "fp32" else ("ieee",)
        return [dict(HAS_ACTIVE=a, ACC=tl_dt[dt], INPUT_PRECISION=p) for a in (True, False) for p in precisions]

    def sgd_sig(dt):
        return dict(meta_ptr="*i64", chunk_ptr="*i64", lr="fp64", momentum="fp64", dampening_complement="fp64",
                    weight_decay="fp64", n_search="i32")

    def sgd_cx(dt):
        base = dict(DT=tl_dt[dt], BLOCK=1024, ITERS=4)
        return [dict(base, HAS_MOMENTUM=True, NESTEROV=n, MAXIMIZE=m, HAS_WD=True) for n, m in ((True, False), (False, True))] + \
            [dict(base, HAS_MOMENTUM=False, NESTEROV=False, MAXIMIZE=False, HAS_WD=False)]

    def adamw_sig(dt):
        return dict(meta_ptr="*i64", chunk_ptr="*i64", decay="fp64", lerp_weight="fp64", beta2="fp64",
                    one_minus_beta2="fp64", neg_step_size="fp64", bias_correction2_sqrt="fp64", eps="fp64",
                    n_search="i32")

    def adamw_cx(dt):
        base = dict(DT=tl_dt[dt], BLOCK=1024, ITERS=4, MAXIMIZE=False, HAS_WD=True, LERP_SMALL=True)
        return [dict(base, AMSGRAD=a) for a in (True, False)]

    return {
        "csr_dense_rowsplit": (spmm._csr_dense_rowsplit_kernel, rowsplit_sig, rowsplit_cx),
        "sddmm": (sddmm._sddmm_kernel, sddmm_sig, sddmm_cx),
        "row_masked_grad_weight": (grad_weight._row_masked_grad_weight_kernel, gw_sig, gw_cx),
        "masked_sgd": (optim._masked_sgd_kernel, sgd_sig, sgd_cx),
        "masked_adamw": (optim._masked_adamw_kernel, adamw_sig, adamw_cx),
    }


def _jit_and_configs(kernel):
    """(JITFunction, [(constexprs, options)]) for an autotuned or plain jitted kernel."""
    configs = getattr(kernel, "configs", None)
    if configs is None:
        return kernel, [({}, {"num_warps": 4})]
    jit = kernel.fn
    while hasattr(jit, "fn") and not hasattr(jit, "arg_names"):
        jit = jit.fn
    out = []
    for c in configs:
        out.append((dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages}))
    return jit, out


def _pruned(kernel, configs, signature):
    """The configs the autotuner would try for this signature (its early_config_prune, if any)."""
    prune = getattr(kernel, "early_config_prune", None)
    if prune is None:
        return configs
    import torch
    import triton

    dtypes = {"*fp32": torch.float32, "*fp64": torch.float64, "*i32": torch.int32, "*i64": torch.int64,
              "*i1": torch.bool}
    named = {a: torch.empty(0, dtype=dtypes[t]) for a, t in signature.items() if t in dtypes}
    as_config = [triton.Config(kw, **opts) for kw, opts in configs]
    kept = prune(as_config, named)
    return [(dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages}) for c in kept]


def variants(all_configs: bool = False, archs=ARCHS, dtypes=("fp32", "fp64"), kernels=None,
             quick: bool = False) -> Iterator[Tuple]:
    for name, (kernel, sig, cx) in _kernels().items():
        if kernels and name not in kernels:
            continue
        jit, all_kernel_configs = _jit_and_configs(kernel)
        for dt in dtypes:
            configs = _pruned(kernel, all_kernel_configs, sig(dt))
            if not all_configs:
                configs = configs[:1]
            for arch in archs:
                for flags in cx(dt)[:1] if quick else cx(dt):
                    for kw, opts in configs:
                        yield name, jit, sig(dt), dict(flags, **kw), dict(opts), arch, dt


def compile_one(jit, signature, constexprs, options, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    full_sig = {}
    for arg in jit.arg_names:
        full_sig[arg] = "constexpr" if arg in constexprs else signature[arg]
    src = ASTSource(fn=jit, signature=full_sig, constexprs=constexprs)
    opts = dict(options, enable_fp_fusion=bool(options.get("enable_fp_fusion", True)))
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)


def run(all_configs: bool = False, archs=ARCHS, dtypes=("fp32", "fp64"), kernels=None, verbose: bool = True,
        quick: bool = False) -> List[str]:
    """Compile every variant; returns a list of failures (empty when all compiled and fit)."""
    from ._common import interpreting

    if interpreting():
        raise RuntimeError("sparseticket.triton.aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    failures = []
    n = 0
    t0 = time.time()
    for name, jit, sig, cx, opts, arch, dt in variants(all_configs, archs, dtypes, kernels, quick):
        n += 1
        label = f"{name} sm_{arch} {dt} {cx} {opts}"
        try:
            compiled = compile_one(jit, sig, cx, opts, arch)
        except Exception as e:  # report every failure, not just the first
            failures.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            continue
        shared = compiled.metadata.shared
        if shared > SHARED_LIMIT[arch]:
            failures.append(f"{label}: needs {shared} B of shared memory, sm_{arch} has {SHARED_LIMIT[arch]}")
        elif verbose:
            print(f"ok  {label}  shared={shared}B", flush=True)
    if verbose:
        print(f"{n - len(failures)}/{n} kernel variants compiled for "
              f"{', '.join(f'sm_{a}' for a in archs)} in {time.time() - t0:.1f}s")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not only the first")
    ap.add_argument("--arch", type=int, action="append", help="SM version(s), default 80 and 90")
    ap.add_argument("--dtype", action="append", choices=("fp32", "fp64"))
    ap.add_argument("--kernel", action="append", help="kernel name(s), default all")
    ap.add_argument("--quick", action="store_true", help="one flag combination per kernel (the test suite's check)")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    failures = run(args.all_configs, tuple(args.arch or ARCHS), tuple(args.dtype or ("fp32", "fp64")), args.kernel,
                   verbose=not args.quiet, quick=args.quick)
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
