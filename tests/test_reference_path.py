"""The autograd tests again on the pure-PyTorch path (SPARSETICKET_NO_EXT=1), in a fresh Python.

Without the compiled library every op runs its reference and every differentiable op
gets the Python autograd formulas of sparseticket/ops/__init__.py: the path of a machine
where the extension did not build, and of the Triton and CUDA backends. Those formulas
are registered only when the C++ ones are missing, so the rest of the suite, which loads
the library, never runs them (review 50).
"""
import os
import subprocess
import sys

import pytest

FILES = ["test_autograd.py", "test_double_backward.py"]


@pytest.mark.skipif(os.environ.get("SPARSETICKET_NO_EXT", "0") not in ("", "0"),
                    reason="this process is already on the reference path: the files run here directly")
def test_autograd_on_the_reference_path():
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, SPARSETICKET_NO_EXT="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *[os.path.join(here, f) for f in FILES]],
                          env=env, cwd=os.path.dirname(here), capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    assert " passed" in proc.stdout
