"""Prediction metrics for binary classification (lesion = positive class 1).

Inputs are 1-D arrays: ``labels`` in {0, 1} and ``scores`` = predicted probability of class 1. A metric that
is undefined for the inputs (e.g. ROC-AUC with one class only) is ``nan``, never a silent 0 or 1.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _as_binary(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    return y, s


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties counting
    1/2 (Mann-Whitney U / (n_pos n_neg), with average ranks). ``nan`` if a class is absent."""
    y, s = _as_binary(labels, scores)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s)
    ranks = np.empty_like(s)
    sorted_s = s[order]
    # average ranks over ties (1-based): runs of equal values in the sorted scores (no second sort, as np.unique
    # would do; this runs on every voxel of a volume for the mask AUROC)
    first = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    counts = np.diff(np.r_[first, s.size])
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def precision_recall_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at every distinct score threshold (predict positive when ``score >= t``),
    ordered by decreasing recall, ending with the point (recall 0, precision 1) as scikit-learn does.
    Requires at least one positive."""
    y, s = _as_binary(labels, scores)
    n_pos = y.sum()
    if n_pos == 0:
        raise ValueError("precision-recall curve needs at least one positive label")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # last index of each distinct score (descending), i.e. thresholds t = each distinct score
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[distinct]
    predicted = distinct + 1.0
    precision = tp / predicted
    recall = tp / n_pos
    # from the highest threshold down recall grows; reverse so recall decreases, then append (0, 1)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0]


def pr_auc_trapezoid(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the precision-recall curve by the trapezoid rule over recall (what the DUE code reports:
    ``auc(recall, precision)``). Optimistic versus :func:`average_precision`. ``nan`` without positives."""
    y, _ = _as_binary(labels, scores)
    if y.sum() == 0:
        return float("nan")
    precision, recall = precision_recall_curve(labels, scores)
    # recall is decreasing: integrate in increasing order
    return float(np.trapezoid(precision[::-1], recall[::-1]))


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision = sum_n (R_n - R_{n-1}) P_n over thresholds (step-wise area, no interpolation).
    ``nan`` without positives."""
    y, _ = _as_binary(labels, scores)
    if y.sum() == 0:
        return float("nan")
    precision, recall = precision_recall_curve(labels, scores)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def classification_scores(labels: ArrayLike, scores: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """Threshold metrics with prediction = ``score >= threshold``:

    - accuracy = (TP + TN) / N
    - precision = TP / (TP + FP) (``nan`` if nothing is predicted positive)
    - recall (sensitivity) = TP / (TP + FN) (``nan`` without positives)
    - specificity = TN / (TN + FP) (``nan`` without negatives)
    - f1 = 2 TP / (2 TP + FP + FN) (``nan`` if TP + FP + FN = 0)

    plus the threshold-free ``roc_auc``, ``pr_auc`` (trapezoid) and ``average_precision``.
    """
    y, s = _as_binary(labels, scores)
    pred = s >= threshold
    tp = float(np.sum(pred & (y == 1)))
    fp = float(np.sum(pred & (y == 0)))
    tn = float(np.sum(~pred & (y == 0)))
    fn = float(np.sum(~pred & (y == 1)))

    def ratio(num: float, den: float) -> float:
        return num / den if den > 0 else float("nan")

    return {
        "accuracy": ratio(tp + tn, y.size),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(y, s),
        "pr_auc": pr_auc_trapezoid(y, s),
        "average_precision": average_precision(y, s),
    }
