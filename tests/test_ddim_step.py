"""The fused DDIM step: reference against MONAI's DDIMScheduler, every kernel against the reference, autograd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler

import due_ext.ops.ddim as ddim_module
from due_ext.ops import ddim_step
from due_ext.ops.ddim_reference import ddim_step_reference

ALPHA_T = torch.tensor([0.05, 0.4, 0.93], dtype=torch.float64)
ALPHA_PREV = torch.tensor([0.09, 0.55, 1.0], dtype=torch.float64)


def sample(shape=(3, 2, 5, 4), dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


def scheduler(clip_sample: bool, dtype=torch.float64, steps: int = 20) -> DDIMScheduler:
    s = DDIMScheduler(num_train_timesteps=1000, clip_sample=clip_sample)
    s.set_timesteps(steps)
    s.alphas_cumprod = s.alphas_cumprod.to(dtype)
    s.final_alpha_cumprod = s.final_alpha_cumprod.to(dtype)
    return s


def monai_alphas(s: DDIMScheduler, t: int) -> tuple[float, float]:
    prev = t - s.num_train_timesteps // s.num_inference_steps
    return float(s.alphas_cumprod[t]), float(s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod)


# --- the reference is MONAI's DDIMScheduler.step ------------------------------------------------------------


@pytest.mark.parametrize("clip_sample", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_reference_matches_monai_step_per_chain(clip_sample, eta):
    s = scheduler(clip_sample)
    timesteps = [int(t) for t in s.timesteps[[0, 7, 19]]]  # 950, 600, 0 (the last goes to alpha_prev = 1)
    x, eps, _ = sample((3, 1, 6, 5), scale=2.0)
    expected, noises = [], []
    for b, t in enumerate(timesteps):
        seed = 100 + b
        noises.append(torch.randn((1, 1, 6, 5), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
        prev, _ = s.step(eps[b:b + 1], t, x[b:b + 1], eta=eta, generator=torch.Generator().manual_seed(seed))
        expected.append(prev)
    alphas = [monai_alphas(s, t) for t in timesteps]
    a_t = torch.tensor([a for a, _ in alphas], dtype=torch.float64)
    a_prev = torch.tensor([p for _, p in alphas], dtype=torch.float64)
    ours = ddim_step_reference(x, eps, a_t, a_prev, eta, torch.cat(noises), 1.0 if clip_sample else None)
    assert clip_sample is False or bool(((x - (1 - a_t.view(-1, 1, 1, 1)).sqrt() * eps).abs()
                                         > a_t.view(-1, 1, 1, 1).sqrt()).any())  # the clamp is exercised
    torch.testing.assert_close(ours, torch.cat(expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(ddim_step(x, eps, a_t, a_prev, eta, torch.cat(noises), 1.0 if clip_sample else None),
                               torch.cat(expected), atol=1e-6, rtol=0)


def test_public_op_follows_monai_sampling_loop_float32():
    """Twenty DDIM steps of a toy epsilon model: our op and MONAI's scheduler stay together (float32)."""
    s = DDIMScheduler(num_train_timesteps=1000, clip_sample=True)
    s.set_timesteps(20)
    x_ours = x_monai = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    def model(x, t):
        return torch.tanh(x) * (t / 1000.0)

    for t in s.timesteps:
        t = int(t)
        x_monai, _ = s.step(model(x_monai, t), t, x_monai, eta=0.0)
        a_t, a_prev = monai_alphas(s, t)
        x_ours = ddim_step(x_ours, model(x_ours, t), a_t, a_prev, 0.0, clip_x0=1.0)
    assert x_ours.dtype == torch.float32
    torch.testing.assert_close(x_ours, x_monai, atol=2e-5, rtol=1e-5)


# --- the compiled kernel against the reference --------------------------------------------------------------

CASES = [(0.0, None), (0.0, 1.0), (0.6, None), (1.0, 0.8)]


