"""The GPU sources of the DDIM step compile without a GPU: Triton to PTX for sm_90, the .cu file with nvcc."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("dtype,compute", [("fp32", "float32"), ("fp64", "float64"), ("bf16", "float32")])
def test_triton_kernel_compiles_to_ptx(dtype, compute):
    triton = pytest.importorskip("triton")
    import triton.language as tl
    from triton.backends.compiler import GPUTarget

    from due_ext.ops.triton.ddim import ddim_step_kernel

    signature = {
        "x_ptr": f"*{dtype}", "eps_ptr": f"*{dtype}", "noise_ptr": f"*{dtype}", "alpha_t_ptr": "*fp64",
        "alpha_prev_ptr": "*fp64", "out_ptr": f"*{dtype}", "per_chain": "i32", "blocks_per_chain": "i32",
        "eta": "fp32", "clip": "fp32", "CLIP": "constexpr", "NOISE": "constexpr", "COMPUTE_DTYPE": "constexpr",
        "BLOCK": "constexpr",
    }
    source = triton.compiler.ASTSource(fn=ddim_step_kernel, signature=signature, constexprs={
        "CLIP": True, "NOISE": True, "COMPUTE_DTYPE": getattr(tl, compute), "BLOCK": 1024})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    ptx = compiled.asm["ptx"]
    assert ".entry ddim_step_kernel" in ptx and ".target sm_90" in ptx
    assert "sqrt.rn.f64" in ptx  # per-chain coefficients are formed in double precision
    if dtype == "fp64":
        assert "ld.global.v2.b64" in ptx or "ld.global.b64" in ptx


def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    include = Path(torch.__file__).parent / "include"
    command = [nvcc, "-std=c++17", "-O3", "--ptx", "-arch=sm_90", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               "-diag-suppress", "3306", f"-I{include}", f"-I{include / 'torch/csrc/api/include'}",
               f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc/cuda/ddim_step_cuda.cu"),
               "-o", str(tmp_path / "ddim_step_cuda.ptx")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ptx = (tmp_path / "ddim_step_cuda.ptx").read_text()
    # 4 dtypes x (clip on/off) x (noise on/off)
    assert ptx.count(".entry") == 16 and "ddim_step_kernel" in ptx
