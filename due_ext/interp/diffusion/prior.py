"""The classical prior of the diffusion interpolator: classical fills of a block's missing slices, as network input.

A network built with ``prior_channels = len(PRIOR_METHODS)`` sees, beside the noisy target and its two
conditions, the fills that :func:`due_ext.interp.classical.interpolate_gaps` gives for the target slice from the
block's two annotated slices: ``linear_union`` (the best classical peer on the demo sets) and ``sdf``
(shape-based, the smoother one). The heuristic becomes the starting point and the network learns the correction;
at worst it learns to copy a fill. The fills are computed on the same crops the network sees (training and
sampling alike), from the block's *annotated* bounds, not from the chain's own previous sample.

:func:`refine_at_full_resolution` keeps a resampled window (an object larger than the crop) from losing the
detail of its annotated slices: the network's correction of the ``sdf`` fill is applied to the full-resolution
``sdf`` fill instead of pasting the coarse result itself.
"""

from __future__ import annotations

import numpy as np

from due_ext.interp.classical import interpolate_gaps

#: Classical fills given to the network, in channel order.
PRIOR_METHODS = ("linear_union", "sdf")
#: The fill a resampled window's correction is applied to at full resolution (:func:`refine_at_full_resolution`).
FULL_RESOLUTION_BASE = "sdf"


def block_fills(lower: np.ndarray, upper: np.ndarray, gap: int, method: str) -> np.ndarray:
    """``method``'s fill of the ``gap`` missing slices between 2D masks ``lower`` and ``upper``:
    float32 ``(gap, H, W)`` in {0, 1}."""
    if gap < 1:
        raise ValueError(f"gap must be >= 1, got {gap}")
    if np.shape(lower) != np.shape(upper) or np.ndim(lower) != 2:
        raise ValueError(f"lower and upper must be 2D masks of one shape, got {np.shape(lower)}, {np.shape(upper)}")
    stack = np.zeros((*np.shape(lower), gap + 2), np.float32)
    stack[..., 0], stack[..., -1] = np.asarray(lower) > 0.5, np.asarray(upper) > 0.5
    filled = interpolate_gaps(stack, [0, gap + 1], method)
    return np.moveaxis(filled[..., 1:-1], -1, 0) > 0.5


def classical_prior(lower: np.ndarray, upper: np.ndarray, gap: int,
                    methods: tuple[str, ...] = PRIOR_METHODS) -> np.ndarray:
    """The prior channels of every missing slice of a block: float32 ``(gap, len(methods), H, W)`` in {-1, +1}
    (the network's mask scale: -1 background)."""
    fills = np.stack([block_fills(lower, upper, gap, method) for method in methods], axis=1)
    return fills.astype(np.float32) * 2.0 - 1.0


def refine_at_full_resolution(coarse: np.ndarray, base_coarse: np.ndarray, base_full: np.ndarray) -> np.ndarray:
    """``base_full + (coarse - base_coarse)``, clipped to [0, 1]: the network's change to the classical fill,
    measured on the crop (``coarse``, ``base_coarse``, already pasted back to full resolution) and applied to the
    same fill computed at full resolution. Where the network copies the fill, the full-resolution fill is
    returned unchanged."""
    return np.clip(base_full + (coarse - base_coarse), 0.0, 1.0).astype(np.float32)