@pytest.mark.parametrize("eta,clip", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_cpp_matches_reference(eta, clip, dtype, tol):
    x, eps, noise = sample(dtype=dtype, scale=2.0)
    noise = noise if eta > 0 else None
    out = torch.ops.due_ext.ddim_step(x, eps, ALPHA_T, ALPHA_PREV, eta, noise, clip)
    ref = ddim_step_reference(x, eps, ALPHA_T, ALPHA_PREV, eta, noise, clip)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_half_types_compute_in_float32(dtype):
    x, eps, noise = sample(dtype=dtype)
    out = torch.ops.due_ext.ddim_step(x, eps, ALPHA_T, ALPHA_PREV, 0.5, noise, 1.0)
    ref = ddim_step_reference(x, eps, ALPHA_T, ALPHA_PREV, 0.5, noise, 1.0)
    assert out.dtype == dtype
    # float32 math rounded once: at most one unit in the last place of the half type apart
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(out.float(), ref.float(), atol=ulp, rtol=ulp)


def test_cpp_parallel_split_inside_chains():
    """Larger than one thread's grain: worker ranges start and end in the middle of chains."""
    x, eps, noise = sample((3, 50_001), dtype=torch.float32, seed=4)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = ddim_step(x, eps, ALPHA_T, ALPHA_PREV, 0.3, noise, 1.5)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(out, ddim_step_reference(x, eps, ALPHA_T, ALPHA_PREV, 0.3, noise, 1.5),
                               atol=2e-6, rtol=2e-6)


def test_noncontiguous_scalar_and_zero_dim_alphas():
    x, eps, _ = sample((4, 6, 5))
    xt, et = x.transpose(1, 2), eps.transpose(1, 2)
    assert not xt.is_contiguous()
    expected = ddim_step_reference(xt.contiguous(), et.contiguous(), 0.3, 0.45, 0.0, None, None)
    torch.testing.assert_close(ddim_step(xt, et, 0.3, 0.45), expected)
    alpha_prev32 = torch.tensor(0.45, dtype=torch.float32)  # used at its float32 value, 0.449999988...
    torch.testing.assert_close(ddim_step(xt, et, torch.tensor(0.3), alpha_prev32),
                               ddim_step_reference(xt, et, 0.3, float(alpha_prev32)))


def test_empty_batch():
    x = torch.zeros(0, 3)
    assert ddim_step(x, x.clone(), 0.3, 0.5).shape == (0, 3)


def test_final_step_to_alpha_one_returns_clamped_x0():
    x, eps, noise = sample((2, 7))
    out = ddim_step(x, eps, 0.8, 1.0, eta=1.0, noise=noise, clip_x0=0.5)  # sigma = 0 when alpha_prev = 1
    x0 = ((x - 0.2**0.5 * eps) / 0.8**0.5).clamp(-0.5, 0.5)
    torch.testing.assert_close(out, x0)


def test_default_cpu_backend_is_cpp_not_reference(monkeypatch):
    monkeypatch.delenv("DUE_EXT_BACKEND", raising=False)

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran although the C++ kernel is built")

    monkeypatch.setattr(ddim_module, "ddim_step_reference", fail)
    x, eps, _ = sample()
    ddim_step(x, eps, 0.3, 0.5)
    monkeypatch.setenv("DUE_EXT_BACKEND", "reference")
    with pytest.raises(AssertionError, match="the reference ran"):
        ddim_step(x, eps, 0.3, 0.5)


# --- autograd ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta,clip", CASES)
def test_gradcheck_cpp(eta, clip):
    x, eps, noise = (t.requires_grad_() for t in sample((3, 2, 3), scale=1.5))

    def step(x, eps, noise):
        return ddim_step(x, eps, ALPHA_T, ALPHA_PREV, eta, noise, clip)

    assert torch.autograd.gradcheck(step, (x, eps, noise))
    assert torch.autograd.gradgradcheck(step, (x, eps, noise))


@pytest.mark.parametrize("eta,clip", CASES)
def test_gradients_equal_reference_autograd(eta, clip):
    x, eps, noise = (t.requires_grad_() for t in sample(scale=2.0, seed=7))
    out = ddim_step(x, eps, ALPHA_T, ALPHA_PREV, eta, noise, clip)
    ref = ddim_step_reference(x, eps, ALPHA_T, ALPHA_PREV, eta, noise, clip)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, eps, noise), grad, allow_unused=True)
    theirs = torch.autograd.grad(ref, (x, eps, noise), grad, allow_unused=True)
    for a, b in zip(ours, theirs, strict=True):
        if b is None:  # eta == 0: noise is not used
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    if clip is not None:  # where the clamp is active, x_t gets no gradient
        assert bool((ours[0] == 0).any()) and bool((ours[0] != 0).any())


@pytest.mark.parametrize("eta,clip", CASES)
def test_opcheck_cpp(eta, clip):
    x, eps, noise = sample((2, 3, 4))
    args = (x.requires_grad_(), eps, ALPHA_T[:2], ALPHA_PREV[:2], eta, noise if eta > 0 else None, clip)
    torch.library.opcheck(torch.ops.due_ext.ddim_step.default, args)


