"""The one axis convention of DUE.

NIfTI arrays as stored are ``(X, Y, Z)``; MONAI's channel-first arrays are ``(C, X, Y, Z)`` and batches
``(B, C, X, Y, Z)``. Sparse annotations are drawn on axial slices, i.e. along **Z, the last spatial axis**,
and ``annotated_slices`` index Z. The DUE paper writes ``(C, D, H, W)``: its D is our Z. Sizes in configs and
on the command line are written ``X,Y,Z`` (the paper profile is ``128,128,64``).
"""

from __future__ import annotations

import numpy as np

#: Index of the slice axis in a stored ``(X, Y, Z)`` array; also the last axis of any channel-first array.
SLICE_AXIS = -1


def parse_size(text: str | tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    """Parse ``"X,Y,Z"`` (or a 3-sequence) into a tuple of three positive ints."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        size = tuple(int(p) for p in parts)
    except (TypeError, ValueError) as err:
        raise ValueError(f"size {text!r} is not three integers X,Y,Z") from err
    if len(size) != 3 or min(size) < 1:
        raise ValueError(f"size {text!r} must be three positive integers X,Y,Z")
    return size  # type: ignore[return-value]


def slice_of(volume: np.ndarray, index: int) -> np.ndarray:
    """The axial slice ``index`` (along Z) of a ``(..., X, Y, Z)`` array."""
    return volume[..., index]


def foreground_slices(mask: np.ndarray) -> list[int]:
    """Z indices of the axial slices of ``mask`` (``..., X, Y, Z``) that hold any foreground."""
    flat = np.asarray(mask).reshape(-1, mask.shape[-1])
    return [int(z) for z in np.nonzero(flat.any(axis=0))[0]]
