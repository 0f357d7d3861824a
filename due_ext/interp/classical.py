"""Classical slice interpolators, the yardstick for the diffusion interpolator. Same interface for all:

    interpolate_gaps(annotation, annotated_slices, method) -> (X, Y, Z) float32 in [0, 1]

``annotation`` is ``(X, Y, Z)`` and only its ``annotated_slices`` are read. Annotated slices are copied
as they are; each missing slice inside a block is filled from the block's two annotated slices; slices
outside the annotated range stay 0 (we do not extrapolate beyond what was drawn).

- ``nearest``: copy the nearer annotated slice; a slice exactly midway takes the lower one.
- ``linear``: ``(1 - t) A_start + t A_stop`` at relative position ``t`` (soft values). Binarised by the
  evaluation's strict ``> 0.5``, a voxel drawn in only one slice is lost at ``t = 0.5``: the tie goes to the
  intersection of the two slices.
- ``linear_union``: the same blend thresholded here with ``>= 0.5`` (binary): identical to ``linear`` except at
  ``t = 0.5``, where a voxel drawn in either slice is kept (the union). Wins on gaps of one slice (``k = 2``).
- ``sdf``: shape-based interpolation. Each annotated slice becomes a signed distance map (in-plane voxels,
  negative inside: ``d_out - d_in``), the two maps are blended linearly, and a voxel is foreground where the
  blend is ``<= 0`` (inclusive threshold: ties go to foreground). Empty bounding slice (the object ends
  inside the gap): its map is the constant ``max(-sdf_other)`` (the other slice's deepest inside depth),
  so the object shrinks and vanishes at the middle of the gap instead of bridging to nothing. Both empty:
  zeros.
- ``morphological``: ITK's morphological contour interpolation (Albu et al., IEEE TBME 2008; the filter that
  ITK-SNAP and 3D Slicer use), run along Z with the annotated slices as its custom slice positions, so an
  annotated empty slice is a drawn "the object ended here" (the filter then shrinks the object towards it)
  rather than a slice to skip. Optional dependency: ``pip install 'due-ext[itk]'``
  (``itk-morphologicalcontourinterpolation``); :func:`morphological_available` says whether it is installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from due_ext.interp.blocks import split_blocks

CLASSICAL_METHODS = ("nearest", "linear", "linear_union", "sdf", "morphological")
#: The methods that need an optional dependency, and the extra that installs it.
OPTIONAL_METHODS = {"morphological": "itk"}
MORPHOLOGICAL_MISSING = ("method 'morphological' needs ITK's morphological contour interpolation: "
                          "pip install 'due-ext[itk]' (package itk-morphologicalcontourinterpolation)")


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
    if method == "morphological" and blocks:
        filled = _morphological_fill(binary, sorted(set(int(z) for z in annotated_slices)))
        filled[..., : blocks[0].start] = 0  # the filter does not extrapolate; make sure nothing lies outside
        filled[..., blocks[-1].stop + 1:] = 0
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
            elif method == "linear_union":
                filled[..., z] = (1.0 - t) * lower + t * upper >= 0.5
            elif sdfs is not None:
                filled[..., z] = (1.0 - t) * sdfs[0] + t * sdfs[1] <= 0
    return filled


def morphological_available() -> bool:
    """Whether the ``morphological`` method can run (``itk-morphologicalcontourinterpolation`` installed)."""
    try:
        _itk_with_contour_interpolation()
    except ModuleNotFoundError:
        return False
    return True


def _itk_with_contour_interpolation():
    """The ``itk`` module, checked to hold ``MorphologicalContourInterpolator`` (imported on first use: loading
    ITK's wrappers takes seconds)."""
    try:
        import itk

        itk.MorphologicalContourInterpolator  # noqa: B018 (ITK loads its modules lazily, on attribute access)
    except (ImportError, AttributeError) as error:  # AttributeError: itk without the contour-interpolation module
        raise ModuleNotFoundError(MORPHOLOGICAL_MISSING) from error
    return itk


def _morphological_fill(binary: np.ndarray, annotated_slices: list[int]) -> np.ndarray:
    """ITK morphological contour interpolation of a binary ``(X, Y, Z)`` volume along Z between
    ``annotated_slices`` (sorted), the only slices it reads. Returns ``(X, Y, Z)`` float32 in {0, 1}."""
    itk = _itk_with_contour_interpolation()
    # ITK indexes (x, y, z) over a C-ordered (z, y, x) array, so ITK axis 2 is our Z
    drawn = np.zeros(binary.shape[::-1], np.uint8)
    drawn[annotated_slices] = np.moveaxis(binary[..., annotated_slices] > 0.5, -1, 0).transpose(0, 2, 1)
    image = itk.image_from_array(drawn)
    fill = itk.MorphologicalContourInterpolator[type(image)].New(image)
    fill.SetLabel(1)
    fill.SetAxis(2)
    # custom positions: an annotated slice is one even when empty (auto-detection would skip it and bridge)
    fill.SetUseCustomSlicePositions(True)
    fill.SetLabeledSliceIndices(2, 1, annotated_slices)
    fill.Update()
    return np.ascontiguousarray(itk.array_from_image(fill.GetOutput()).transpose(2, 1, 0) > 0).astype(np.float32)
