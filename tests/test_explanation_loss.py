"""The fused explanation loss (C++ / CUDA / Triton) against its pure-PyTorch reference.

Covers: forward and gradients of every available backend on a seeded sweep of odd shapes (ties, all-zero
CAMs, relu-zero regions included), gradcheck in float64, torch.library.opcheck, torch.compile tracing,
return_cam, RES-G, input validation, the guards (flat CAMs give a zero gradient, NaN gives a NaN loss),
float16/bfloat16 inputs, and the Triton kernels under TRITON_INTERPRET=1 (in a subprocess, since the variable
is read when triton is imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import due_ext
from due_ext.explain.cam import normalized_cam
from due_ext.ops import explanation_loss
from due_ext.ops.explanation_loss import FUSED_METHODS
from due_ext.ops.explanation_loss_reference import (
    RES_SLACK,
    explanation_loss_reference,
    gaussian_imputation,
    method_loss,
)

COMPILED_BACKENDS = [name for name in ("cpp", "cuda") if due_ext.backends()[name].available]
#: The backends that run in this process (Triton runs in the TRITON_INTERPRET subprocess below).
BACKENDS = ["reference", *COMPILED_BACKENDS]
DEVICE_OF = {"reference": "cpu", "cpp": "cpu", "cuda": "cuda"}
needs_cpp = pytest.mark.skipif("cpp" not in COMPILED_BACKENDS, reason="due_ext._C is not built")


def make_inputs(seed: int, batch: int, channels: int, low: tuple[int, int, int], size: tuple[int, int, int],
                dtype: torch.dtype = torch.float32, device: str = "cpu", case: str = "random"):
    """Features, alpha, mask, soft target, weights. ``case``: random | zero_cam | relu_ties | max_ties."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn((batch, channels, *low), generator=gen, dtype=torch.float64) * 4.0
    alpha = torch.randn((batch, channels), generator=gen, dtype=torch.float64)
    if case == "zero_cam":
        alpha[0] = 0.0  # sample 0: cam == 0 everywhere (min == max)
    elif case == "relu_ties":
        features[:, :, : low[0] // 2 + 1] = -features[:, :, : low[0] // 2 + 1].abs()
        alpha = alpha.abs()  # a slab of the cam is exactly 0: many voxels tie at the minimum
    elif case == "max_ties":
        # two equal, non-adjacent low-res maxima on points the upsample samples exactly (see test sizes)
        features = features.abs() * 0.1
        alpha = alpha.abs() + 0.1
        features[:, :, 0, 0, 0] = 100.0
        features[:, :, -1, -1, -1] = 100.0
        alpha = torch.ones_like(alpha)
        features[:, 1:] = 0.0
    mask = (torch.rand((batch, *size), generator=gen, dtype=torch.float64) > 0.7).to(torch.float64)
    soft = torch.rand((batch, *size), generator=gen, dtype=torch.float64)
    weights = torch.rand((batch, *size), generator=gen, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (features, alpha, mask, soft, weights)]


# (seed, B, C, (d, h, w), (X, Y, Z), case): odd sizes, B 1..4, C up to 8
SWEEP = [
    (0, 1, 1, (1, 1, 1), (3, 3, 3), "random"),
    (1, 2, 3, (3, 4, 2), (7, 9, 5), "random"),
    (2, 3, 8, (2, 3, 3), (5, 11, 7), "random"),
    (3, 4, 5, (4, 4, 4), (9, 9, 5), "random"),
    (4, 2, 2, (3, 2, 5), (3, 5, 13), "random"),
    (5, 1, 7, (5, 3, 2), (11, 3, 9), "random"),
    (6, 2, 4, (3, 3, 3), (5, 7, 5), "zero_cam"),
    (7, 3, 3, (4, 3, 2), (7, 5, 5), "relu_ties"),
    (8, 2, 3, (3, 4, 2), (5, 7, 5), "max_ties"),
    (9, 4, 6, (2, 2, 2), (4, 6, 8), "random"),
    (10, 3, 1, (3, 5, 3), (5, 9, 5), "random"),
]


def _loss_and_grads(fn, features, alpha, *rest, **kwargs):
    features = features.detach().clone().requires_grad_(True)
    alpha = alpha.detach().clone().requires_grad_(True)
    loss = fn(features, alpha, *rest, **kwargs)
    # a non-uniform upstream gradient checks the per-sample scaling of backward
    upstream = torch.arange(1, loss.numel() + 1, dtype=loss.dtype, device=loss.device)
    grads = torch.autograd.grad((loss * upstream).sum(), (features, alpha))
    return loss.detach(), grads


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    scale = max(1.0, expected.abs().max().item())
    error = (actual - expected).abs().max().item()
    assert error <= rel * scale, f"{what}: max error {error:.3g} > {rel:g} x {scale:.3g}"


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
@pytest.mark.parametrize("method", FUSED_METHODS)
def test_backend_matches_reference_sweep(backend, method, monkeypatch):
    monkeypatch.setenv("DUE_EXT_BACKEND", backend)
    for seed, batch, channels, low, size, case in SWEEP:
        features, alpha, mask, soft, weights = make_inputs(seed, batch, channels, low, size,
                                                           device=DEVICE_OF[backend], case=case)
        for w in (weights, None):
            where = f"{backend}/{method} seed {seed} ({case}) weights={w is not None}"
            loss, grads = _loss_and_grads(explanation_loss, features, alpha, mask, soft, w, method)
            ref_loss, ref_grads = _loss_and_grads(explanation_loss_reference, features, alpha, mask, soft, w,
                                                  method)
            assert loss.shape == (batch,) and torch.isfinite(loss).all(), where
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=where)
            for name, got, want in zip(("features", "alpha"), grads, ref_grads, strict=True):
                assert got.shape == want.shape, where
                assert_close_scaled(got, want, 1e-4, f"{where} grad {name}")


