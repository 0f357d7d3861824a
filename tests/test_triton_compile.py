"""Triton kernels compile for a real GPU target (sm_90) without a GPU: ``triton.compile`` must emit PTX.

To add a kernel, append a :class:`KernelSpec` to ``KERNELS`` (``signature``: argument name -> Triton type,
``"constexpr"`` for compile-time arguments; ``constexprs``: their values; ``entry``: text the PTX must hold).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") == "1":  # interpreted kernels cannot be compiled
    pytest.skip("TRITON_INTERPRET=1: kernels are interpreted, not compiled", allow_module_level=True)

import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


@dataclass
class KernelSpec:
    name: str
    kernel: Any  # zero-argument callable returning the @triton.jit function (imports stay lazy)
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    entry: str = ""


def _loss_kernels():
    from due_ext.ops.triton import explanation_loss as module

    return module


def _tables(prefix_types: dict[str, str], dtype: str) -> dict[str, str]:
    out = dict(prefix_types)
    for axis in ("lx", "ly", "lz"):
        out.update({f"{axis}_i0": "*i32", f"{axis}_i1": "*i32", f"{axis}_f": f"*{dtype}"})
    return out


def _dims(names: str) -> dict[str, str]:
    return {name: "i32" for name in names.split()}


def _explanation_loss_specs() -> list[KernelSpec]:
    specs = []
    for dtype in ("fp32", "fp64"):
        specs.append(KernelSpec(
            f"explanation_loss.cam_kernel[{dtype}]", lambda: _loss_kernels().cam_kernel,
            {"features_ptr": f"*{dtype}", "alpha_ptr": f"*{dtype}", "cam_ptr": f"*{dtype}", "scale_ptr": f"*{dtype}",
             "channels": "i32", "low": "i32", "BLOCK": "constexpr"}, {"BLOCK": 64}, "cam_kernel"))
    for dtype in ("fp32",):
        specs.append(KernelSpec(
            f"explanation_loss.plane_stats_kernel[{dtype}]", lambda: _loss_kernels().plane_stats_kernel,
            {**_tables({"cam_ptr": f"*{dtype}"}, dtype), "stats_ptr": f"*{dtype}", "counts_ptr": "*i32",
             **_dims("d h w X Y Z"), "BY": "constexpr", "BZ": "constexpr"}, {"BY": 64, "BZ": 64},
            "plane_stats_kernel"))
    for method in (0, 3):  # due (two channels, tanh via exp, writes S) and haics (logs)
        specs.append(KernelSpec(
            f"explanation_loss.plane_terms_kernel[method={method}]", lambda: _loss_kernels().plane_terms_kernel,
            {**_tables({"cam_ptr": "*fp32", "target_ptr": "*fp32", "soft_ptr": "*fp32", "weights_ptr": "*fp32",
                        "minmax_ptr": "*fp32", "out_cam_ptr": "*fp32"}, "fp32"),
             "sums_ptr": "*fp32", "q_ptr": "*fp32", **_dims("d h w X Y Z"), "inv_n": "fp32",
             "METHOD": "constexpr", "HAS_WEIGHTS": "constexpr", "NEED_GRAD": "constexpr", "WRITE_CAM": "constexpr",
             "BY": "constexpr", "BZ": "constexpr", "BQ": "constexpr"},
            {"METHOD": method, "HAS_WEIGHTS": True, "NEED_GRAD": True, "WRITE_CAM": method == 0, "BY": 64, "BZ": 64,
             "BQ": 16}, "plane_terms_kernel"))
    return specs


KERNELS: list[KernelSpec] = [*_explanation_loss_specs()]


def compile_for_gpu(spec: KernelSpec):
    source = triton.compiler.ASTSource(fn=spec.kernel(), signature=spec.signature, constexprs=spec.constexprs)
    return triton.compile(source, target=TARGET)


@pytest.mark.parametrize("spec", KERNELS, ids=[spec.name for spec in KERNELS])
def test_kernel_compiles_to_ptx(spec):
    ptx = compile_for_gpu(spec).asm["ptx"]
    assert ".target sm_90" in ptx
    assert f".entry {spec.entry}" in ptx


@triton.jit
def _shape_mismatch_kernel(x_ptr, BLOCK: tl.constexpr):
    a = tl.load(x_ptr + tl.arange(0, BLOCK))
    b = tl.load(x_ptr + tl.arange(0, 2 * BLOCK))
    tl.store(x_ptr + tl.arange(0, BLOCK), a + b)  # (BLOCK,) + (2 BLOCK,): must not compile


def test_broken_kernel_is_rejected():
    spec = KernelSpec("broken", lambda: _shape_mismatch_kernel, {"x_ptr": "*fp32", "BLOCK": "constexpr"},
                      {"BLOCK": 32})
    with pytest.raises(triton.compiler.errors.CompilationError):
        compile_for_gpu(spec)
