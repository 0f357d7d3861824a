"""The two floors every explanation is compared with: maps that know nothing about a given lesion.

- :func:`gaussian_blob`: a centred Gaussian of the mean lesion size. Lesions sit near the crop centre in the
  demo data, so a map that always points there scores well above zero without looking at the image; a method
  has to beat it to show it localises. ``sigma`` is chosen so that the blob's 0.5 level set (the report's
  threshold) is the centred ellipsoid of the mean lesion volume: with the equivalent-sphere radius
  ``r = (3 V / (4 pi))^(1/3)`` in voxels and ``exp(-r^2 / (2 sigma^2)) = 1/2``, ``sigma = r / sqrt(2 ln 2)``. With a
  voxel ``spacing`` the blob is round in millimetres: axis ``i`` gets ``sigma_i = sigma * g / spacing_i`` with
  ``g`` the geometric mean spacing, which keeps the level set's volume at ``V`` voxels. The peak is 1 at the
  exact centre ``((X-1)/2, (Y-1)/2, (Z-1)/2)``; the map is not min-max normalised, so ``{blob >= 0.5}`` is that
  ellipsoid.
- :func:`initial_cam`: the Grad-CAM of the same architecture at initialisation (weights drawn with the run's
  seed), same layer, same procedure (predicted class, :func:`due_ext.explain.gradcam.grad_cam`). What the
  architecture's receptive fields and padding give for free, before any training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from due_ext.explain.gradcam import grad_cam


def mean_lesion_voxels(masks: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """Mean voxel count of the non-empty binary masks (a ``(B, ...)`` batch or a sequence of masks of any
    shapes); raises when every mask is empty."""
    counts = [int((mask.detach() > 0.5).sum()) for mask in masks]
    counts = [count for count in counts if count > 0]
    if not counts:
        raise ValueError("mean_lesion_voxels: every mask is empty, so there is no lesion size to match")
    return sum(counts) / len(counts)


def gaussian_blob(shape: Sequence[int], lesion_voxels: float,
                  spacing: Sequence[float] | None = None) -> torch.Tensor:
    """A centred Gaussian ``shape`` map (float64, peak 1) whose ``>= 0.5`` region is the centred ellipsoid of
    ``lesion_voxels`` voxels (round in millimetres when ``spacing`` is given)."""
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"gaussian_blob: shape must be positive sizes, got {shape}")
    if not lesion_voxels > 0:
        raise ValueError(f"gaussian_blob: lesion_voxels must be positive, got {lesion_voxels}")
    spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(shape)
    if len(spacing) != len(shape) or any(s <= 0 for s in spacing):
        raise ValueError(f"gaussian_blob: spacing {spacing} must hold one positive value per axis of {shape}")
    dims = len(shape)
    # equivalent-ball radius in voxels for any rank: V = pi^(d/2) / Gamma(d/2 + 1) * r^d
    radius = (lesion_voxels * math.gamma(dims / 2 + 1) / math.pi ** (dims / 2)) ** (1 / dims)
    sigma = radius / math.sqrt(2 * math.log(2))
    mean_spacing = math.prod(spacing) ** (1 / dims)
    exponent = torch.zeros(shape, dtype=torch.float64)
    for axis, (size, step) in enumerate(zip(shape, spacing, strict=True)):
        coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
        view = [1] * dims
        view[axis] = size
        exponent = exponent + (coords.view(view) / (sigma * mean_spacing / step)) ** 2
    return torch.exp(-exponent / 2)


def initial_network(network_factory: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``network_factory()`` built under ``torch.manual_seed(seed)``, in eval mode; the caller's global random
    state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: factories build on the CPU
        torch.manual_seed(seed)
        network = network_factory()
    return network.eval()


def network_cam(network: nn.Module, images: torch.Tensor, target_layer: str = "layer4",
                class_index: torch.Tensor | int | None = None) -> torch.Tensor:
    """Detached Grad-CAM ``(B, X, Y, Z)`` in [0, 1] of ``network`` (moved to the images' device, mode unchanged)
    for ``images`` ``(B, C, X, Y, Z)``; ``class_index`` as :func:`~due_ext.explain.gradcam.grad_cam` (``None``:
    the predicted class, as the evaluator explains the trained network)."""
    network = network.to(images.device)
    with torch.enable_grad():  # a head other than GAP + linear needs autograd for the channel weights
        cam = grad_cam(network, images, class_index=class_index, target_layer=target_layer)
    return cam[:, 0].detach()


def initial_cam(network_factory: Callable[[], nn.Module], images: torch.Tensor, seed: int,
                target_layer: str = "layer4", class_index: torch.Tensor | int | None = None) -> torch.Tensor:
    """The Grad-CAM floor: :func:`network_cam` of :func:`initial_network` ``(network_factory, seed)``."""
    return network_cam(initial_network(network_factory, seed), images, target_layer, class_index)