@needs_cpp
def test_tie_cases_really_tie():
    """The sweep's tie cases do produce ties in the reference map (otherwise they test nothing)."""
    features, alpha, mask, *_ = make_inputs(6, 2, 4, (3, 3, 3), (5, 7, 5), case="zero_cam")
    assert normalized_cam(features, alpha, (5, 7, 5))[0].abs().max() == 0
    features, alpha, *_ = make_inputs(7, 3, 3, (4, 3, 2), (7, 5, 5), case="relu_ties")
    cam = normalized_cam(features, alpha, (7, 5, 5)).flatten(1)
    assert ((cam == 0).sum(dim=1) > 10).all()
    features, alpha, *_ = make_inputs(8, 2, 3, (3, 4, 2), (5, 7, 5), case="max_ties")
    from due_ext.explain.cam import combine_cam, upsample_cam

    up = upsample_cam(combine_cam(features, alpha), (5, 7, 5)).flatten(1)
    assert ((up == up.amax(dim=1, keepdim=True)).sum(dim=1) == 2).all()


@needs_cpp
@pytest.mark.parametrize("method", FUSED_METHODS)
def test_gradcheck_float64(method, monkeypatch):
    monkeypatch.setenv("DUE_EXT_BACKEND", "cpp")
    gen = torch.Generator().manual_seed(11)
    # positive features and alpha: the relu is active everywhere (no kink); the random map has a unique
    # min and max; a range of ~10 keeps haics' argmax voxel (S = 1 - 1e-6 / range) clamped with a margin.
    features = (torch.rand((2, 3, 3, 2, 2), generator=gen, dtype=torch.float64) * 4 + 0.5).requires_grad_(True)
    alpha = (torch.rand((2, 3), generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    size = (5, 4, 3)
    mask = (torch.rand((2, *size), generator=gen, dtype=torch.float64) > 0.6).double()
    soft = torch.rand((2, *size), generator=gen, dtype=torch.float64)
    weights = torch.rand((2, *size), generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f, a: explanation_loss(f, a, mask, soft, weights, method),
                                    (features, alpha), eps=1e-6, atol=1e-5, rtol=1e-4)


@needs_cpp
@pytest.mark.parametrize("write_cam", [False, True])
def test_opcheck(write_cam):
    features, alpha, mask, soft, weights = make_inputs(3, 2, 3, (3, 2, 2), (5, 3, 5))
    features.requires_grad_(True)
    alpha.requires_grad_(True)
    op = torch.ops.due_ext.explanation_loss_fwd.default
    cases = (("due", weights), ("haics", None)) if write_cam else (("gradia", weights),)
    for method, w in cases:
        torch.library.opcheck(op, (features, alpha, mask, soft, w, method, True, write_cam))


def test_opcheck_triton_op_schema_and_fake():
    """The Triton custom op's registration (schema, fake impl) without running its kernels."""
    features, alpha, mask, soft, weights = make_inputs(3, 2, 3, (3, 2, 2), (5, 3, 5))
    op = torch.ops.due_ext.explanation_loss_fwd_triton.default
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (features, alpha, mask, soft, weights)]
        loss, grad_pre, cam = op(*fake, "due", True, True)
    assert loss.shape == (2,) and grad_pre.shape == (2, 3, 2, 2) and cam.shape == (2, 5, 3, 5)


@needs_cpp
def test_torch_compile_traces_the_op(monkeypatch):
    monkeypatch.setenv("DUE_EXT_BACKEND", "cpp")
    features, alpha, mask, soft, weights = make_inputs(4, 2, 3, (3, 2, 2), (5, 3, 5))
    seen = []

    def backend(graph_module, example_inputs):
        seen.extend(str(node.target) for node in graph_module.graph.nodes)
        return graph_module

    torch._dynamo.reset()
    compiled = torch.compile(lambda f, a: explanation_loss(f, a, mask, soft, weights, "due"), backend=backend)
    loss, grads = _loss_and_grads(compiled, features, alpha)
    ref_loss, ref_grads = _loss_and_grads(explanation_loss_reference, features, alpha, mask, soft, weights, "due")
    assert any("explanation_loss_fwd" in target for target in seen), seen
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_close_scaled(got, want, 1e-4, "compiled grad")


@needs_cpp
def test_torch_compile_aot_eager_backward(monkeypatch):
    """Fake impl + autograd registration through AOTAutograd (what inductor would see)."""
    monkeypatch.setenv("DUE_EXT_BACKEND", "cpp")
    features, alpha, mask, soft, weights = make_inputs(5, 2, 3, (3, 2, 2), (5, 3, 5))
    torch._dynamo.reset()
    compiled = torch.compile(lambda f, a: explanation_loss(f, a, mask, soft, weights, "gradia"),
                             backend="aot_eager")
    loss, grads = _loss_and_grads(compiled, features, alpha)
    ref_loss, ref_grads = _loss_and_grads(explanation_loss_reference, features, alpha, mask, soft, weights,
                                          "gradia")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_close_scaled(got, want, 1e-4, "aot_eager grad")


@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_return_cam_equals_normalized_cam(backend, monkeypatch):
    monkeypatch.setenv("DUE_EXT_BACKEND", backend)
    features, alpha, mask, soft, weights = make_inputs(12, 3, 4, (3, 3, 2), (7, 5, 9), device=DEVICE_OF[backend])
    for method in FUSED_METHODS:
        loss, cam = explanation_loss(features, alpha, mask, soft, weights, method, return_cam=True)
        assert cam.shape == (3, 7, 5, 9) and not cam.requires_grad
        torch.testing.assert_close(cam, normalized_cam(features, alpha, (7, 5, 9)), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(loss, explanation_loss(features, alpha, mask, soft, weights, method))


@needs_cpp
def test_no_grad_path_and_mask_dtypes(monkeypatch):
    monkeypatch.setenv("DUE_EXT_BACKEND", "cpp")
    features, alpha, mask, soft, weights = make_inputs(13, 2, 3, (3, 3, 2), (5, 5, 5))
    ref = explanation_loss_reference(features, alpha, mask, soft, weights)
    with torch.no_grad():
        torch.testing.assert_close(explanation_loss(features, alpha, mask, soft, weights), ref)
    for dtype in (torch.bool, torch.uint8):
        torch.testing.assert_close(explanation_loss(features, alpha, mask.to(dtype), soft, weights), ref)


@needs_cpp
def test_float64_backend_matches_reference(monkeypatch):
    monkeypatch.setenv("DUE_EXT_BACKEND", "cpp")
    features, alpha, mask, soft, weights = make_inputs(14, 3, 5, (3, 4, 2), (7, 9, 5), dtype=torch.float64)
    for method in FUSED_METHODS:
        loss, grads = _loss_and_grads(explanation_loss, features, alpha, mask, soft, weights, method)
        ref_loss, ref_grads = _loss_and_grads(explanation_loss_reference, features, alpha, mask, soft, weights,
                                              method)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        for got, want in zip(grads, ref_grads, strict=True):
            assert_close_scaled(got, want, 1e-10, f"float64 {method}")


def test_loss_values_by_hand():
    """The per-method formulas on a map we can write down: S is the upsample-free min-max of a known cam."""
    # d, h, w == X, Y, Z: the upsample is the identity, S = cam / max(cam) (+eps), min 0.
    features = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64).view(1, 1, 4, 1, 1)
    alpha = torch.ones(1, 1, dtype=torch.float64)
    s = torch.tensor([0.0, 1.0, 2.0, 4.0], dtype=torch.float64) / (4.0 + 1e-6)
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64).view(1, 4, 1, 1)
    soft = torch.tensor([0.0, 0.5, 0.5, 1.0], dtype=torch.float64).view(1, 4, 1, 1)
    weights = torch.tensor([1.0, 0.5, 0.5, 1.0], dtype=torch.float64).view(1, 4, 1, 1)
    m, i, w = mask.flatten(), soft.flatten(), weights.flatten()
    due = (w * m * (torch.tanh(5 * (s - 0.5)) - m).abs()).sum() / 2 + (w * (s - i).abs()).mean()
    gradia = (w * (s - m).abs()).sum() / w.sum()
    sc = s.clamp(1e-6, 1 - 1e-6)
    haics = (w * -(m * sc.log() + (1 - m) * (1 - sc).log())).sum() / w.sum()
    expected = {"due": due, "gradia": gradia, "haics": haics}
    for backend in ["reference", *COMPILED_BACKENDS]:
        os.environ["DUE_EXT_BACKEND"] = backend
        try:
            for method, value in expected.items():
                dev = DEVICE_OF.get(backend, "cpu")
                got = explanation_loss(features.to(dev), alpha.to(dev), mask.to(dev), soft.to(dev),
                                       weights.to(dev), method)
                torch.testing.assert_close(got.cpu(), value.view(1), rtol=1e-12, atol=1e-12,
                                           msg=f"{backend} {method}")
        finally:
            del os.environ["DUE_EXT_BACKEND"]


