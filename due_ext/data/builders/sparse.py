"""Sparse axial annotation: what a person who draws only every k-th slice of a lesion would produce.

Slices are along Z, the last axis (:mod:`due_ext.data.axes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from due_ext.data.axes import foreground_slices


def sparse_slices(mask: np.ndarray, every_k: int) -> list[int]:
    """Z indices an annotator draws: every ``every_k``-th slice from the first to the last lesion slice.

    The first and the last foreground slice are always kept, so the last gap may be shorter than
    ``every_k``. Edge cases:

    - a lesion on a single slice gives that one slice;
    - ``every_k == 1`` gives every foreground slice;
    - a slice on the k-grid that holds no foreground (a mask with a hole along Z) is skipped, because an
      annotated slice must hold foreground (datalist schema);
    - an empty mask or ``every_k < 1`` raises ``ValueError``.

    Args:
        mask: binary array ``(..., X, Y, Z)``.
        every_k: slice step (k >= 1).

    Returns:
        Sorted, unique Z indices.
    """
    if int(every_k) != every_k or every_k < 1:
        raise ValueError(f"every_k must be a positive integer, got {every_k!r}")
    occupied = foreground_slices(mask)
    if not occupied:
        raise ValueError("sparse_slices: the mask has no foreground, so no slice can be annotated")
    first, last = occupied[0], occupied[-1]
    candidates = set(range(first, last + 1, int(every_k))) | {last}
    return sorted(z for z in candidates if z in set(occupied))


def sparsify(mask: np.ndarray, slices: Sequence[int]) -> np.ndarray:
    """Copy of ``mask`` that keeps only the Z slices in ``slices`` and is zero elsewhere (same dtype).

    Raises ``ValueError`` if a slice index lies outside ``[0, Z)``.
    """
    mask = np.asarray(mask)
    depth = mask.shape[-1]
    bad = [z for z in slices if not 0 <= int(z) < depth]
    if bad:
        raise ValueError(f"sparsify: slices {bad} lie outside the Z range [0, {depth})")
    sparse = np.zeros_like(mask)
    keep = np.asarray(sorted({int(z) for z in slices}), dtype=np.int64)
    sparse[..., keep] = mask[..., keep]
    return sparse
