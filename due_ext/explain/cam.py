"""The class activation map formula, in one place (pure PyTorch; the fused kernels are tested against it).

``A`` is the target layer's output ``(B, C, d, h, w)`` and ``alpha`` the channel weights ``(B, C)``:

    P   = sum_c alpha_c * A_c                            (B, d, h, w), before the relu
    cam = relu(P)
    U   = trilinear upsample of cam to (X, Y, Z), align_corners=True
    S   = (U - min U) / (max U - min U + eps)            per sample, eps = 1e-6
    S   = 0, with no gradient, for a *flat* sample:      max U - min U <= FLAT_RTOL * max |P|

Why the flat rule: min-max divides by the map's range, so its gradient grows like 1 / range. On a constant or
nearly constant map (all voxels equally positive, or all relu-ed away but a few barely positive ones) the
range is ~0 and the gradient of any loss on ``S`` would be amplified up to 1 / eps = 1e6, while ``S`` itself is
no more than the rounding noise of the channel sum magnified to [0, 1] (and differs between kernels that sum
in another order). The test is relative to the map's own scale ``max |P|``, so it does not depend on the
magnitude of ``alpha``; an all-zero ``P`` is flat. Such a sample is the all-zero map: an explanation loss
still has a value there but gives no gradient through the normaliser.

NaN anywhere in ``A`` or ``alpha`` of a sample makes that sample's ``S`` NaN (the relu, min and max keep NaN),
so a loss on it is NaN and the trainer's non-finite check sees it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: Added to the min-max range so that a map whose range is barely above the flat threshold stays finite.
MINMAX_EPS = 1e-6
#: A sample is flat when its range is at most this fraction of its scale (``max |P|`` for a CAM): its
#: normaliser would amplify the gradient more than 1 / FLAT_RTOL = 1000x relative to a map that spans its
#: scale, and magnify the float32 rounding of the channel sum (about sqrt(C) * 2^-24 * max|P|, 1.4e-6 of the
#: scale for C = 512 channels) to more than 1/700 of [0, 1].
FLAT_RTOL = 1e-3


def weighted_channel_sum(features: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``P = sum_c alpha[b, c] * features[b, c]``, the CAM before its relu:
    ``(B, C, d, h, w), (B, C) -> (B, d, h, w)``."""
    if features.dim() != 5 or alpha.dim() != 2 or alpha.shape != features.shape[:2]:
        raise ValueError(f"expected features (B, C, d, h, w) and alpha (B, C); got {tuple(features.shape)} "
                         f"and {tuple(alpha.shape)}")
    return torch.einsum("bcdhw,bc->bdhw", features, alpha)


def combine_cam(features: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``relu(sum_c alpha[b, c] * features[b, c])``: ``(B, C, d, h, w), (B, C) -> (B, d, h, w)``."""
    return torch.relu(weighted_channel_sum(features, alpha))


def upsample_cam(cam: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear upsample (``align_corners=True``) of ``(B, d, h, w)`` to ``(B, X, Y, Z)``."""
    return F.interpolate(cam.unsqueeze(1), size=tuple(int(s) for s in size), mode="trilinear",
                         align_corners=True).squeeze(1)


def minmax_normalize(volume: torch.Tensor, eps: float = MINMAX_EPS, scale: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Per-sample min-max to [0, 1] of ``(B, ...)``; min and max take gradients like ``amin``/``amax``.

    A sample whose range ``max - min`` is at most ``FLAT_RTOL * scale`` is flat: it maps to zeros and passes
    no gradient. ``scale`` ``(B,)`` is the sample's magnitude, by default ``max |volume|``;
    :func:`normalized_cam` passes ``max |P|`` of the CAM before its relu.
    """
    flat = volume.flatten(1)
    low = flat.amin(dim=1)
    high = flat.amax(dim=1)
    if scale is None:
        scale = flat.abs().amax(dim=1)
    shape = (-1,) + (1,) * (volume.dim() - 1)
    span = high - low
    is_flat = span.detach() <= FLAT_RTOL * scale.detach().to(span.dtype)  # False for NaN: NaN stays NaN
    normalized = (volume - low.view(shape)) / (span + eps).view(shape)
    return torch.where(is_flat.view(shape), torch.zeros((), dtype=volume.dtype, device=volume.device), normalized)


def normalized_cam(features: torch.Tensor, alpha: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """The full map ``S`` in [0, 1] at the input size: combine, upsample, min-max (flat samples: zeros).
    ``(B, X, Y, Z)``."""
    pre_relu = weighted_channel_sum(features, alpha)
    scale = pre_relu.detach().abs().flatten(1).amax(dim=1)
    return minmax_normalize(upsample_cam(torch.relu(pre_relu), size), scale=scale)
