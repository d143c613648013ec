"""Build sparseticket's compiled kernels against the *installed* torch.

    pip install --no-build-isolation -e .

* CPU kernels (csrc/cpu) are always built; the kernel core is compiled once per ISA
  (AVX-512, AVX2, portable) and picked at run time from what the CPU supports.
* CUDA glue (csrc/cuda/*.cpp + .cu) is built only when torch itself is a CUDA build and
  CUDA_HOME is set: a visible GPU is not required, a CUDA torch is.
* SPARSETICKET_NO_EXT=1 skips the extension entirely; the package then runs on the
  pure-PyTorch reference kernels.
"""
import glob
import os

from setuptools import find_packages, setup

NO_EXT = os.environ.get("SPARSETICKET_NO_EXT", "0") not in ("", "0")


def get_extensions():
    if NO_EXT:
        return []
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-DNDEBUG", "-Wall", "-Wno-unknown-pragmas", "-ffp-contract=fast"]
    use_cuda = torch.version.cuda is not None and CUDA_HOME is not None and \
        os.environ.get("SPARSETICKET_NO_CUDA", "0") in ("", "0")
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                  include_dirs=[os.path.join(here, "csrc")], py_limited_api=False)
    if use_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "-std=c++17"]
        kwargs["define_macros"] = [("SPARSETICKET_WITH_CUDA", "1")]
        return [CUDAExtension("sparseticket._C", sources, **kwargs)]
    return [CppExtension("sparseticket._C", sources, **kwargs)]


def cmdclass():
    if NO_EXT:
        return {}
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="sparseticket",
    version="0.1.0",
    description="Lottery-ticket sparsity and NEq neuron freezing that save real wall-clock time and FLOPs",
    packages=find_packages(include=["sparseticket", "sparseticket.*"]),
    ext_modules=get_extensions(),
    cmdclass=cmdclass(),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "expecttest", "hypothesis"],
        "triton": ["triton>=3.0"],
        "data": ["mlxtend", "scikit-learn"],
        "plot": ["matplotlib"],
        "progress": ["tqdm"],
        "checkpoint": ["safetensors"],
    },
    entry_points={"console_scripts": ["sparseticket=sparseticket.__main__:main"]},
    zip_safe=False,
)
