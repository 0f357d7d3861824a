"""Every CUDA source in csrc/cuda compiles with nvcc against this torch's headers (no GPU, no CUDA torch needed).

Host and device code are compiled (``-c``) for sm_90; skipped only when nvcc is not installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
#: Kernels each object must define (mangled names contain these); add an entry per new source.
EXPECTED_KERNELS = {
    "explanation_loss_cuda.cu": ["cam_kernel", "plane_stats_kernel", "sample_stats_kernel", "plane_terms_kernel",
                                 "finalize_kernel"],
}


def nvcc_compile(source: Path, output: Path) -> subprocess.CompletedProcess:
    include = Path(torch.__file__).parent / "include"
    command = [NVCC, "-std=c++17", "-c", "-arch=sm_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               "-diag-suppress", "3306",  # torch headers' C++20 bit-field initialisers
               f"-I{include}", f"-I{include / 'torch/csrc/api/include'}", f"-I{sysconfig.get_paths()['include']}",
               str(source), "-o", str(output)]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_cuda_sources_exist():
    assert any(path.name == "explanation_loss_cuda.cu" for path in CUDA_SOURCES)


@needs_nvcc
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[path.name for path in CUDA_SOURCES])
def test_cuda_source_compiles(source, tmp_path):
    result = nvcc_compile(source, tmp_path / "out.o")
    assert result.returncode == 0, f"{source.name} does not compile:\n{result.stderr[-4000:]}"
    blob = (tmp_path / "out.o").read_bytes()
    for kernel in EXPECTED_KERNELS.get(source.name, []):
        assert kernel.encode() in blob, f"{source.name}: kernel {kernel} missing from the object"


@needs_nvcc
def test_nvcc_check_rejects_a_broken_source(tmp_path):
    """The check above is not vacuous: a source with a device-code error fails."""
    broken = tmp_path / "broken.cu"
    broken.write_text("__global__ void k(float* x) { x[threadIdx.x] = undefined_name; }\n")
    result = nvcc_compile(broken, tmp_path / "broken.o")
    assert result.returncode != 0 and "undefined_name" in result.stderr
