"""Lesion-centred square crops: how any slice size meets the fixed-size network, and how results go back.

A block's window is the bounding box of the foreground of its two annotated slices (their union), grown by a
margin (the object may be wider between the annotated slices than on them), made square, and centred on the
box. If the window fits in ``crop_size`` it is taken at full resolution (no resampling); a larger window is
resampled to ``crop_size`` (area averaging, then a 0.5 threshold for the binary conditions) and results are
resampled back (bilinear). Parts of a window outside the slice read as background.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CropWindow:
    """Square window ``[x0, x0 + side) x [y0, y0 + side)`` in slice coordinates (may extend past the slice)."""

    x0: int
    y0: int
    side: int


def crop_window(slices: Sequence[np.ndarray], crop_size: int, margin_fraction: float = 0.25, min_margin: int = 3,
                jitter: tuple[int, int] = (0, 0)) -> CropWindow | None:
    """Window around the union of the foregrounds of ``slices`` (2D arrays); ``None`` if all are empty.

    Args:
        slices: the 2D masks the window must cover (a block's two annotated slices).
        crop_size: the network's input side; the window is at least this large.
        margin_fraction: margin as a fraction of the box's longer side (at least ``min_margin`` voxels).
        min_margin: smallest margin in voxels.
        jitter: integer shift of the window (training augmentation).
    """
    union = np.zeros(np.shape(slices[0]), dtype=bool)
    for s in slices:
        union |= np.asarray(s) > 0.5
    if not union.any():
        return None
    xs, ys = np.nonzero(union)
    extent = max(xs.max() - xs.min(), ys.max() - ys.min()) + 1
    margin = max(min_margin, math.ceil(margin_fraction * extent))
    side = max(int(crop_size), int(extent + 2 * margin))
    cx, cy = (xs.min() + xs.max()) / 2.0, (ys.min() + ys.max()) / 2.0
    x0 = int(math.floor(cx - (side - 1) / 2.0)) + int(jitter[0])
    y0 = int(math.floor(cy - (side - 1) / 2.0)) + int(jitter[1])
    return CropWindow(x0, y0, side)


def _window_region(window: CropWindow, shape: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
    """Overlap of the window and the slice: (slice rows, slice cols, window rows, window cols)."""
    sx0, sy0 = max(window.x0, 0), max(window.y0, 0)
    sx1, sy1 = min(window.x0 + window.side, shape[0]), min(window.y0 + window.side, shape[1])
    return (slice(sx0, sx1), slice(sy0, sy1), slice(sx0 - window.x0, sx1 - window.x0),
            slice(sy0 - window.y0, sy1 - window.y0))


def extract_crop(slice_2d: np.ndarray, window: CropWindow, crop_size: int) -> np.ndarray:
    """Binary float32 ``(crop_size, crop_size)`` crop of a 2D mask (resampled if the window is larger)."""
    out = np.zeros((window.side, window.side), np.float32)
    rows, cols, wrows, wcols = _window_region(window, np.shape(slice_2d))
    if rows.stop > rows.start and cols.stop > cols.start:
        out[wrows, wcols] = np.asarray(slice_2d, dtype=np.float32)[rows, cols] > 0.5
    if window.side == crop_size:
        return out
    small = F.interpolate(torch.from_numpy(out)[None, None], size=(crop_size, crop_size), mode="area")[0, 0]
    return (small.numpy() >= 0.5).astype(np.float32)


def paste_crop(values: np.ndarray | torch.Tensor, window: CropWindow, shape: tuple[int, int]) -> np.ndarray:
    """Place ``(..., crop, crop)`` values back onto zero slices of ``shape`` (bilinear resample if needed)."""
    values = torch.as_tensor(values, dtype=torch.float32)
    lead = values.shape[:-2]
    if values.shape[-1] != window.side:
        flat = values.reshape(-1, 1, *values.shape[-2:])
        flat = F.interpolate(flat, size=(window.side, window.side), mode="bilinear", align_corners=False)
        values = flat.reshape(*lead, window.side, window.side)
    out = np.zeros((*lead, *shape), np.float32)
    rows, cols, wrows, wcols = _window_region(window, shape)
    if rows.stop > rows.start and cols.stop > cols.start:
        out[..., rows, cols] = values.numpy()[..., wrows, wcols]
    return out