@needs_cpp
def test_baseline_plus_ignores_weights_and_due_uses_them():
    features, alpha, mask, soft, weights = make_inputs(15, 2, 3, (3, 3, 2), (5, 5, 5))
    plain = explanation_loss(features, alpha, mask, soft, None, "baseline_plus")
    torch.testing.assert_close(explanation_loss(features, alpha, mask, soft, weights, "baseline_plus"), plain)
    torch.testing.assert_close(explanation_loss(features, alpha, mask, soft, None, "due"), plain)
    assert (explanation_loss(features, alpha, mask, soft, weights, "due") < plain).all()


def test_res_g_formula_and_gradient():
    features, alpha, mask, soft, weights = make_inputs(16, 2, 3, (3, 3, 2), (7, 7, 5), dtype=torch.float64)
    features.requires_grad_(True)
    loss = explanation_loss(features, alpha, mask, None, None, "res_g")
    cam = normalized_cam(features, alpha, (7, 7, 5))
    fg = (mask != 0).double()
    binary = (fg * (torch.tanh(5 * (cam - 0.5)) - mask).abs()).flatten(1).sum(1) / fg.flatten(1).sum(1)
    imputed = gaussian_imputation(mask)
    expected = torch.relu(binary - RES_SLACK) + (cam - imputed).abs().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0
    # the imputation: a blurred mask in [0, 1] with its maximum at 1, positive next to the mask, 0 far away
    assert imputed.shape == mask.shape and imputed.min() >= 0 and (imputed.flatten(1).amax(1) - 1).abs().max() < 1e-5
    lone = torch.zeros(1, 5, 5, 5, dtype=torch.float64)
    lone[0, 2, 2, 2] = 1.0
    blurred = gaussian_imputation(lone)
    assert blurred[0, 2, 2, 2] > blurred[0, 2, 2, 3] > 0 and blurred[0, 2, 2, 4] == 0


