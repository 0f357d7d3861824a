"""Uncertainty metrics: does a variance map agree with another one, and does it point at the errors?

- :func:`spearman`: Spearman rank correlation = Pearson correlation of the average ranks (ties share their mean
  rank); ``nan`` when either input is constant (no ranking to compare).
- AUROC of an uncertainty score for "this voxel is wrong": :func:`due_ext.metrics.prediction.roc_auc` with
  ``labels = error`` and ``scores = uncertainty`` (reused, not redefined).
- :func:`edge_proximity`: the cheap baseline ``exp(-|SDF of the interpolation| / (1 + distance to the nearest
  annotated slice))``: voxels near the interpolated boundary, and far from any drawn slice, are uncertain.
- :func:`classical_disagreement`: the other cheap baseline, the per-voxel population variance of the nearest,
  linear and SDF interpolations as they come (nearest and SDF binary, linear soft): 0 where all three agree.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage
from scipy.stats import rankdata

from due_ext.interp.classical import signed_distance


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation of two equally long arrays (flattened); ``nan`` if one is constant."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"spearman: inputs differ in size ({x.size} and {y.size})")
    if x.size < 2:
        raise ValueError("spearman: needs at least two values")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("spearman: inputs contain NaN or Inf")
    rx, ry = rankdata(x), rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denominator = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    if denominator == 0.0:
        return float("nan")
    return float((rx * ry).sum() / denominator)


def edge_proximity(interpolation: np.ndarray, slice_distance: ArrayLike, fallback: np.ndarray | None = None
                   ) -> np.ndarray:
    """Edge-proximity uncertainty of interpolated slices ``(G, H, W)`` (binarised at 0.5).

    ``exp(-|sdf| / (1 + d))`` with ``sdf`` the in-plane signed distance of each interpolated slice (voxels) and
    ``d`` (``(G,)``) its distance in slices to the nearest annotated slice. An interpolated slice without
    foreground has no boundary; there ``|sdf|`` is the distance to the foreground of ``fallback`` (``(H, W)``,
    e.g. the union of the two annotated slices) or infinite (score 0) without one.
    """
    interpolation = np.asarray(interpolation)
    distance = np.asarray(slice_distance, dtype=np.float64).reshape(-1)
    if interpolation.ndim != 3 or distance.shape[0] != interpolation.shape[0]:
        raise ValueError(f"edge_proximity: need (G, H, W) slices and G distances, got {interpolation.shape} and "
                         f"{distance.shape}")
    scores = np.zeros(interpolation.shape, np.float64)
    for g, (slice_2d, d) in enumerate(zip(interpolation > 0.5, distance, strict=True)):
        if slice_2d.any():
            magnitude = np.abs(signed_distance(slice_2d))
        elif fallback is not None and np.asarray(fallback).any():
            magnitude = ndimage.distance_transform_edt(~(np.asarray(fallback) > 0.5))
        else:
            continue
        scores[g] = np.exp(-magnitude / (1.0 + d))
    return scores


def classical_disagreement(nearest: ArrayLike, linear: ArrayLike, sdf: ArrayLike) -> np.ndarray:
    """Per-voxel population variance of the three classical interpolations (values as given, in [0, 1])."""
    return np.stack([np.asarray(v, dtype=np.float64) for v in (nearest, linear, sdf)]).var(axis=0)
