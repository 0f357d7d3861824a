"""The one preprocessing chain of DUE items, from a stored (demo or raw clinical) scan to the network's input.

Every bundle config builds its chain here (train, validation, test, inference; the exported bundle vendors this
module), so a scan is seen the same way wherever it goes::

    LoadImaged -> EnsureTyped -> SparseAnnotationd
      [-> Orientationd (orientation)] [-> Spacingd (spacing)] [-> PlaceSparseSlicesd]   spatial grid
      [-> ScaleIntensityRanged (CT window) | ScaleIntensityRangePercentilesd (MR)]      intensity
      -> FillMissingExplanationKeysd
      [-> ResampleToSized | ResizeWithPadOrCropd (size, size_mode)] -> drop what cannot collate

Each bracketed step is off when its option is ``None``; with every option off the chain is the one the demo
data sets were built for (they are stored already windowed and on their grid, see ``bundles/due/docs``).

The sparse annotation. ``annotated_slices`` index Z, the last axis of the **stored** array. Orientation and
spacing are applied by MONAI to the dense volumes (image, mask, interpolation, weights, variance); the
annotation and ``annotated_mask`` instead go through :class:`PlaceSparseSlicesd`, which puts each annotated
slice on exactly one slice of the new grid, the nearest by world position (:func:`nearest_slices`, the rule
:func:`~due_ext.data.transforms.remap_slices` uses for resizing): upsampling along Z does not copy a drawing
into neighbouring slices as if it had been drawn there, and downsampling keeps every annotated slice that has a
new slice of its own (two annotated slices that land on one new slice: the nearer one is kept, the grid has no
room for both).

When the stored last axis is not the scan's axial axis (a sagittal or coronal stack stored as acquired), the
drawings still run along the stored last axis; orientation to RAS would move that axis elsewhere, and
:class:`PlaceSparseSlicesd` then stops with an error naming the file. Keep such data with ``orientation:
null`` (the stored last axis stays the slice axis, which is what DUE's slice interpolation needs), or store the
volumes with the drawn slices along the last axis.

Crop or pad versus resize. With a ``spacing`` the voxel size means millimetres and ``size_mode
"crop_or_pad"`` (``ResizeWithPadOrCropd``: centre crop or pad) keeps it, so a lesion has the same size in voxels
in every scan; ``"resample"`` (:class:`~due_ext.data.transforms.ResampleToSized`, the paper's resize of a
lesion-centred crop) stretches each scan to the size and undoes the spacing step. ``"resample"`` stays the
default because the demo and paper profiles (no spacing) are defined that way.

Inference maps the Grad-CAM, computed on the network's grid, back onto the input file's own grid with
:func:`cams_on_input_grid` (MONAI ``Invertd`` with the image's applied operations).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor, decollate_batch
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    InvertibleTransform,
    LoadImaged,
    MapTransform,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialResample,
)

from due_ext.data import schema
from due_ext.data.axes import foreground_slices, parse_size
from due_ext.data.transforms import (
    ANNOTATED_MASK,
    FillMissingExplanationKeysd,
    ResampleToSized,
    SparseAnnotationd,
    _source_name,
    nearest_slices,
)
from due_ext.data.validate import DatalistError

#: ``size_mode`` values: how the chain brings a volume to ``size``.
SIZE_MODES = ("resample", "crop_or_pad")
#: ``intensity`` kinds: ``{"ct": [low HU, high HU]}`` or ``{"mr": [low percentile, high percentile]}``.
INTENSITY_KINDS = ("ct", "mr")
#: Dense keys resampled with nearest neighbour by Spacingd (binary masks); the others are interpolated.
NEAREST_KEYS = (schema.MASK,)
#: Relative tolerance on the voxel-to-voxel map between the stored and the new grid (float64 affines built
#: from float32 NIfTI headers: their products carry ~1e-6 relative error; 1e-4 leaves a wide margin).
AFFINE_TOLERANCE = 1e-4


def _affine(volume: torch.Tensor, key: str) -> np.ndarray:
    if not isinstance(volume, MetaTensor):
        raise ValueError(f"PlaceSparseSlicesd: {key} must be a MetaTensor with an affine (load it with LoadImaged)")
    return np.asarray(volume.affine.detach().cpu(), dtype=np.float64)


class PlaceSparseSlicesd(MapTransform):
    """Move the sparse annotation onto the reference image's new grid, each annotated slice on one new slice.

    MONAI's ``Orientationd``/``Spacingd`` with nearest interpolation would copy an annotated slice into every
    new slice nearest to it when upsampling along Z (slices that were never drawn would count as drawn), and
    drop annotated slices that no new slice centre happens to sample when downsampling; this transform places
    them by world position instead. In-plane, each annotated slice is resampled with nearest neighbour onto
    the new grid (MONAI ``SpatialResample``), so orientation flips and in-plane spacing are MONAI's.

    Reads the stored annotation (its own affine) and the reference image after its spatial transforms. The
    new Z index of annotated slice ``z`` is the nearest new slice to its world position
    (:func:`nearest_slices`); ``annotated_slices``, the annotation and ``annotated_mask`` are rewritten
    consistently, on the reference's grid and metadata. Items without an annotation pass through.

    Raises:
        DatalistError: naming the file, when the new grid's slice axis is not the stored last axis (the
            orientation step moved it; see the module docstring).
    """

    def __init__(self, reference_key: str = schema.IMAGE, annotation_key: str = schema.ANNOTATION,
                 mask_key: str = ANNOTATED_MASK, slices_key: str = schema.ANNOTATED_SLICES) -> None:
        super().__init__([annotation_key, mask_key], allow_missing_keys=True)
        self.reference_key = reference_key
        self.annotation_key = annotation_key
        self.mask_key = mask_key
        self.slices_key = slices_key
        self._resample = SpatialResample(mode="nearest", padding_mode="zeros")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.annotation_key not in d:
            return d
        annotation, reference = d[self.annotation_key], d[self.reference_key]
        source = _source_name(annotation)
        src, dst = _affine(annotation, self.annotation_key), _affine(reference, self.reference_key)
        voxel_map = np.linalg.solve(dst, src)  # stored voxel -> new voxel
        scale = np.abs(voxel_map[:3, :3]).max()
        if max(abs(voxel_map[2, :2]).max(), abs(voxel_map[:2, 2]).max()) > AFFINE_TOLERANCE * scale:
            raise DatalistError(
                f"{source}: the annotated slices index the stored last axis, which the new grid of "
                f"{_source_name(reference)} does not keep as its slice axis (voxel map\n{np.round(voxel_map, 4)}); "
                "set orientation to null to keep the stored axes, or store the volume with the drawn slices "
                "along its last axis")
        slices = [int(s) for s in d[self.slices_key]]
        new_shape = tuple(int(s) for s in reference.shape[1:])
        positions = {s: voxel_map[2, 2] * s + voxel_map[2, 3] for s in slices}
        mapping = nearest_slices(positions, new_shape[2])
        # In-plane: the new grid with the stored Z axis (its Z column and offset expressed in new voxels), so
        # that stored slice z is resampled as a whole onto the new in-plane grid and nothing moves along Z.
        stored_z = np.eye(4)
        stored_z[2, 2], stored_z[2, 3] = voxel_map[2, 2], voxel_map[2, 3]
        in_plane = self._resample(annotation, dst_affine=torch.as_tensor(dst @ stored_z),
                                  spatial_size=(*new_shape[:2], annotation.shape[-1]))
        in_plane = in_plane.as_tensor() if isinstance(in_plane, MetaTensor) else in_plane
        placed = torch.zeros((annotation.shape[0], *new_shape), dtype=annotation.dtype)
        drawn = torch.zeros_like(placed, dtype=torch.float32)
        if mapping:
            placed[..., list(mapping)] = in_plane[..., list(mapping.values())].to(placed.dtype)
            drawn[..., list(mapping)] = 1.0
        # the reference's metadata keys, so that positives collate with the negatives' filled volumes
        meta = dict(reference.meta)
        meta["affine"] = reference.affine.clone()
        meta["filename_or_obj"] = annotation.meta.get("filename_or_obj", source)
        d[self.annotation_key] = MetaTensor(placed, meta=dict(meta))
        d[self.mask_key] = MetaTensor(drawn, meta=dict(meta))
        d[self.slices_key] = list(mapping)
        return d


class SlicesFromMaskd(MapTransform):
    """Rewrite ``annotated_slices`` from ``annotated_mask`` after a crop or pad along Z shifted them (slices
    cropped away are gone). MONAI's ``ResizeWithPadOrCropd`` moves volumes only, not index lists."""

    def __init__(self, mask_key: str = ANNOTATED_MASK, slices_key: str = schema.ANNOTATED_SLICES) -> None:
        super().__init__(mask_key, allow_missing_keys=True)
        self.mask_key = mask_key
        self.slices_key = slices_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.mask_key in d and self.slices_key in d:
            d[self.slices_key] = foreground_slices(np.asarray(torch.as_tensor(d[self.mask_key]).detach().cpu()))
        return d