@pytest.mark.parametrize(
    "change, error, text",
    [
        (dict(method="dice"), ValueError, "method 'dice' is unknown"),
        (dict(features=torch.zeros(2, 3, 3, 2)), ValueError, "features must be a (B, C, d, h, w)"),
        (dict(features=torch.zeros(2, 3, 3, 2, 2, dtype=torch.int64)), TypeError, "float32 or float64"),
        (dict(alpha=torch.zeros(2, 4)), ValueError, "alpha must be (B, C) = (2, 3)"),
        (dict(alpha=torch.zeros(2, 3, dtype=torch.float64)), TypeError, "alpha is torch.float64"),
        (dict(target=torch.zeros(3, 5, 3, 5)), ValueError, "target must be (B, X, Y, Z) with B = 2"),
        (dict(target=torch.zeros(2, 5, 3)), ValueError, "target must be (B, X, Y, Z)"),
        (dict(soft_target=None), ValueError, "needs soft_target"),
        (dict(soft_target=torch.zeros(2, 5, 3, 4)), ValueError, "soft_target has shape (2, 5, 3, 4)"),
        (dict(weights=torch.zeros(2, 5, 3, 4)), ValueError, "weights has shape (2, 5, 3, 4)"),
        (dict(weights=torch.zeros(2, 5, 3, 5, dtype=torch.int64)), TypeError, "weights must be floating point"),
        (dict(target=torch.zeros(2, 5, 3, 5, dtype=torch.complex64)), TypeError, "target must be floating"),
        (dict(target=torch.zeros(2, 0, 3, 5)), ValueError, "empty dimensions"),
    ],
)
def test_bad_input_raises_clear_error(change, error, text):
    features, alpha, mask, soft, weights = make_inputs(17, 2, 3, (3, 2, 2), (5, 3, 5))
    args = dict(features=features, alpha=alpha, target=mask, soft_target=soft, weights=weights, method="due")
    args.update(change)
    with pytest.raises(error, match=text.replace("(", r"\(").replace(")", r"\)")):
        explanation_loss(**args)


