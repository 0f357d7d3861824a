"""Overlap of binary masks."""

from __future__ import annotations

import numpy as np


def dice(prediction: np.ndarray, truth: np.ndarray, threshold: float = 0.5, empty: float = 1.0) -> float:
    """Dice coefficient ``2 |P & T| / (|P| + |T|)`` of ``prediction > threshold`` (soft masks are binarised;
    a voxel exactly at the threshold is background) and ``truth > 0.5``.

    Both empty: ``empty`` (default 1.0: nothing to find and nothing found is a perfect match).
    """
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"dice: prediction shape {prediction.shape} differs from truth shape {truth.shape}")
    p, t = prediction > threshold, truth > 0.5
    denominator = int(p.sum()) + int(t.sum())
    if denominator == 0:
        return float(empty)
    return 2.0 * int(np.logical_and(p, t).sum()) / denominator
