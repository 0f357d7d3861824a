"""Pure-PyTorch oracle of :func:`due_ext.ops.explanation_loss`: every kernel is tested against this.

It is the plain composition of :func:`due_ext.explain.cam.normalized_cam` (combine -> trilinear upsample ->
min-max, a flat map giving zeros and no gradient) with the per-method loss below, so autograd differentiates
it. It materialises several full-resolution tensors, which is what the fused kernels avoid.

``S`` is the normalised CAM ``(B, X, Y, Z)``, ``m`` the binary annotation, ``I`` the soft target, ``w`` the
per-voxel weights (ones when not given); every loss is per sample, shape ``(B,)``:

- ``due``:           ``sum(w 1[m!=0] |tanh(5(S - 0.5)) - m|) / max(1, sum 1[m!=0])  +  mean(w |S - I|)``
- ``baseline_plus``: ``due`` with ``w = 1``.
- ``gradia``:        ``sum(w |S - m|) / max(eps, sum w)``.
- ``haics``:         ``sum(w BCE(clamp(S, 1e-6, 1 - 1e-6), m)) / max(eps, sum w)``.
- ``res_g``:         see :func:`res_g_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from due_ext.explain.cam import normalized_cam

#: Methods of the explanation loss, in the order of the kernels' method codes.
METHODS = ("due", "baseline_plus", "gradia", "haics", "res_g")
#: Floor of the weight sum that normalises ``gradia`` and ``haics`` (all-zero weights give a zero loss).
WEIGHT_EPS = 1e-6
#: ``haics`` clamps the CAM into ``[BCE_CLAMP, 1 - BCE_CLAMP]`` before the logarithms.
BCE_CLAMP = 1e-6
#: Sharpness of the soft binarisation ``tanh(TANH_SCALE (S - 0.5))`` of the DUE / RES binary term.
TANH_SCALE = 5.0
#: RES slack (the DUE paper's setting for RES-G).
RES_SLACK = 1e-3
#: RES-G imputation: Gaussian kernel size and sigma (OpenCV's default sigma for a 3-tap kernel).
RES_KERNEL_SIZE = 3
RES_SIGMA = 0.8


def _sample_sum(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).sum(dim=1)


def binary_term(cam: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w 1[m!=0] |tanh(5(S - 0.5)) - m|) / max(1, sum 1[m!=0])`` per sample."""
    foreground = (target != 0).to(cam.dtype)
    soft_binary = torch.tanh(TANH_SCALE * (cam - 0.5))
    total = _sample_sum(weights * foreground * (soft_binary - target).abs())
    return total / _sample_sum(foreground).clamp_min(1.0)


def continuous_term(cam: torch.Tensor, soft_target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``mean(w |S - I|)`` per sample."""
    return (weights * (cam - soft_target).abs()).flatten(1).mean(dim=1)


def gaussian_imputation(target: torch.Tensor) -> torch.Tensor:
    """RES-G's fixed imputation of a binary mask ``(B, X, Y, Z)``: a separable 3x3x3 Gaussian blur (sigma 0.8,
    zero padding) of the mask, divided by its per-sample maximum (+1e-6), so it lies in [0, 1]."""
    radius = RES_KERNEL_SIZE // 2
    taps = torch.arange(-radius, radius + 1, dtype=target.dtype, device=target.device)
    kernel = torch.exp(-0.5 * (taps / RES_SIGMA) ** 2)
    kernel = kernel / kernel.sum()
    blurred = target.unsqueeze(1)
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = RES_KERNEL_SIZE
        padding = [0, 0, 0]
        padding[axis] = radius
        blurred = F.conv3d(blurred, kernel.view(shape), padding=tuple(padding))
    blurred = blurred.squeeze(1)
    return blurred / (blurred.flatten(1).amax(dim=1).view(-1, 1, 1, 1) + 1e-6)


def res_g_loss(cam: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """RES-G (Gao et al. 2022) adapted to 3D binary masks, per sample::

        L = relu( sum(w 1[m!=0] |tanh(5(S - a)) - m|) / max(1, sum 1[m!=0])  -  slack )  +  mean(|S - G(m)|)

    with slack = 0.001, ``G`` = :func:`gaussian_imputation` of the annotation (RES-G's fixed Gaussian
    imputation, which fills the unannotated surroundings of the mask with decaying values) and the threshold
    ``a = 0.5``. RES solves ``a`` by brute force over its +1/-1 annotations; our masks carry no negative
    (counterfactual) labels, for which that solver degenerates to ``min S`` over the foreground, so we use the
    fixed threshold that DUE's binary term uses. ``w`` only weights the robust term (ones by default).
    """
    robust = torch.relu(binary_term(cam, target, weights) - RES_SLACK)
    imputed = gaussian_imputation(target)
    return robust + (cam - imputed).abs().flatten(1).mean(dim=1)


def method_loss(cam: torch.Tensor, target: torch.Tensor, soft_target: torch.Tensor | None,
                weights: torch.Tensor | None, method: str) -> torch.Tensor:
    """Per-sample explanation loss ``(B,)`` of an already normalised map ``cam`` (B, X, Y, Z)."""
    if method not in METHODS:
        raise ValueError(f"explanation loss method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    target = target.to(cam.dtype)
    if weights is None or method == "baseline_plus":
        weights = torch.ones_like(cam)
    weights = weights.to(cam.dtype)
    if method in ("due", "baseline_plus"):
        if soft_target is None:
            raise ValueError(f"explanation loss method {method!r} needs soft_target (the interpolated mask)")
        return binary_term(cam, target, weights) + continuous_term(cam, soft_target.to(cam.dtype), weights)
    if method == "gradia":
        per_voxel = (cam - target).abs()
    elif method == "haics":
        clamped = cam.clamp(BCE_CLAMP, 1.0 - BCE_CLAMP)
        per_voxel = -(target * torch.log(clamped) + (1.0 - target) * torch.log1p(-clamped))
    else:
        return res_g_loss(cam, target, weights)
    return _sample_sum(weights * per_voxel) / _sample_sum(weights).clamp_min(WEIGHT_EPS)


def explanation_loss_reference(features: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor,
                               soft_target: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                               method: str = "due", return_cam: bool = False
                               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`due_ext.ops.explanation_loss`: same arguments, differentiable by autograd."""
    cam = normalized_cam(features, alpha, target.shape[1:])
    loss = method_loss(cam, target, soft_target, weights, method)
    return (loss, cam) if return_cam else loss
