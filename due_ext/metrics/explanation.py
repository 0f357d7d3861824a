"""Explanation metrics: how well a saliency map ``S`` in [0, 1] matches the lesion mask ``M``.

Computed per sample on positives; inputs are ``(B, ...)`` tensors of equal shape (any spatial rank). ``S``
is the Grad-CAM of the predicted class, min-max normalised (see :mod:`due_ext.explain.cam`); ``M`` is the
full ground-truth mask (binary). The explanation region at threshold ``t`` is ``P = {S >= t}``.

Definitions (standard, voxel-wise; a false positive is a voxel in ``P`` and not in ``M``):

- IoU = |P ∩ M| / |P ∪ M|; an empty union (no mask, no explanation) counts as 1 (they agree).
- precision = |P ∩ M| / |P|; if ``P`` is empty: 1 when ``M`` is empty too, else 0.
- recall = |P ∩ M| / |M|; if ``M`` is empty: 1 (nothing to find).
- F1 = 2 precision recall / (precision + recall); 0 when both are 0.
- activation recall (eXBL) = sum(S · M) / sum(M): the share of the mask the soft map covers, no threshold.
- annotation coverage (Faruqui & Dubey) = |{S >= t} ∩ M| / |M|: the share of annotated voxels the
  explanation marks; at the same threshold it equals explanation recall (kept under its paper's name).
- saliency precision (Faruqui & Dubey) = sum(S · M) / sum(S): the share of saliency mass inside the
  mask, no threshold; 0 for an all-zero map.

The DUE release counted precision only over voxels labelled -1 (always about 1); we do not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Thresholds of the sweep (paper Fig. 5): 0.0, 0.1, ..., 0.9.
EXPLANATION_THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(10))


def _flatten_pair(saliency: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if saliency.shape != mask.shape:
        raise ValueError(f"saliency {tuple(saliency.shape)} and mask {tuple(mask.shape)} differ in shape")
    if saliency.dim() < 2:
        raise ValueError("expected batched inputs (B, ...)")
    return saliency.detach().flatten(1).double(), (mask.detach().flatten(1) > 0.5).double()


def _region_counts(s: torch.Tensor, m: torch.Tensor,
                   thresholds: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``|{S >= t}|`` and ``|{S >= t} ∩ M|`` per sample and threshold, ``(B, T)`` each, in one pass over the
    voxels (a sweep of T thresholds costs one threshold, not T): each voxel's level is the number of thresholds
    at or below its value, and the region of the k-th smallest threshold is the voxels of level > k."""
    grid = torch.tensor([float(t) for t in thresholds], dtype=torch.float64, device=s.device)
    ordered, order = grid.sort()
    level = torch.bucketize(s, ordered, right=True)  # thresholds <= value (exact float64 comparisons)
    per_level = torch.zeros(s.shape[0], grid.numel() + 1, dtype=torch.float64, device=s.device)
    in_mask = per_level.clone()
    per_level.scatter_add_(1, level, torch.ones_like(s))
    in_mask.scatter_add_(1, level, m)

    def at_or_above(counts: torch.Tensor) -> torch.Tensor:  # voxels of level >= k + 1, back in the given order
        return counts.flip(1).cumsum(1).flip(1)[:, 1:][:, order.argsort()]

    return at_or_above(per_level), at_or_above(in_mask)


def _scores_from_counts(inter: torch.Tensor, n_p: torch.Tensor, n_m: torch.Tensor) -> dict[str, torch.Tensor]:
    """IoU, precision, recall and F1 from region, mask and overlap sizes (the definitions above, once)."""
    union = n_p + n_m - inter
    one, zero = torch.ones_like(inter), torch.zeros_like(inter)
    iou = torch.where(union > 0, inter / union.clamp_min(1), one)
    precision = torch.where(n_p > 0, inter / n_p.clamp_min(1), torch.where(n_m > 0, zero, one))
    recall = torch.where(n_m > 0, inter / n_m.clamp_min(1), one)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), zero)
    return {"iou": iou, "precision": precision, "recall": recall, "f1": f1}


def explanation_scores(saliency: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> dict[str, torch.Tensor]:
    """Per-sample ``iou``, ``precision``, ``recall``, ``f1`` at ``threshold``; each a ``(B,)`` float64 tensor."""
    return explanation_sweep(saliency, mask, (threshold,))[float(threshold)]


def explanation_sweep(saliency: torch.Tensor, mask: torch.Tensor,
                      thresholds: Sequence[float] = EXPLANATION_THRESHOLDS) -> dict[float, dict[str, torch.Tensor]]:
    """:func:`explanation_scores` at every threshold: ``{t: {"iou": (B,), ...}}``, from one pass over the voxels."""
    s, m = _flatten_pair(saliency, mask)
    n_p, inter = _region_counts(s, m, thresholds)
    n_m = m.sum(1, keepdim=True).expand_as(n_p)
    scores = _scores_from_counts(inter, n_p, n_m)
    return {float(t): {name: values[:, k] for name, values in scores.items()} for k, t in enumerate(thresholds)}


def activation_recall(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(S · M) / sum(M)`` per sample; 1 when the mask is empty. ``(B,)`` float64."""
    s, m = _flatten_pair(saliency, mask)
    n_m = m.sum(1)
    return torch.where(n_m > 0, (s * m).sum(1) / n_m.clamp_min(1), torch.ones_like(n_m))


def annotation_coverage(saliency: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``|{S >= t} ∩ M| / |M|`` per sample; 1 when the mask is empty. ``(B,)`` float64."""
    return explanation_scores(saliency, mask, threshold)["recall"]


def saliency_precision(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(S · M) / sum(S)`` per sample; 0 for an all-zero map. ``(B,)`` float64."""
    s, m = _flatten_pair(saliency, mask)
    total = s.sum(1)
    return torch.where(total > 0, (s * m).sum(1) / total.clamp_min(1e-300), torch.zeros_like(total))