def intensity_transform(intensity: Mapping[str, Sequence[float]] | None,
                        key: str = schema.IMAGE) -> MapTransform | None:
    """The intensity step of a profile, to [0, 1] with clipping; ``None`` for none.

    ``{"ct": [low, high]}``: the HU window ``[low, high]`` (``ScaleIntensityRanged``).
    ``{"mr": [lower, upper]}``: the per-volume ``lower``/``upper`` percentiles (``ScaleIntensityRangePercentilesd``;
    MR has no absolute unit).
    """
    if intensity is None:
        return None
    if not isinstance(intensity, Mapping) or len(intensity) != 1 or next(iter(intensity)) not in INTENSITY_KINDS:
        raise ValueError(f"intensity must be null, {{'ct': [low HU, high HU]}} or {{'mr': [low %, high %]}}, "
                         f"got {intensity!r}")
    kind, bounds = next(iter(intensity.items()))
    low, high = (float(b) for b in bounds)
    if not low < high:
        raise ValueError(f"intensity {kind}: the lower bound {low} must be below the upper bound {high}")
    if kind == "ct":
        return ScaleIntensityRanged(key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"intensity mr: percentiles must lie in [0, 100], got {[low, high]}")
    return ScaleIntensityRangePercentilesd(key, lower=low, upper=high, b_min=0.0, b_max=1.0, clip=True)


