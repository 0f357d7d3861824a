"""Triton kernels of :func:`due_ext.ops.explanation_loss` (same passes as the C++ kernel, see
``csrc/explanation_loss.h`` for the math).

- :func:`cam_kernel`: ``cam = relu(sum_c alpha A)`` and the flat test's scale ``max |sum_c alpha A|``, one program
  per sample.
- :func:`plane_stats_kernel`: one program per (sample, x-plane): min, max (NaN if the plane holds a NaN) and tie
  counts of the upsampled ``U``.
- :func:`plane_terms_kernel`: one program per (sample, x-plane): ``S``, the per-voxel loss terms, and the
  derivative channels contracted through the transposed upsample into per-plane ``(h, w)`` buffers.
- :func:`explanation_loss_forward` combines the per-plane results on the host side with small torch ops.

``U`` is recomputed from the low-res CAM by the same ``@triton.jit`` helper in both passes. Runs on a GPU, or
on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported). The interpreter has no libdevice
``tanh``, so it is written with ``tl.exp``.

NaN: ``tl.maximum``/``tl.minimum`` and the ``tl.min``/``tl.max`` reductions skip NaN by default, so the relu and
the clamp are written with ``tl.where`` and NaNs are counted explicitly. Half-precision inputs are computed in
float32 (:func:`explanation_loss_forward`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from due_ext.explain.cam import FLAT_RTOL, MINMAX_EPS
from due_ext.ops.explanation_loss_reference import BCE_CLAMP, TANH_SCALE, WEIGHT_EPS

#: Method codes of the fused kernels (``METHOD`` constexpr).
METHOD_CODES = {"due": 0, "baseline_plus": 1, "gradia": 2, "haics": 3}
#: Per-plane partial sums, in order (as ``csrc/explanation_loss.h``): main, cont, norm, c0, c0*S, c1, c1*S.
PLANE_SUMS = 7
Q_CHANNELS = 4
# Constants read inside the kernels must be constexpr globals.
_TANH_SCALE = tl.constexpr(TANH_SCALE)
_BCE_CLAMP = tl.constexpr(BCE_CLAMP)


@triton.jit
def cam_kernel(features_ptr, alpha_ptr, cam_ptr, scale_ptr, channels, low, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    largest = tl.zeros([BLOCK], dtype=cam_ptr.dtype.element_ty)
    for start in range(0, low, BLOCK):
        p = start + offs
        mask = p < low
        acc = tl.zeros([BLOCK], dtype=cam_ptr.dtype.element_ty)
        for c in range(0, channels):
            a = tl.load(alpha_ptr + b * channels + c)
            f = tl.load(features_ptr + (b * channels + c) * low + p, mask=mask, other=0.0)
            acc += a * f
        largest = tl.maximum(largest, tl.abs(acc))
        tl.store(cam_ptr + b * low + p, tl.where(acc < 0.0, 0.0, acc), mask=mask)  # relu that keeps NaN
    tl.store(scale_ptr + b, tl.max(largest))


@triton.jit
def _upsample_tile(cam_ptr, b, x, y, z, ymask, zmask, lx_i0, lx_i1, lx_f, ly_i0, ly_i1, ly_f, lz_i0, lz_i1, lz_f,
                   d, h, w):
    """U[b, x, y, z] for a tile of rows ``y`` [BY] and columns ``z`` [BZ] (trilinear, align_corners=True)."""
    i0 = tl.load(lx_i0 + x)
    i1 = tl.load(lx_i1 + x)
    fx = tl.load(lx_f + x)
    j0 = tl.load(ly_i0 + y, mask=ymask, other=0)
    j1 = tl.load(ly_i1 + y, mask=ymask, other=0)
    fy = tl.load(ly_f + y, mask=ymask, other=0.0)
    k0 = tl.load(lz_i0 + z, mask=zmask, other=0)
    k1 = tl.load(lz_i1 + z, mask=zmask, other=0)
    fz = tl.load(lz_f + z, mask=zmask, other=0.0)
    base = cam_ptr + b * d * h * w
    r00 = base + (i0 * h + j0[:, None]) * w
    r01 = base + (i0 * h + j1[:, None]) * w
    r10 = base + (i1 * h + j0[:, None]) * w
    r11 = base + (i1 * h + j1[:, None]) * w
    gz = 1.0 - fz[None, :]
    hz = fz[None, :]
    c00 = gz * tl.load(r00 + k0[None, :]) + hz * tl.load(r00 + k1[None, :])
    c01 = gz * tl.load(r01 + k0[None, :]) + hz * tl.load(r01 + k1[None, :])
    c10 = gz * tl.load(r10 + k0[None, :]) + hz * tl.load(r10 + k1[None, :])
    c11 = gz * tl.load(r11 + k0[None, :]) + hz * tl.load(r11 + k1[None, :])
    gy = 1.0 - fy[:, None]
    hy = fy[:, None]
    c0 = gy * c00 + hy * c01
    c1 = gy * c10 + hy * c11
    return (1.0 - fx) * c0 + fx * c1


@triton.jit
def plane_stats_kernel(cam_ptr, lx_i0, lx_i1, lx_f, ly_i0, ly_i1, ly_f, lz_i0, lz_i1, lz_f, stats_ptr, counts_ptr,
                       d, h, w, X, Y, Z, BY: tl.constexpr, BZ: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // X
    x = pid % X
    z = tl.arange(0, BZ)
    zmask = z < Z
    run_min = tl.full([], float("inf"), cam_ptr.dtype.element_ty)
    run_max = tl.full([], -float("inf"), cam_ptr.dtype.element_ty)
    n_min = 0
    n_max = 0
    n_nan = 0
    for y_start in range(0, Y, BY):
        y = y_start + tl.arange(0, BY)
        ymask = y < Y
        mask = ymask[:, None] & zmask[None, :]
        u = _upsample_tile(cam_ptr, b, x, y, z, ymask, zmask, lx_i0, lx_i1, lx_f, ly_i0, ly_i1, ly_f, lz_i0, lz_i1,
                           lz_f, d, h, w)
        c_min = tl.min(tl.where(mask, u, float("inf")))
        c_max = tl.max(tl.where(mask, u, -float("inf")))
        k_min = tl.sum(tl.where(mask & (u == c_min), 1, 0))
        k_max = tl.sum(tl.where(mask & (u == c_max), 1, 0))
        n_nan += tl.sum(tl.where(mask & (u != u), 1, 0))
        n_min = tl.where(c_min < run_min, k_min, tl.where(c_min == run_min, n_min + k_min, n_min))
        n_max = tl.where(c_max > run_max, k_max, tl.where(c_max == run_max, n_max + k_max, n_max))
        run_min = tl.minimum(run_min, c_min)
        run_max = tl.maximum(run_max, c_max)
    run_min = tl.where(n_nan > 0, float("nan"), run_min)
    run_max = tl.where(n_nan > 0, float("nan"), run_max)
    tl.store(stats_ptr + pid * 2, run_min)
    tl.store(stats_ptr + pid * 2 + 1, run_max)
    tl.store(counts_ptr + pid * 2, n_min)
    tl.store(counts_ptr + pid * 2 + 1, n_max)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, 0.0) - tl.where(x < 0, 1.0, 0.0)


@triton.jit
def _contract(values, q, ly_i0, ly_i1, ly_f, lz_i0, lz_i1, lz_f, y, z, ymask, zmask, h, w,
              BQ: tl.constexpr):
    """q[j * w + k] += sum_{y, z} Wy[y, j] Wz[z, k] values[y, z] (transposed separable upsample)."""
    j0 = tl.load(ly_i0 + y, mask=ymask, other=-1)
    j1 = tl.load(ly_i1 + y, mask=ymask, other=-1)
    fy = tl.load(ly_f + y, mask=ymask, other=0.0)
    k0 = tl.load(lz_i0 + z, mask=zmask, other=-1)
    k1 = tl.load(lz_i1 + z, mask=zmask, other=-1)
    fz = tl.load(lz_f + z, mask=zmask, other=0.0)
    slot = tl.arange(0, BQ)
    for k in range(0, w):
        wz = tl.where(k0 == k, 1.0 - fz, 0.0) + tl.where(k1 == k, fz, 0.0)
        per_row = tl.sum(values * wz[None, :], axis=1)
        for j in range(0, h):
            wy = tl.where(j0 == j, 1.0 - fy, 0.0) + tl.where(j1 == j, fy, 0.0)
            q += tl.where(slot == j * w + k, tl.sum(per_row * wy), 0.0)
    return q


@triton.jit
def plane_terms_kernel(cam_ptr, target_ptr, soft_ptr, weights_ptr, minmax_ptr, out_cam_ptr,
                       lx_i0, lx_i1, lx_f, ly_i0, ly_i1, ly_f, lz_i0, lz_i1, lz_f, sums_ptr, q_ptr,
                       d, h, w, X, Y, Z, inv_n, METHOD: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                       NEED_GRAD: tl.constexpr, WRITE_CAM: tl.constexpr, BY: tl.constexpr, BZ: tl.constexpr,
                       BQ: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // X
    x = pid % X
    mn = tl.load(minmax_ptr + b * 3)
    mx = tl.load(minmax_ptr + b * 3 + 1)
    inv_r = tl.load(minmax_ptr + b * 3 + 2)  # 0 for a flat sample
    z = tl.arange(0, BZ)
    zmask = z < Z
    zero = mn * 0.0
    s_main = zero
    s_cont = zero
    s_norm = zero
    s_c0 = zero
    s_c0s = zero
    s_c1 = zero
    s_c1s = zero
    q0 = tl.zeros([BQ], dtype=tl.float32).to(mn.dtype)
    q1 = tl.zeros([BQ], dtype=tl.float32).to(mn.dtype)
    q2 = tl.zeros([BQ], dtype=tl.float32).to(mn.dtype)
    q3 = tl.zeros([BQ], dtype=tl.float32).to(mn.dtype)
    for y_start in range(0, Y, BY):
        y = y_start + tl.arange(0, BY)
        ymask = y < Y
        mask = ymask[:, None] & zmask[None, :]
        u = _upsample_tile(cam_ptr, b, x, y, z, ymask, zmask, lx_i0, lx_i1, lx_f, ly_i0, ly_i1, ly_f, lz_i0, lz_i1,
                           lz_f, d, h, w)
        offs = ((b * X + x) * Y + y[:, None]) * Z + z[None, :]
        s = (u - mn) * inv_r
        m = tl.load(target_ptr + offs, mask=mask, other=0.0)
        if HAS_WEIGHTS:
            wv = tl.load(weights_ptr + offs, mask=mask, other=0.0)
        else:
            wv = tl.where(mask, 1.0, 0.0)
        c0 = zero * s
        c1 = zero * s
        if METHOD <= 1:
            fg = tl.where(mask & (m != 0), 1.0, 0.0)
            e = tl.exp((s - 0.5) * (2.0 * _TANH_SCALE))
            t = 1.0 - 2.0 / (e + 1.0)
            diff = t - m
            soft = tl.load(soft_ptr + offs, mask=mask, other=0.0)
            dc = tl.where(mask, s - soft, 0.0)
            s_main += tl.sum(wv * fg * tl.abs(diff))
            s_cont += tl.sum(wv * tl.abs(dc))
            s_norm += tl.sum(fg)
            if NEED_GRAD:
                c0 = wv * fg * _sign(diff) * (1.0 - t * t) * _TANH_SCALE
                c1 = wv * _sign(dc) * inv_n
        elif METHOD == 2:
            diff = s - m
            s_main += tl.sum(wv * tl.abs(diff))
            s_norm += tl.sum(wv)
            if NEED_GRAD:
                c0 = wv * _sign(diff)
        else:
            sc = tl.where(s < _BCE_CLAMP, _BCE_CLAMP, tl.where(s > 1.0 - _BCE_CLAMP, 1.0 - _BCE_CLAMP, s))
            bce = -(m * tl.log(sc) + (1.0 - m) * tl.log(1.0 - sc))
            s_main += tl.sum(wv * bce)
            s_norm += tl.sum(wv)
            if NEED_GRAD:
                inside = (s >= _BCE_CLAMP) & (s <= 1.0 - _BCE_CLAMP)
                c0 = tl.where(inside, wv * (sc - m) / (sc * (1.0 - sc)), 0.0)
        if WRITE_CAM:
            tl.store(out_cam_ptr + offs, s, mask=mask)
        if NEED_GRAD:
            s_c0 += tl.sum(c0)
            s_c0s += tl.sum(c0 * s)
            s_c1 += tl.sum(c1)
            s_c1s += tl.sum(c1 * s)
            q0 = _contract(c0, q0, ly_i0, ly_i1, ly_f, lz_i0, lz_i1, lz_f, y, z, ymask, zmask, h, w, BQ)
            if METHOD <= 1:
                q1 = _contract(c1, q1, ly_i0, ly_i1, ly_f, lz_i0, lz_i1, lz_f, y, z, ymask, zmask, h, w, BQ)
            ind_min = tl.where(mask & (u == mn), 1.0, 0.0)
            ind_max = tl.where(mask & (u == mx), 1.0, 0.0)
            q2 = _contract(ind_min, q2, ly_i0, ly_i1, ly_f, lz_i0, lz_i1, lz_f, y, z, ymask, zmask, h, w, BQ)
            q3 = _contract(ind_max, q3, ly_i0, ly_i1, ly_f, lz_i0, lz_i1, lz_f, y, z, ymask, zmask, h, w, BQ)
    base = sums_ptr + pid * 7
    tl.store(base + 0, s_main)
    tl.store(base + 1, s_cont)
    tl.store(base + 2, s_norm)
    tl.store(base + 3, s_c0)
    tl.store(base + 4, s_c0s)
    tl.store(base + 5, s_c1)
    tl.store(base + 6, s_c1s)
    if NEED_GRAD:
        slot = tl.arange(0, BQ)
        qmask = slot < h * w
        qbase = q_ptr + pid * 4 * h * w + slot
        tl.store(qbase, q0, mask=qmask)
        tl.store(qbase + h * w, q1, mask=qmask)
        tl.store(qbase + 2 * h * w, q2, mask=qmask)
        tl.store(qbase + 3 * h * w, q3, mask=qmask)


def lerp_tables(in_size: int, out_size: int, dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(i0, i1, f)`` of a linear upsample with ``align_corners=True`` (PyTorch's convention, as the C++ kernel)."""
    scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
    src = torch.arange(out_size, dtype=dtype, device=device) * torch.tensor(scale, dtype=dtype, device=device)
    i0 = src.to(torch.int64).clamp_max(in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    f = (src - i0.to(dtype)).clamp(0.0, 1.0)
    return i0.to(torch.int32), i1.to(torch.int32), f


def _dense_weights(i0: torch.Tensor, i1: torch.Tensor, f: torch.Tensor, in_size: int) -> torch.Tensor:
    """The (out, in) interpolation matrix of one axis, float64."""
    weights = torch.zeros(f.numel(), in_size, dtype=torch.float64, device=f.device)
    rows = torch.arange(f.numel(), device=f.device)
    weights.index_put_((rows, i0.long()), 1.0 - f.double(), accumulate=True)
    weights.index_put_((rows, i1.long()), f.double(), accumulate=True)
    return weights


def explanation_loss_forward(features: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor,
                             soft_target: torch.Tensor | None, weights: torch.Tensor | None, method: str,
                             need_grad: bool, write_cam: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss (B,), grad_pre (B, d, h, w), cam (B, X, Y, Z) or (0,))``, the contract of
    ``due_ext::explanation_loss_fwd``; inputs already validated, the volumes in the compute dtype. float16 and
    bfloat16 features are computed in float32: loss and cam come back in their dtype, grad_pre in float32."""
    if method not in METHOD_CODES:
        raise ValueError(f"explanation_loss (triton): method {method!r} has no fused kernel; fused: "
                         f"{', '.join(METHOD_CODES)}")
    due_like = method in ("due", "baseline_plus")
    if due_like and soft_target is None:
        raise ValueError(f"explanation_loss (triton): method {method!r} needs soft_target")
    if method == "baseline_plus":
        weights = None
    out_dtype = features.dtype
    if out_dtype in (torch.float16, torch.bfloat16):
        features, alpha = features.float(), alpha.float()
    features, alpha, target = features.contiguous(), alpha.contiguous(), target.contiguous()
    soft_target = soft_target.contiguous() if due_like else target
    weights = weights.contiguous() if weights is not None else target
    has_weights = weights is not target
    batch, channels, d, h, w = features.shape
    X, Y, Z = target.shape[1:]
    dtype, device = features.dtype, features.device
    planes = batch * X

    cam = torch.empty((batch, d, h, w), dtype=dtype, device=device)
    scale = torch.empty((batch,), dtype=dtype, device=device)
    low = d * h * w
    cam_kernel[(batch,)](features, alpha, cam, scale, channels, low, BLOCK=min(triton.next_power_of_2(low), 1024))
    tables = [lerp_tables(n_in, n_out, dtype, device) for n_in, n_out in ((d, X), (h, Y), (w, Z))]
    flat_tables = [t for table in tables for t in table]
    BZ = triton.next_power_of_2(Z)
    BY = max(1, min(triton.next_power_of_2(Y), 4096 // BZ))
    stats = torch.empty((planes, 2), dtype=dtype, device=device)
    counts = torch.empty((planes, 2), dtype=torch.int32, device=device)
    plane_stats_kernel[(planes,)](cam, *flat_tables, stats, counts, d, h, w, X, Y, Z, BY=BY, BZ=BZ)

    stats = stats.view(batch, X, 2)
    mn = stats[..., 0].amin(dim=1)  # amin/amax keep NaN
    mx = stats[..., 1].amax(dim=1)
    counts = counts.view(batch, X, 2).double()
    n_min = (counts[..., 0] * (stats[..., 0] == mn[:, None])).sum(dim=1)
    n_max = (counts[..., 1] * (stats[..., 1] == mx[:, None])).sum(dim=1)
    # minmax_inverse_range of csrc/explanation_loss.h, in the kernel's dtype
    span = mx - mn
    inv_r = torch.where(span <= FLAT_RTOL * scale, torch.zeros_like(span), 1.0 / (span + MINMAX_EPS))
    minmax = torch.stack([mn, mx, inv_r], dim=1).contiguous()

    sums = torch.empty((planes, PLANE_SUMS), dtype=dtype, device=device)
    q = torch.zeros((planes, Q_CHANNELS, h * w) if need_grad else (1,), dtype=dtype, device=device)
    out_cam = torch.empty(tuple(target.shape) if write_cam else (0,), dtype=dtype, device=device)
    plane_terms_kernel[(planes,)](cam, target, soft_target, weights, minmax, out_cam, *flat_tables, sums, q,
                                  d, h, w, X, Y, Z, 1.0 / (X * Y * Z), METHOD=METHOD_CODES[method],
                                  HAS_WEIGHTS=has_weights, NEED_GRAD=need_grad, WRITE_CAM=write_cam, BY=BY, BZ=BZ,
                                  BQ=triton.next_power_of_2(h * w))

    total = sums.view(batch, X, PLANE_SUMS).double().sum(dim=1)
    main, cont, norm, c0, c0s, c1, c1s = total.unbind(dim=1)
    if due_like:
        s0 = 1.0 / norm.clamp_min(1.0)
        loss = main * s0 + cont / (X * Y * Z)
    else:
        s0 = 1.0 / norm.clamp_min(WEIGHT_EPS)
        loss = main * s0
    grad_pre = torch.zeros((batch, d, h, w), dtype=dtype, device=device)
    if need_grad:
        inv_r = inv_r.double()
        g_sum = s0 * c0 + c1
        gs_sum = s0 * c0s + c1s
        coef = torch.stack([inv_r * s0, inv_r, (gs_sum - g_sum) * inv_r / n_min, -gs_sum * inv_r / n_max], dim=1)
        per_plane = (q.view(batch, X, Q_CHANNELS, h * w).double() * coef[:, None, :, None]).sum(dim=2)
        lift = _dense_weights(*tables[0], d)  # (X, d)
        grad = torch.einsum("xi,bxp->bip", lift, per_plane).reshape(batch, d, h, w)
        grad_pre = torch.where(cam <= 0, 0.0, grad).to(dtype)  # relu backward as torch's: NaN passes
    return loss.to(out_dtype), grad_pre, out_cam.to(out_dtype)