@needs_cpp
def test_raw_op_errors():
    features, alpha, mask, soft, weights = make_inputs(18, 2, 3, (3, 2, 2), (5, 3, 5))
    op = torch.ops.due_ext.explanation_loss_fwd
    with pytest.raises(RuntimeError, match="method 'res_g' has no fused kernel"):
        op(features, alpha, mask, soft, weights, "res_g", False, False)
    with pytest.raises(RuntimeError, match="soft_target has shape"):
        op(features, alpha, mask, soft[:, :2], weights, "due", False, False)
    with pytest.raises(RuntimeError, match="needs soft_target"):
        op(features, alpha, mask, None, weights, "due", False, False)
    loss, grad_pre, _ = op(features.requires_grad_(True), alpha, mask, soft, weights, "due", False, False)
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss.sum().backward()


# ---- guards: flat CAMs, NaN; half precision. The check_* helpers run on whatever backend DUE_EXT_BACKEND
# selects, so the Triton subprocess below reuses them.

#: Flat cases of sample 0 (sample 1 stays an ordinary map). FLAT_RTOL = 1e-3 of max |P|, P = sum_c alpha A.
FLAT_KINDS = ("constant", "near_constant", "faint_spots", "zero_alpha")


def make_flat_inputs(kind: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 31,
                     low: tuple[int, int, int] = (3, 3, 2), size: tuple[int, int, int] = (5, 7, 4)):
    """``make_inputs`` with sample 0 made flat:

    - ``constant``: P = 5.5 everywhere (range 0);
    - ``near_constant``: P in [5.5, 5.5 (1 + 1e-5)] (range 5.5e-5 <= 5.5e-3); today's normaliser amplifies its
      gradient ~2e4-fold;
    - ``faint_spots``: P = -1 everywhere but two voxels at +2e-4 (range <= 2e-4 <= 1e-3): all relu-ed away but
      two barely positive spots, amplified ~5e3-fold by today's normaliser;
    - ``zero_alpha``: alpha = 0, P = 0 (range 0 <= 0).
    """
    features, alpha, mask, soft, weights = make_inputs(seed, 2, 3, low, size, dtype=torch.float64)
    level = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    if kind in ("constant", "near_constant"):
        features[0] = level.view(3, 1, 1, 1).expand(3, *low)
        alpha[0] = torch.tensor([1.5, 1.0, 3.0])
        if kind == "near_constant":
            ramp = torch.linspace(0.0, 1e-5, features[0, 0].numel(), dtype=torch.float64).view(low)
            features[0] = features[0] * (1.0 + ramp)
    elif kind == "faint_spots":
        features[0] = 0.0
        features[0, 0] = -1.0
        features[0, 0, 1, 1, 0] = 2e-4
        features[0, 0, -1, 0, 1] = 1e-4
        alpha[0] = torch.tensor([1.0, 0.7, -0.2])
    elif kind == "zero_alpha":
        alpha[0] = 0.0
    else:
        raise ValueError(kind)
    return [t.to(dtype=dtype, device=device) for t in (features, alpha, mask, soft, weights)]


