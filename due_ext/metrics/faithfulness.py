"""Faithfulness of an explanation to the model (DeYoung et al. 2020, via the explanation-guided learning
survey): does the prediction depend on the region the explanation points at?

With ``p(y | x)`` the softmax probability of class ``y`` and ``R`` the explanation region (the saliency map
binarised at a threshold):

- comprehensiveness = p(y | x) - p(y | x with R removed)    (high: the region was needed)
- sufficiency       = p(y | x) - p(y | only R kept)         (low: the region alone suffices)

"Removed" voxels are replaced by a fill: ``"zero"`` (the value 0) or ``"blur"`` (the same voxels of a
Gaussian-blurred copy of the image, sigma in voxels), so the model sees no sharp artificial edge.
"""

from __future__ import annotations

import torch
from monai.transforms import GaussianSmooth

FILLS = ("zero", "blur")


def remove_region(image: torch.Tensor, region: torch.Tensor, fill: str = "zero", sigma: float = 2.0) -> torch.Tensor:
    """Replace the voxels of ``image`` (B, C, X, Y, Z) where ``region`` (B, X, Y, Z or B, 1, ...) is true."""
    if fill not in FILLS:
        raise ValueError(f"fill {fill!r} is not one of {FILLS}")
    region = region.bool()
    if region.dim() == image.dim() - 1:
        region = region.unsqueeze(1)
    if fill == "zero":
        replacement = torch.zeros_like(image)
    else:
        smooth = GaussianSmooth(sigma=sigma)
        replacement = torch.stack([torch.as_tensor(smooth(sample)) for sample in image]).to(image)
    return torch.where(region.expand_as(image), replacement, image)


@torch.no_grad()
def _class_probability(model: torch.nn.Module, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(model(image).float(), dim=1)
    return probs.gather(1, target.view(-1, 1).long()).squeeze(1)


def comprehensiveness(model: torch.nn.Module, image: torch.Tensor, saliency: torch.Tensor, target: torch.Tensor,
                      threshold: float = 0.5, fill: str = "zero", sigma: float = 2.0) -> torch.Tensor:
    """``p(y|x) - p(y|x without {S >= threshold})`` per sample, ``(B,)``. Runs the model in its current mode."""
    region = saliency >= threshold
    return _class_probability(model, image, target) - _class_probability(
        model, remove_region(image, region, fill, sigma), target)


def sufficiency(model: torch.nn.Module, image: torch.Tensor, saliency: torch.Tensor, target: torch.Tensor,
                threshold: float = 0.5, fill: str = "zero", sigma: float = 2.0) -> torch.Tensor:
    """``p(y|x) - p(y|only {S >= threshold} kept)`` per sample, ``(B,)``."""
    outside = saliency < threshold
    return _class_probability(model, image, target) - _class_probability(
        model, remove_region(image, outside, fill, sigma), target)