def preprocessing_transforms(keys: Sequence[str], size: Sequence[int] | str | None = None,
                             orientation: str | None = None, spacing: Sequence[float] | None = None,
                             intensity: Mapping[str, Sequence[float]] | None = None, size_mode: str = "resample",
                             keep_slices: bool = False, loaded: bool = False) -> Compose:
    """The preprocessing chain of DUE items (see the module docstring for the steps and their order).

    Args:
        keys: volume keys to load, ``image`` first (e.g. ``["image", "annotation", "weights"]``).
        size: network input size ``X,Y,Z``; ``None`` keeps each volume's size (then they must share one to
            collate).
        orientation: axis codes to reorient to (``"RAS"``); ``None`` keeps the stored axes.
        spacing: voxel size in mm ``[x, y, z]``; ``None`` keeps the stored spacing.
        intensity: ``{"ct": [low, high]}`` HU window, ``{"mr": [lower, upper]}`` percentiles, or ``None``.
        size_mode: ``"resample"`` (resize to ``size``) or ``"crop_or_pad"`` (centre crop or pad to ``size``,
            voxel size kept).
        keep_slices: keep ``annotated_slices`` (batch size 1 or custom collation).
        loaded: the volumes arrive in memory as channel-less ``(X, Y, Z)`` MetaTensors carrying their affine
            (MONAI Deploy hands the operator the array it loaded), not as file paths: the chain then starts
            with ``EnsureChannelFirstd`` instead of ``LoadImaged``; every other step is the same.
    """
    keys = list(keys)
    if not keys or keys[0] != schema.IMAGE:
        raise ValueError(f"preprocessing: keys must start with {schema.IMAGE!r}, got {keys}")
    unknown = [k for k in keys if k not in schema.VOLUME_KEYS]
    if unknown:
        raise ValueError(f"preprocessing: {unknown} are not volume keys {schema.VOLUME_KEYS}")
    if size_mode not in SIZE_MODES:
        raise ValueError(f"preprocessing: size_mode must be one of {SIZE_MODES}, got {size_mode!r}")
    if spacing is not None:
        spacing = [float(s) for s in spacing]
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"preprocessing: spacing must be three positive voxel sizes in mm, got {spacing}")
    sparse = schema.ANNOTATION in keys
    dense = [k for k in keys if k != schema.ANNOTATION]
    fill_keys = keys[1:]
    if sparse:
        fill_keys.insert(fill_keys.index(schema.ANNOTATION) + 1, ANNOTATED_MASK)

    entry = (EnsureChannelFirstd(keys, channel_dim="no_channel", allow_missing_keys=True) if loaded
             else LoadImaged(keys, ensure_channel_first=True, image_only=True, allow_missing_keys=True))
    transforms: list[Any] = [
        entry,
        EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True),
        EnsureTyped(schema.LABEL, dtype=torch.long, track_meta=False, allow_missing_keys=True),
    ]
    if sparse:
        transforms.append(SparseAnnotationd())
    if orientation is not None:
        # labels spelled out: MONAI warns about a future default (the MetaTensor's "space") otherwise
        transforms.append(Orientationd(dense, axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")),
                                       allow_missing_keys=True))
    if spacing is not None:
        modes = ["nearest" if k in NEAREST_KEYS else "bilinear" for k in dense]
        # float32 out: Spacingd's default float64 would not collate with the float32 volumes it did not touch
        transforms.append(Spacingd(dense, pixdim=spacing, mode=modes, dtype=torch.float32, allow_missing_keys=True))
    if sparse and (orientation is not None or spacing is not None):
        transforms.append(PlaceSparseSlicesd())
    step = intensity_transform(intensity)
    if step is not None:
        transforms.append(step)
    if fill_keys:  # an image-only chain (inference) has nothing to fill
        transforms.append(FillMissingExplanationKeysd(keys=fill_keys, reference_key=schema.IMAGE))
    if size is not None:
        size = parse_size(size)
        if size_mode == "resample":
            transforms.append(ResampleToSized([keys[0], *fill_keys], size))
        else:
            transforms.append(ResizeWithPadOrCropd([keys[0], *fill_keys], size, allow_missing_keys=True))
            if sparse:
                transforms.append(SlicesFromMaskd())
    # Drop what cannot collate: file paths of volumes not loaded (present on some items only) and the per-item
    # list of annotated slices (annotated_mask carries it). empty_slices always: annotated_mask carries it.
    dropped = [k for k in schema.VOLUME_KEYS if k not in keys] + ([] if keep_slices else [schema.ANNOTATED_SLICES])
    transforms.append(DeleteItemsd([*dropped, schema.EMPTY_SLICES]))
    return Compose(transforms)