def check_flat_cam(kind: str, method: str, device: str = "cpu", low: tuple[int, int, int] = (3, 3, 2),
                   size: tuple[int, int, int] = (5, 7, 4)) -> None:
    """Sample 0 (flat) has S = 0: the loss of the all-zero map and exactly zero gradients; sample 1 is
    unaffected and matches the reference."""
    features, alpha, mask, soft, weights = make_flat_inputs(kind, device=device, low=low, size=size)
    where = f"flat {kind} / {method}"
    loss, (d_features, d_alpha) = _loss_and_grads(explanation_loss, features, alpha, mask, soft, weights, method)
    zero_map = torch.zeros_like(mask[:1])
    expected0 = method_loss(zero_map, mask[:1], soft[:1], weights[:1], method)
    torch.testing.assert_close(loss[:1], expected0, rtol=1e-5, atol=1e-6, msg=where)
    assert (d_features[0] == 0).all() and (d_alpha[0] == 0).all(), (
        f"{where}: gradient of the flat sample is not zero (max {d_features[0].abs().max().item():.3g})")
    _, cam = explanation_loss(features, alpha, mask, soft, weights, method, return_cam=True)
    assert (cam[0] == 0).all(), where
    ref_loss, (ref_features, ref_alpha) = _loss_and_grads(explanation_loss_reference, features, alpha, mask, soft,
                                                          weights, method)
    torch.testing.assert_close(loss[1:], ref_loss[1:], rtol=1e-5, atol=1e-6, msg=where)
    assert d_features[1].abs().max() > 0, where
    assert_close_scaled(d_features[1], ref_features[1], 1e-4, f"{where} grad features")
    assert_close_scaled(d_alpha[1], ref_alpha[1], 1e-4, f"{where} grad alpha")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", FUSED_METHODS)
@pytest.mark.parametrize("kind", FLAT_KINDS)
def test_flat_cam_has_zero_gradient(backend, method, kind, monkeypatch):
    monkeypatch.setenv("DUE_EXT_BACKEND", backend)
    check_flat_cam(kind, method, DEVICE_OF[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_threshold_is_relative_to_the_map_scale(backend, monkeypatch):
    """A range of 5x the threshold is normalised as usual (same on every backend) whatever the scale of alpha
    (down to where the range, 2.75e-4 at scale 1e-2, still dwarfs MINMAX_EPS = 1e-6)."""
    monkeypatch.setenv("DUE_EXT_BACKEND", backend)
    features, alpha, mask, soft, weights = make_flat_inputs("near_constant", device=DEVICE_OF[backend])
    features = features.clone()
    ramp = torch.linspace(0.0, 5e-3, features[0, 0].numel(), device=features.device).view(features.shape[2:])
    features[0] = features[0, :, :1, :1, :1] * (1.0 + ramp)  # P spans 5.5 (1 + 5e-3): range 5 x FLAT_RTOL max|P|
    for scale in (1.0, 1e-2):
        a = alpha * scale
        loss, cam = explanation_loss(features, a, mask, soft, weights, "due", return_cam=True)
        assert cam[0].max() > 0.99, scale  # spans [0, 1]: not treated as flat
        torch.testing.assert_close(loss, explanation_loss_reference(features, a, mask, soft, weights, "due"),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *(["cpp"] if "cpp" in COMPILED_BACKENDS else [])])
@pytest.mark.parametrize("method", FUSED_METHODS)
def test_gradcheck_with_a_flat_sample(backend, method, monkeypatch):
    """float64 gradcheck of a batch holding a constant map: the finite differences (steps of 1e-6 keep the map
    flat) and the analytic gradient are both zero; today's normaliser is not even continuous there."""
    monkeypatch.setenv("DUE_EXT_BACKEND", backend)
    features, alpha, mask, soft, weights = make_flat_inputs("constant", dtype=torch.float64, low=(2, 2, 2),
                                                            size=(3, 4, 3))
    features[1] = features[1].abs() + 0.5  # sample 1: relu active everywhere (no kink), unique min and max
    alpha[1] = alpha[1].abs() + 0.5
    features.requires_grad_(True)
    alpha.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, a: explanation_loss(f, a, mask, soft, weights, method),
                                    (features, alpha), eps=1e-6, atol=1e-5, rtol=1e-4)


#: Where sample 0 gets its NaN.
NAN_PLACES = ("features", "alpha", "target", "soft_target", "weights")


