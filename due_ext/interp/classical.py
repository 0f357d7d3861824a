"""Classical slice interpolators, the yardstick for the diffusion interpolator. Same interface for all:

    interpolate_gaps(annotation, annotated_slices, method) -> (X, Y, Z) float32 in [0, 1]

``annotation`` is ``(X, Y, Z)`` and only its ``annotated_slices`` are read. Annotated slices are copied
as they are; each missing slice inside a block is filled from the block's two annotated slices; slices
outside the annotated range stay 0 (we do not extrapolate beyond what was drawn).

- ``nearest``: copy the nearer annotated slice; a slice exactly midway takes the lower one.
- ``linear``: ``(1 - t) A_start + t A_stop`` at relative position ``t`` (soft values).
- ``sdf``: shape-based interpolation. Each annotated slice becomes a signed distance map (in-plane voxels,
  negative inside: ``d_out - d_in``), the two maps are blended linearly, and a voxel is foreground where the
  blend is ``<= 0`` (inclusive threshold: ties go to foreground). Empty bounding slice (the object ends
  inside the gap): its map is the constant ``max(-sdf_other)`` (the other slice's deepest inside depth),
  so the object shrinks and vanishes at the middle of the gap instead of bridging to nothing. Both empty:
  zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from due_ext.interp.blocks import split_blocks

CLASSICAL_METHODS = ("nearest", "linear", "sdf")


def signed_distance(slice_mask: np.ndarray) -> np.ndarray:
    """In-plane signed distance of a binary 2D mask: negative inside, positive outside (voxel units)."""
    inside = slice_mask > 0.5
    if not inside.any():
        raise ValueError("signed distance of an empty slice is undefined")
    if inside.all():
        return -ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
    return ndimage.distance_transform_edt(~inside) - ndimage.distance_transform_edt(inside)


def _block_sdfs(lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Signed distance maps of a block's two slices (empty-slice rule applied); ``None`` if both are empty."""
    lower_on, upper_on = lower.any(), upper.any()
    if not lower_on and not upper_on:
        return None
    sdf_lower = signed_distance(lower) if lower_on else None
    sdf_upper = signed_distance(upper) if upper_on else None
    if sdf_lower is None:
        sdf_lower = np.full(lower.shape, float(np.max(-sdf_upper)))
    if sdf_upper is None:
        sdf_upper = np.full(upper.shape, float(np.max(-sdf_lower)))
    return sdf_lower, sdf_upper


def interpolate_gaps(annotation: np.ndarray, annotated_slices: Sequence[int], method: str = "sdf") -> np.ndarray:
    """Fill the missing slices of a sparse ``(X, Y, Z)`` annotation with a classical ``method``."""
    if method not in CLASSICAL_METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(CLASSICAL_METHODS)}")
    annotation = np.asarray(annotation)
    if annotation.ndim != 3:
        raise ValueError(f"annotation must be (X, Y, Z); got shape {annotation.shape}")
    binary = (annotation > 0.5).astype(np.float32)
    blocks = split_blocks(annotated_slices, depth=binary.shape[-1])
    filled = np.zeros(binary.shape, np.float32)
    for z in set(int(z) for z in annotated_slices):
        filled[..., z] = binary[..., z]
    for block in blocks:
        lower, upper = binary[..., block.start], binary[..., block.stop]
        sdfs = _block_sdfs(lower, upper) if method == "sdf" else None
        for z in block.missing:
            t = block.position(z)
            if method == "nearest":
                filled[..., z] = lower if t <= 0.5 else upper
            elif method == "linear":
                filled[..., z] = (1.0 - t) * lower + t * upper
            elif sdfs is not None:
                filled[..., z] = (1.0 - t) * sdfs[0] + t * sdfs[1] <= 0
    return filled
