"""The best explanation IoU a Grad-CAM of a given resolution can reach: a ceiling for the explanation metrics.

A Grad-CAM is a ``(d, h, w)`` map upsampled trilinearly to the input and min-max normalised
(:mod:`due_ext.explain.cam`), so small lesions in a large input cannot be outlined by a coarse map however well
the network is trained. The *oracle* map is the lesion mask itself average-pooled onto the feature grid (each
cell = the lesion fraction it holds), pushed through the same upsample, min-max and threshold as a real
Grad-CAM. Its IoU against the mask is what a perfect explanation at that resolution scores; method differences
far below it are not measurable. It is a reference value, not a strict maximum (another map could score
slightly higher at one threshold).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from due_ext.explain.cam import minmax_normalize, upsample_cam
from due_ext.metrics.explanation import explanation_scores


def oracle_cam(mask: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """The oracle saliency ``(B, X, Y, Z)`` in [0, 1] of binary masks ``(B, X, Y, Z)`` for a ``grid`` = ``(d, h, w)``
    feature map: the mask's fraction per grid cell, upsampled and min-max normalised like a Grad-CAM."""
    if mask.dim() != 4:
        raise ValueError(f"mask must be (B, X, Y, Z), got shape {tuple(mask.shape)}")
    if len(grid) != 3 or any(int(g) < 1 for g in grid):
        raise ValueError(f"grid must be three positive sizes (d, h, w), got {tuple(grid)}")
    pooled = F.adaptive_avg_pool3d((mask > 0.5).float().unsqueeze(1), tuple(int(g) for g in grid)).squeeze(1)
    return minmax_normalize(upsample_cam(pooled, mask.shape[1:]))


def oracle_cam_iou(mask: torch.Tensor, grid: Sequence[int], threshold: float = 0.5) -> torch.Tensor:
    """Per-sample IoU ``(B,)`` of the oracle map of ``grid`` binarised at ``threshold`` against ``mask``."""
    return explanation_scores(oracle_cam(mask, grid), mask, threshold)["iou"]
