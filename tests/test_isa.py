"""The op tests again under every other instruction set the CPU can run.

The compiled kernels exist per ISA (AVX-512, AVX2, portable) and the dispatcher takes the
best one, so a run of the suite exercises only one of them; an AVX2 code path that exists
only for machines without AVX-512 (bitmap expand/compress, register transposes) would
otherwise never run on an AVX-512 machine; nor would the index and row-pointer checks and
the ReLU/bias-gradient pass, which are per ISA too (test_errors, test_fused_relu).
SPARSETICKET_ISA is read once per process,
hence the subprocess. (The convolution kernels have their own ISA test in
test_sparse_conv.py.)
"""
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _isa_now():
    from sparseticket.ops import _C
    return None if _C is None else _C.cpu_isa()


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_ops_under_isa(isa):
    now = _isa_now()
    if now is None:
        pytest.skip("compiled kernels not built")
    if isa == now:
        pytest.skip(f"{isa} is the default here: the rest of the suite tests it")
    if isa == "avx2" and now == "base":
        pytest.skip("CPU without AVX2")
    env = dict(os.environ, SPARSETICKET_ISA=isa, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE, os.environ.get("PYTHONPATH", "")]))
    check = subprocess.run([sys.executable, "-c", "from sparseticket.ops import _C; print(_C.cpu_isa())"],
                           env=env, capture_output=True, text=True, timeout=120)
    assert check.stdout.strip() == isa, check.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(HERE, "test_bitmap.py"), os.path.join(HERE, "test_ops.py"),
                        os.path.join(HERE, "test_parallel.py"), os.path.join(HERE, "test_batch_shards.py"),
                        os.path.join(HERE, "test_errors.py"), os.path.join(HERE, "test_fused_relu.py")],
                       env=env, capture_output=True, text=True, timeout=900, cwd=os.path.dirname(HERE))
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-2000:])