# --- argument errors -----------------------------------------------------------------------------------------


def test_errors_name_the_problem():
    x, eps, noise = sample((3, 4))
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(x, eps, 0.3, 0.5, eta=0.5)
    with pytest.raises(ValueError, match="eps .* must match x_t"):
        ddim_step(x, eps[:, :2], 0.3, 0.5)
    with pytest.raises(ValueError, match="noise .* must match x_t"):
        ddim_step(x, eps, 0.3, 0.5, eta=0.5, noise=noise.float())
    with pytest.raises(ValueError, match=r"alpha_t must be a number or a \(B,\) = \(3,\) tensor"):
        ddim_step(x, eps, torch.full((2,), 0.3), 0.5)
    with pytest.raises(ValueError, match=r"alpha_prev is a cumulative alpha and must lie in \(0, 1\]"):
        ddim_step(x, eps, 0.3, 1.5)
    with pytest.raises(ValueError, match=r"alpha_t is a cumulative alpha"):
        ddim_step(x, eps, torch.tensor([0.3, 0.0, 0.2]), 0.5)
    with pytest.raises(ValueError, match="schedule constants"):
        ddim_step(x, eps, torch.full((3,), 0.3, requires_grad=True), 0.5)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        ddim_step(x, eps, 0.3, 0.5, eta=-0.1)
    with pytest.raises(ValueError, match="clip_x0 must be > 0"):
        ddim_step(x, eps, 0.3, 0.5, clip_x0=0.0)
    with pytest.raises(ValueError, match="alpha_prev >= alpha_t"):
        ddim_step(x, eps, 0.5, 0.3, eta=0.5, noise=noise)
    with pytest.raises(TypeError, match="floating tensor"):
        ddim_step(x.long(), eps.long(), 0.3, 0.5)
    with pytest.raises(RuntimeError, match="eps has shape"):  # the raw op checks too
        torch.ops.due_ext.ddim_step(x, eps[:, :2], ALPHA_T, ALPHA_PREV, 0.0, None, None)


# --- Triton, under the interpreter (the variable must be set before triton is imported) -----------------------

TRITON_SCRIPT = textwrap.dedent("""
    import json, torch
    from due_ext.ops import ddim_step
    from due_ext.ops.ddim_reference import ddim_step_reference
    from due_ext.ops._dispatch import select_backend
    result = {"backend": select_backend("ddim_step", torch.device("cpu")), "max_error": {}}
    a_t = torch.tensor([0.05, 0.4, 0.93], dtype=torch.float64)
    a_prev = torch.tensor([0.09, 0.55, 1.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x, eps, noise = (2 * torch.randn(3, 40, 33, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
        for eta, clip in [(0.0, None), (0.0, 1.0), (0.6, None), (1.0, 0.8)]:
            n = noise if eta > 0 else None
            out = ddim_step(x, eps, a_t, a_prev, eta, n, clip)
            ref = ddim_step_reference(x, eps, a_t, a_prev, eta, n, clip)
            key = f"{dtype}-{eta}-{clip}"
            assert out.dtype == dtype, key
            error = (out.double() - ref.double()).abs() / ref.double().abs().clamp_min(1)
            result["max_error"][key] = float(error.max())
    x, eps, noise = (torch.randn(2, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(3))
    step = lambda x, e, n: ddim_step(x, e, a_t[:2], a_prev[:2], 0.7, n, 1.0)
    result["gradcheck"] = bool(torch.autograd.gradcheck(step, (x, eps, noise)))
    torch.library.opcheck(torch.ops.due_ext.ddim_step_triton.default,
                          (x, eps, a_t[:2], a_prev[:2], 0.7, noise, 1.0))
    result["opcheck"] = True
    print(json.dumps(result))
""")


def test_triton_kernel_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", DUE_EXT_BACKEND="triton")
    run = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["backend"] == "triton"
    assert result["gradcheck"] and result["opcheck"]
    for key, error in result["max_error"].items():
        # relative to max(|x_prev|, 1); bfloat16: float32 math rounded once, at most one bfloat16 ulp apart
        tolerance = 1e-12 if "float64" in key else 1e-6 if "float32" in key else torch.finfo(torch.bfloat16).eps
        assert error <= tolerance, (key, error)