def cams_on_input_grid(cam: torch.Tensor, image: MetaTensor, transform: Compose,
                       image_key: str = schema.IMAGE) -> list[MetaTensor]:
    """Each item's Grad-CAM, computed on the network's grid, on its input file's own grid.

    ``Invertd`` runs the inverse of every spatial step ``transform`` applied to the image (size, spacing,
    orientation), with linear interpolation (a CAM is a soft map). The result has the input's shape and
    affine; values are the CAM's, interpolated (still in [0, 1]).

    Args:
        cam: ``(B, X, Y, Z)`` CAMs of a batch.
        image: the batch's preprocessed image ``(B, 1, X, Y, Z)``, carrying its applied operations.
        transform: the chain that produced ``image``.

    Returns:
        one ``(X0, Y0, Z0)`` MetaTensor per item, with the input's affine.
    """
    if not isinstance(image, MetaTensor):
        raise ValueError("cams_on_input_grid: the image must be the preprocessed MetaTensor batch (its applied "
                         "operations say how to go back to the input grid)")
    items = decollate_batch(image.detach().cpu())
    return [cam_on_input_grid(item_cam, item, transform, image_key)
            for item, item_cam in zip(items, cam.detach().float().cpu(), strict=True)]


def cam_on_input_grid(cam: torch.Tensor, image: MetaTensor, transform: Compose,
                      image_key: str = schema.IMAGE) -> MetaTensor:
    """One item's Grad-CAM ``(X, Y, Z)`` on its input's grid: :func:`cams_on_input_grid` for an unbatched
    preprocessed ``image`` ``(1, X, Y, Z)`` (what MONAI Deploy's bundle operator keeps of its input)."""
    if not isinstance(image, MetaTensor):
        raise ValueError("cam_on_input_grid: the image must be the preprocessed MetaTensor (its applied "
                         "operations say how to go back to the input grid)")
    cam = cam.detach().float().cpu()
    if not any(isinstance(t, InvertibleTransform) for t in transform.flatten().transforms):
        # nothing moved the image off its input grid (and MONAI would warn that there is nothing to invert)
        return MetaTensor(cam, affine=image.affine)
    inverter = Invertd("cam", transform=transform, orig_keys=image_key, nearest_interp=False)
    # a MetaTensor: Invertd looks for the plain-tensor trace key otherwise
    return inverter({image_key: image.detach().cpu(), "cam": MetaTensor(cam[None])})["cam"][0]


__all__ = [
    "INTENSITY_KINDS",
    "SIZE_MODES",
    "PlaceSparseSlicesd",
    "SlicesFromMaskd",
    "cam_on_input_grid",
    "cams_on_input_grid",
    "intensity_transform",
    "preprocessing_transforms",
]
