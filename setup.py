"""Builds ``due_ext._C``: the C++ (OpenMP) kernels always, the CUDA kernels when torch is a CUDA build and
nvcc is found (or ``FORCE_CUDA=1``). Install torch first, then ``pip install --no-build-isolation -e .``.

Environment:
  FORCE_CUDA=1          build the CUDA sources even if no GPU is visible (needs nvcc + a CUDA torch).
  DUE_EXT_NO_CUDA=1     never build CUDA sources.
  DUE_EXT_CPU_ARCH=...  ``-march`` of the CPU kernels, only when set (e.g. ``native`` for this machine's CPU,
                        ``x86-64-v3`` for AVX2 ones): the build then runs only on such CPUs. Unset or ``none``:
                        no ``-march``, the compiler's default target, so the build runs on any CPU of the
                        platform, as torch's own wheels do (ATen picks its vectorised kernels at run time).
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - a clear message instead of a traceback deep in setuptools
    sys.exit("due_ext: install torch first (pip install torch==2.13.0), then "
             "pip install --no-build-isolation -e .")

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cpu_flags() -> list[str]:
    # No -std: torch.utils.cpp_extension picks the standard its headers need (C++17, C++20 from torch 2.14).
    flags = ["-O3", "-fopenmp"]
    # Host-specific code only on request: a -march=native build dies with SIGILL on an older CPU.
    arch = os.environ.get("DUE_EXT_CPU_ARCH", "").strip()
    if arch and arch != "none":
        flags.append(f"-march={arch}")
    return flags


def _want_cuda() -> tuple[bool, str]:
    if os.environ.get("DUE_EXT_NO_CUDA", "0") == "1":
        return False, "DUE_EXT_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "nvcc not found (CUDA_HOME unset)"
    if os.environ.get("FORCE_CUDA", "0") == "1" or torch.cuda.is_available():
        return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, nvcc at {CUDA_HOME}"
    return False, "no GPU visible (set FORCE_CUDA=1 to build the CUDA kernels anyway)"


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    with_cuda, why = _want_cuda()
    print(f"due_ext: building C++ CPU kernels ({len(sources)} sources, flags {' '.join(_cpu_flags())})")
    # py_limited_api=True makes torch define Py_LIMITED_API itself
    define_macros: list[tuple[str, str]] = []
    extra = {"cxx": _cpu_flags()}
    if with_cuda:
        cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        print(f"due_ext: building CUDA kernels ({len(cuda_sources)} sources): {why}")
        extra["nvcc"] = ["-O3", "--use_fast_math"]
        define_macros.append(("DUE_EXT_WITH_CUDA", "1"))
        return CUDAExtension("due_ext._C", sources + cuda_sources, extra_compile_args=extra,
                             extra_link_args=["-fopenmp"], define_macros=define_macros, py_limited_api=True)
    print(f"due_ext: skipping CUDA kernels: {why}")
    return CppExtension("due_ext._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"],
                        define_macros=define_macros, py_limited_api=True)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
