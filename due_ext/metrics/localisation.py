"""Localisation metrics that do not collapse with the map's resolution.

IoU at a fixed threshold punishes a coarse map (a 4x4x4 Grad-CAM upsampled to the input) for its blur even when
its peak sits on the lesion (:mod:`due_ext.metrics.cam_ceiling`). These ask where the map puts its peak, its mass
and its ranking instead. Inputs are ``(B, ...)`` maps ``S >= 0`` (min-max normalised Grad-CAMs, see
:mod:`due_ext.explain.cam`) and binary masks ``M`` of equal shape; each metric returns a ``(B,)`` float64 tensor.

Definitions (``N`` voxels, ``|M|`` of them in the mask):

- pointing game = share of the map's maximal voxels that lie in ``M``. A single maximum scores 1 (hit) or 0
  (miss); tied maxima score the fraction inside ``M``, the expected hit when the tie is broken uniformly at
  random. Ties are exact float equality (after min-max, voxels that share the raw maximum share the value).
- energy pointing game (Score-CAM's energy-based pointing game; the same formula as saliency precision,
  :func:`due_ext.metrics.explanation.saliency_precision`) = ``sum(S · M) / sum(S)``, the share of the map's mass
  inside the mask.
- mask AUROC = P(a random mask voxel has a higher ``S`` than a random voxel outside the mask), ties counting
  1/2 (:func:`due_ext.metrics.prediction.roc_auc` with the mask as labels). 0.5 = no ranking.
- IoU at the best threshold = the largest IoU of ``{S >= t}`` against ``M`` over the grid
  :data:`LOCALISATION_THRESHOLDS` (0.05, 0.10, ..., 0.95): how well the map could outline the lesion at the
  level that suits it; its threshold is returned too (the lowest one on ties).

Edge cases:

- empty mask: every metric is ``nan`` (there is no lesion to localise; report means skip it).
- mask covering every voxel: mask AUROC is ``nan`` (no voxel outside to rank against); the others are 1.
- flat map (all voxels equal; a min-max normalised flat CAM is all zeros): pointing game = ``|M| / N`` (every
  voxel ties at the maximum), mask AUROC = 0.5 (all ties), energy = ``|M| / N`` for a flat non-zero map and 0 for
  the all-zero map (no mass anywhere, credited nothing, as saliency precision), IoU at the best threshold = 0
  unless the map is non-zero and above some grid threshold (then ``|M| / N``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from due_ext.metrics.explanation import _flatten_pair, explanation_sweep, saliency_precision
from due_ext.metrics.prediction import roc_auc

#: Threshold grid of :func:`best_threshold_iou`: 0.05, 0.10, ..., 0.95.
LOCALISATION_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))


def _nan_where_empty(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    empty = (mask.detach().flatten(1) > 0.5).sum(1) == 0
    return torch.where(empty.to(values.device), torch.full_like(values, float("nan")), values)


def pointing_game(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the maximal voxels of ``saliency`` inside ``mask`` per sample (1/0 for a single maximum);
    ``nan`` for an empty mask. ``(B,)`` float64."""
    s, m = _flatten_pair(saliency, mask)
    top = (s == s.amax(dim=1, keepdim=True)).double()
    return _nan_where_empty((top * m).sum(1) / top.sum(1), mask)


def energy_pointing_game(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(S · M) / sum(S)`` per sample (0 for an all-zero map); ``nan`` for an empty mask. ``(B,)`` float64."""
    return _nan_where_empty(saliency_precision(saliency, mask), mask)


def mask_auroc(saliency: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """P(S at a mask voxel > S at a voxel outside), ties 1/2, per sample; ``nan`` when the mask is empty or
    full. ``(B,)`` float64."""
    s, m = _flatten_pair(saliency, mask)
    s, m = s.cpu().numpy(), m.cpu().numpy()
    return torch.tensor([roc_auc(m[b], s[b]) for b in range(s.shape[0])], dtype=torch.float64,
                        device=saliency.device)


def best_threshold_iou(saliency: torch.Tensor, mask: torch.Tensor,
                       thresholds: Sequence[float] = LOCALISATION_THRESHOLDS) -> dict[str, torch.Tensor]:
    """The largest IoU of ``{S >= t}`` against ``mask`` over ``thresholds`` per sample and the ``t`` reaching it
    (the lowest on ties): ``{"iou": (B,), "threshold": (B,)}`` float64; both ``nan`` for an empty mask."""
    if len(thresholds) == 0:
        raise ValueError("best_threshold_iou: the threshold grid is empty")
    grid = sorted(float(t) for t in thresholds)
    sweep = explanation_sweep(saliency, mask, grid)
    ious = torch.stack([sweep[t]["iou"] for t in grid], dim=1)  # (B, T)
    best, index = ious.max(dim=1)  # the first maximal index on ties: the lowest threshold (grid is sorted)
    grid = torch.tensor(grid, dtype=torch.float64)
    return {"iou": _nan_where_empty(best, mask),
            "threshold": _nan_where_empty(grid.to(best.device)[index], mask)}


def localisation_scores(saliency: torch.Tensor, mask: torch.Tensor,
                        thresholds: Sequence[float] = LOCALISATION_THRESHOLDS) -> dict[str, torch.Tensor]:
    """All four metrics per sample: ``pointing_game``, ``energy_pointing_game``, ``mask_auroc``,
    ``iou_best_threshold`` and the ``best_threshold`` reaching it; each ``(B,)`` float64."""
    best = best_threshold_iou(saliency, mask, thresholds)
    return {"pointing_game": pointing_game(saliency, mask),
            "energy_pointing_game": energy_pointing_game(saliency, mask),
            "mask_auroc": mask_auroc(saliency, mask),
            "iou_best_threshold": best["iou"], "best_threshold": best["threshold"]}