def check_nan_propagates(place: str, method: str, device: str = "cpu", low: tuple[int, int, int] = (3, 3, 2),
                         size: tuple[int, int, int] = (5, 7, 4)) -> None:
    """NaN in sample 0's inputs gives sample 0 a NaN loss (as the reference); sample 1 stays exact."""
    if place == "soft_target" and method not in ("due", "baseline_plus"):
        return  # ignored by the method
    if place == "weights" and method == "baseline_plus":
        return
    features, alpha, mask, soft, weights = make_inputs(32, 2, 3, low, size, device=device)
    inputs = {"features": features, "alpha": alpha, "target": mask, "soft_target": soft, "weights": weights}
    poisoned = inputs[place].clone()
    poisoned[(0,) * poisoned.dim()] = float("nan")  # a corner: every upsample reads it
    inputs[place] = poisoned
    args = (inputs["features"], inputs["alpha"], inputs["target"], inputs["soft_target"], inputs["weights"], method)
    loss, (d_features, d_alpha) = _loss_and_grads(explanation_loss, *args)
    ref_loss, (ref_features, ref_alpha) = _loss_and_grads(explanation_loss_reference, *args)
    where = f"NaN in {place} / {method}"
    assert torch.isnan(ref_loss[0]), f"{where}: the reference itself hides the NaN"
    assert torch.isnan(loss[0]), f"{where}: loss {loss.tolist()} hides the NaN"
    torch.testing.assert_close(loss[1:], ref_loss[1:], rtol=1e-5, atol=1e-6, msg=where)
    assert_close_scaled(d_features[1], ref_features[1], 1e-4, f"{where} grad features")
    assert_close_scaled(d_alpha[1], ref_alpha[1], 1e-4, f"{where} grad alpha")
    if place in ("features", "alpha"):
        assert not torch.isfinite(d_alpha[0]).all(), f"{where}: the gradient of the NaN sample is finite"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", FUSED_METHODS)
@pytest.mark.parametrize("place", NAN_PLACES)
def test_nan_gives_nan_loss(backend, method, place, monkeypatch):
    monkeypatch.setenv("DUE_EXT_BACKEND", backend)
    check_nan_propagates(place, method, DEVICE_OF[backend])


#: Unit roundoff (half an ulp, relative) of the half-precision formats: 8 and 11 significant bits.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def check_half_precision(dtype: torch.dtype, method: str, device: str = "cpu", low: tuple[int, int, int] = (3, 3, 2),
                         size: tuple[int, int, int] = (5, 7, 4)) -> None:
    """float16/bfloat16 features against the float32 reference on the same (rounded) values.

    The op computes in float32 and rounds only its outputs, so every output differs from the float32 reference
    by one rounding to ``dtype`` (relative error <= u = UNIT_ROUNDOFF) on top of the float32 kernel-vs-reference
    difference the float32 tests allow (rtol 1e-5 / atol 1e-6 for the loss, 1e-4 of the largest gradient).
    float16 gradients below 2^-14 are subnormal, with an absolute error <= 2^-25, far below that bound.
    """
    features, alpha, mask, soft, weights = make_inputs(33, 2, 3, low, size, device=device)
    features, alpha = features.to(dtype), alpha.to(dtype)
    u = UNIT_ROUNDOFF[dtype]
    loss, (d_features, d_alpha) = _loss_and_grads(explanation_loss, features, alpha, mask, soft, weights, method)
    assert loss.dtype == dtype and d_features.dtype == dtype and d_alpha.dtype == dtype
    ref_loss, (ref_features, ref_alpha) = _loss_and_grads(explanation_loss_reference, features.float(),
                                                          alpha.float(), mask, soft, weights, method)
    where = f"{dtype} / {method}"
    torch.testing.assert_close(loss.float(), ref_loss, rtol=u + 1e-5, atol=1e-6, msg=where)
    assert_close_scaled(d_features.float(), ref_features, u + 1e-4, f"{where} grad features")
    assert_close_scaled(d_alpha.float(), ref_alpha, u + 1e-4, f"{where} grad alpha")
    _, cam = explanation_loss(features, alpha, mask, soft, weights, method, return_cam=True)
    assert cam.dtype == dtype
    torch.testing.assert_close(cam.float(), normalized_cam(features.float(), alpha.float(), size), rtol=0,
                               atol=u + 1e-6)  # S in [0, 1]: one rounding is <= u absolute


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", FUSED_METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_computes_in_float32(backend, method, dtype, monkeypatch):
    monkeypatch.setenv("DUE_EXT_BACKEND", backend)
    check_half_precision(dtype, method, DEVICE_OF[backend])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autocast_does_not_change_the_result(backend, dtype, monkeypatch):
    """A forward inside ``torch.autocast`` (backward outside, as PyTorch recommends) gives what it gives
    outside: the op's own torch calls (the reference composition) are kept out of autocast's bfloat16."""
    monkeypatch.setenv("DUE_EXT_BACKEND", backend)
    device = DEVICE_OF[backend]
    inputs = make_inputs(34, 2, 3, (3, 3, 2), (5, 7, 4), device=device)
    results = []
    for autocast in (False, True):
        features, alpha = (t.to(dtype).requires_grad_(True) for t in inputs[:2])
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=autocast):
            loss = explanation_loss(features, alpha, *inputs[2:], "due")
        loss.sum().backward()
        results.append((loss.detach(), features.grad, alpha.grad))
    for got, want in zip(results[1], results[0], strict=True):
        assert got.dtype == want.dtype == dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_opcheck_half_precision_and_flat(dtype):
    features, alpha, mask, soft, weights = make_flat_inputs("faint_spots")
    op = torch.ops.due_ext.explanation_loss_fwd.default
    half = [t.to(dtype).requires_grad_(True) for t in (features, alpha)]
    for method, w in (("due", weights), ("haics", None)):
        torch.library.opcheck(op, (*half, mask, soft, w, method, True, True))
    loss, grad_pre, cam = op(*half, mask, soft, weights, "due", True, True)
    assert loss.dtype == cam.dtype == dtype and grad_pre.dtype == torch.float32
    torch.library.opcheck(op, (features.requires_grad_(True), alpha, mask, soft, weights, "gradia", True, False))


