"""The class activation map formula, in one place (pure PyTorch; the fused kernels are tested against it).

``A`` is the target layer's output ``(B, C, d, h, w)`` and ``alpha`` the channel weights ``(B, C)``:

    cam = relu(sum_c alpha_c * A_c)                      (B, d, h, w)
    U   = trilinear upsample of cam to (X, Y, Z), align_corners=True
    S   = (U - min U) / (max U - min U + eps)            per sample, eps = 1e-6
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Added to the min-max range so an all-zero map normalises to zeros instead of NaN.
MINMAX_EPS = 1e-6


def combine_cam(features: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``relu(sum_c alpha[b, c] * features[b, c])``: ``(B, C, d, h, w), (B, C) -> (B, d, h, w)``."""
    if features.dim() != 5 or alpha.dim() != 2 or alpha.shape != features.shape[:2]:
        raise ValueError(f"expected features (B, C, d, h, w) and alpha (B, C); got {tuple(features.shape)} "
                         f"and {tuple(alpha.shape)}")
    return torch.relu(torch.einsum("bcdhw,bc->bdhw", features, alpha))


def upsample_cam(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear upsample (``align_corners=True``) of ``(B, d, h, w)`` to ``(B, X, Y, Z)``."""
    return F.interpolate(cam.unsqueeze(1), size=tuple(int(s) for s in size), mode="trilinear",
                         align_corners=True).squeeze(1)


def minmax_normalize(volume: torch.Tensor, eps: float = MINMAX_EPS) -> torch.Tensor:
    """Per-sample min-max to [0, 1] of ``(B, ...)``; min and max take gradients like ``amin``/``amax``."""
    flat = volume.flatten(1)
    low = flat.amin(dim=1)
    high = flat.amax(dim=1)
    shape = (-1,) + (1,) * (volume.dim() - 1)
    return (volume - low.view(shape)) / (high - low + eps).view(shape)


def normalized_cam(features: torch.Tensor, alpha: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The full map ``S`` in [0, 1] at the input size: combine, upsample, min-max. ``(B, X, Y, Z)``."""
    return minmax_normalize(upsample_cam(combine_cam(features, alpha), size))
