"""From variance to the per-voxel weights of the DUE explanation loss: the one mapping used everywhere.

Paper (Section 4.3): ``w = minmax(sigmoid(-var))``. Our exact rules, for an ``(X, Y, Z)`` variance volume and the
Z indices a person annotated (slices along Z, :mod:`due_ext.data.axes`):

- **annotated slices**: ``w = 1`` (drawn by a person: certain, whatever the variance file holds there).
- **missing slices of a block** (:func:`due_ext.interp.blocks.split_blocks`): ``s = sigmoid(-var)`` and, with
  ``normalization``

  - ``"block"`` (default, faithful to the original): ``w = (s - min s) / (max s - min s)`` with min and max over
    all voxels of the block's missing slices (full slices). The most uncertain voxel of *every* block gets 0 and
    the most certain 1, even in an easy block.
  - ``"volume"``: the same min-max, but over the missing slices of all blocks of the volume together, so an
    easy block keeps high weights next to a hard one.
  - ``"absolute"``: min-max against fixed bounds instead of the data: ``var = 0`` gives 1 and
    ``var >= max_variance`` gives 0 (``max_variance = 0.25`` is the largest variance of values in [0, 1]).
    Comparable across blocks and volumes; no data-dependent stretching.

  A block (or volume) whose ``s`` is constant has nothing to rank: its weights are 1 (e.g. zero variance
  everywhere, which is what a block with two empty bounding slices gets).
- **slices outside the annotated range** (before the first or after the last annotated slice): ``outside``
  (default 1). The interpolators never extrapolate (they leave these slices empty) and our annotation protocol
  draws the first and the last lesion slice, so "no lesion there" is as certain as a drawn slice. Set
  ``outside`` lower if annotators may stop before the lesion ends.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from due_ext.interp.blocks import split_blocks

NORMALIZATIONS = ("block", "volume", "absolute")
#: Largest population variance of values in [0, 1] (half the samples 0, half 1).
MAX_VARIANCE = 0.25


def _minmax(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``(values - low) / (high - low)`` clipped to [0, 1]; all ones where ``high == low`` (nothing to rank)."""
    span = float(high) - float(low)
    if span <= 0.0:
        return np.ones_like(values)
    return np.clip((values - low) / span, 0.0, 1.0)


def uncertainty_weights(variance: np.ndarray | torch.Tensor, annotated_slices: Sequence[int],
                        normalization: str = "block", max_variance: float = MAX_VARIANCE,
                        outside: float = 1.0) -> np.ndarray | torch.Tensor:
    """Per-voxel weights in [0, 1] from an ``(X, Y, Z)`` variance volume (rules in the module docstring).

    Args:
        variance: per-voxel variance, ``(X, Y, Z)`` (numpy or torch; the result has the same type, dtype float32,
            and for torch the same device). Negative values (numerical noise) are treated as 0.
        annotated_slices: Z indices of the annotated slices.
        normalization: ``"block"`` (default, the original), ``"volume"`` or ``"absolute"``.
        max_variance: the variance mapped to weight 0 by ``"absolute"``.
        outside: weight of the slices outside the annotated range.

    Raises:
        ValueError: bad shape, NaN/Inf, unknown normalization, or annotated slices outside the volume.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization {normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
    if not max_variance > 0.0:
        raise ValueError(f"max_variance must be > 0, got {max_variance}")
    device = variance.device if isinstance(variance, torch.Tensor) else None
    # numpy, not torch: these are a few whole-volume passes, where torch's per-operator overhead would dominate.
    # float64: sigmoid(-var) sits near 0.5 where float32 cannot tell variances 1e-7 apart.
    var = np.array(variance.detach().cpu().numpy() if device is not None else variance, dtype=np.float64)
    if var.ndim != 3:
        raise ValueError(f"variance must be an (X, Y, Z) volume, got shape {var.shape}")
    if not np.isfinite(var).all():
        raise ValueError("variance contains NaN or Inf")
    blocks = split_blocks(annotated_slices, depth=var.shape[-1])
    slices = sorted(set(int(z) for z in annotated_slices))
    weights = np.full_like(var, float(outside))
    if slices:
        weights[..., slices[0]:slices[-1] + 1] = 1.0
    gaps = [np.s_[..., b.start + 1:b.stop] for b in blocks]
    # the paper's flipped sigmoid (high variance -> low score), on the missing slices only
    scores = [_flipped_sigmoid(np.maximum(var[gap], 0.0)) for gap in gaps]
    if normalization == "absolute":
        bounds = [(float(_flipped_sigmoid(np.float64(max_variance))), 0.5)] * len(gaps)  # sigmoid(-0) = 0.5
    elif normalization == "volume" and gaps:
        bounds = [(min(s.min() for s in scores), max(s.max() for s in scores))] * len(gaps)
    else:
        bounds = [(s.min(), s.max()) for s in scores]
    for gap, score, (low, high) in zip(gaps, scores, bounds, strict=True):
        weights[gap] = _minmax(score, low, high)
    weights[..., slices] = 1.0
    weights = weights.astype(np.float32)
    return weights if device is None else torch.from_numpy(weights).to(device)


def _flipped_sigmoid(var: np.ndarray) -> np.ndarray:
    """``sigmoid(-var)`` for ``var >= 0``, written with tanh so large variances cannot overflow ``exp``."""
    return 0.5 - 0.5 * np.tanh(0.5 * var)