@needs_cpp
def test_raw_op_rejects_volumes_not_in_the_compute_dtype():
    features, alpha, mask, soft, weights = make_inputs(35, 2, 3, (3, 2, 2), (5, 3, 5))
    op = torch.ops.due_ext.explanation_loss_fwd
    with pytest.raises(RuntimeError, match="differs from the compute dtype Float"):
        op(features.bfloat16(), alpha.bfloat16(), mask.bfloat16(), soft, weights, "due", False, False)
    with pytest.raises(RuntimeError, match="alpha dtype Float differs"):
        op(features.half(), alpha, mask, soft, weights, "due", False, False)


TRITON_SCRIPT = textwrap.dedent(
    """
    import torch
    from due_ext.ops import explanation_loss
    from due_ext.ops.explanation_loss_reference import explanation_loss_reference
    from due_ext.ops._dispatch import select_backend
    assert select_backend("explanation_loss", torch.device("cpu")) == "triton"
    sys_path_inputs = __import__("tests.test_explanation_loss", fromlist=["make_inputs"])
    make_inputs, grads_of = sys_path_inputs.make_inputs, sys_path_inputs._loss_and_grads
    cases = [("due", torch.float32, "relu_ties", True), ("haics", torch.float64, "zero_cam", False)]
    for method, dtype, case, with_weights in cases:
        f, a, m, i, w = make_inputs(21, 2, 3, (3, 2, 2), (3, 5, 3), dtype=dtype, case=case)
        w = w if with_weights else None
        loss, grads = grads_of(explanation_loss, f, a, m, i, w, method)
        ref, ref_grads = grads_of(explanation_loss_reference, f, a, m, i, w, method)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            assert (g - r).abs().max() <= 1e-4 * max(1.0, r.abs().max().item()), (method, case)
    loss, cam = explanation_loss(f, a, m, i, None, "due", return_cam=True)
    from due_ext.explain.cam import normalized_cam
    torch.testing.assert_close(cam, normalized_cam(f, a, (3, 5, 3)))
    # the guards and half precision, on small inputs (the interpreter is slow)
    small = dict(low=(2, 2, 2), size=(3, 4, 3))
    for kind, method in (("near_constant", "due"), ("faint_spots", "haics"), ("zero_alpha", "gradia")):
        sys_path_inputs.check_flat_cam(kind, method, **small)
    for place, method in (("features", "due"), ("alpha", "gradia"), ("target", "haics"), ("weights", "due")):
        sys_path_inputs.check_nan_propagates(place, method, **small)
    for dtype, method in ((torch.bfloat16, "due"), (torch.float16, "haics")):
        sys_path_inputs.check_half_precision(dtype, method, **small)
    print("TRITON-INTERPRETER-OK")
    """
)


def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", DUE_EXT_BACKEND="triton", PYTHONPATH=root)
    result = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "TRITON-INTERPRETER-OK" in result.stdout, result.stderr[-4000:]
