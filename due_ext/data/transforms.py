"""MONAI dictionary transforms for DUE items: validation, the sparse-annotation model, filling and resizing.

All arrays are channel-first ``(C, X, Y, Z)`` (see :mod:`due_ext.data.axes`); annotated slices index Z, the
last axis. Constructor arguments are JSON-friendly so that bundle configs can build every transform.

Standard pipeline (:func:`load_transforms`, the chain of :mod:`due_ext.data.preprocessing`)::

    LoadImaged -> EnsureTyped(float32) -> SparseAnnotationd [-> orientation, spacing, intensity]
               -> FillMissingExplanationKeysd [-> ResampleToSized] -> drop annotated_slices

After it every item holds the same keys and shapes, so positives and negatives collate into one batch; the
annotated slices are carried by ``annotated_mask`` (``due_ext.data.axes.foreground_slices`` recovers them).
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import Compose, InvertibleTransform, MapTransform, Resize

from due_ext.data import schema
from due_ext.data.axes import parse_size
from due_ext.data.validate import DatalistError, assert_valid_item

#: Key written by :class:`SparseAnnotationd`: 1 on annotated Z slices, 0 elsewhere.
ANNOTATED_MASK = "annotated_mask"
#: Key written by :class:`FillMissingExplanationKeysd`: 1.0 when the item came with an annotation.
HAS_ANNOTATION = "has_annotation"

#: Keys filled by :class:`FillMissingExplanationKeysd` by default.
DEFAULT_FILL_KEYS = (schema.ANNOTATION, ANNOTATED_MASK, schema.INTERPOLATION, schema.WEIGHTS, schema.MASK)
#: Fill value per key when missing; keys not listed get 0. Missing weights mean "no uncertainty
#: information", i.e. the unweighted loss (w = 1, the baseline_plus setting).
DEFAULT_FILL_VALUES = {schema.WEIGHTS: 1.0, schema.DIFFUSION_WEIGHTS: 1.0}
#: Keys holding binary masks: resized with nearest-neighbour interpolation.
DEFAULT_MASK_KEYS = (schema.ANNOTATION, ANNOTATED_MASK, schema.MASK)
#: Keys holding soft maps: resized with trilinear interpolation.
DEFAULT_SOFT_KEYS = (schema.INTERPOLATION, schema.WEIGHTS, schema.DIFFUSION_WEIGHTS, schema.VARIANCE)
#: Keys defined only on annotated slices: resampled slice by slice so they stay on the remapped slices.
DEFAULT_SPARSE_KEYS = (schema.ANNOTATION, ANNOTATED_MASK)


def _source_name(value: Any) -> str:
    """The file a loaded tensor came from, for error messages."""
    meta = getattr(value, "meta", None) or {}
    return str(meta.get("filename_or_obj", "<in memory>"))


class ValidateItemd(MapTransform):
    """Check a datalist item with :func:`~due_ext.data.validate.assert_valid_item` before loading it.

    Raises :class:`~due_ext.data.validate.DatalistError` listing every problem, each naming the file.

    Args:
        keys: volume keys whose files are checked (other volume keys of the item are ignored); ``label`` and
            ``annotated_slices`` are always checked.
        dataset_dir: folder that relative paths are resolved against (``None``: the working directory; items
            from ``monai.data.load_decathlon_datalist`` are absolute already).
        allow_missing_keys: do not complain when one of ``keys`` is absent (negatives lack annotations).
    """

    def __init__(self, keys: KeysCollection = schema.VOLUME_KEYS, dataset_dir: str | None = None,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dataset_dir = dataset_dir

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            if not isinstance(d[key], (str, os.PathLike)):
                raise DatalistError(f"ValidateItemd: {key!r} is a {type(d[key]).__name__}, not a file path; "
                                    "put ValidateItemd before LoadImaged")
        checked = {k: v for k, v in d.items() if k in self.keys or k not in schema.VOLUME_KEYS}
        assert_valid_item(checked, self.dataset_dir)
        return d


class SparseAnnotationd(MapTransform):
    """Keep only the annotated Z slices of a loaded annotation and write the annotated-slice mask.

    Slices not listed in ``annotated_slices`` carry no information, whatever the file holds there, so they
    are zeroed. ``annotated_mask`` (same shape as the annotation, float) is 1 on annotated slices and 0
    elsewhere. Items without an annotation (negatives) pass through unchanged.

    Args:
        annotation_key: key of the channel-first annotation ``(C, X, Y, Z)``.
        slices_key: key of the list of annotated Z indices.
        output_key: key written with the annotated-slice mask.
        allow_missing_keys: pass items without an annotation through (default, for negatives).
    """

    def __init__(self, annotation_key: str = schema.ANNOTATION, slices_key: str = schema.ANNOTATED_SLICES,
                 output_key: str = ANNOTATED_MASK, allow_missing_keys: bool = True) -> None:
        super().__init__(annotation_key, allow_missing_keys)
        self.slices_key = slices_key
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            annotation = d[key]
            source = _source_name(annotation)
            if not isinstance(annotation, torch.Tensor) or annotation.ndim != 4:
                raise DatalistError(f"{source}: {key} must be a loaded channel-first (C, X, Y, Z) tensor, got "
                                    f"{getattr(annotation, 'shape', type(annotation).__name__)}")
            if self.slices_key not in d:
                raise DatalistError(f"{source}: {key} present but {self.slices_key!r} missing")
            depth = annotation.shape[-1]
            slices = [int(s) for s in d[self.slices_key]]
            outside = [s for s in slices if not 0 <= s < depth]
            if outside:
                raise DatalistError(f"{source}: {self.slices_key} {outside} outside [0, {depth})")
            # zeros_like keeps the MetaTensor's metadata (affine, file name) on the new mask.
            annotated = torch.zeros_like(annotation, dtype=torch.float32)
            annotated[..., slices] = 1.0
            d[key] = annotation * annotated.to(annotation.dtype)
            d[self.output_key] = annotated
        return d


class FillMissingExplanationKeysd(MapTransform):
    """Insert constant volumes for missing explanation keys so that positives and negatives collate.

    A missing key gets a ``(1, *spatial)`` volume of the reference image's spatial shape, filled with
    ``fill_values[key]`` (default: ones for ``weights``, i.e. unweighted; zeros otherwise). The filled
    values never reach a loss for negatives (their explanation loss is off); ``has_annotation`` (float
    tensor, 1.0 or 0.0) records whether the item came with an annotation so losses can mask the batch.

    Args:
        keys: keys to fill when missing.
        reference_key: loaded channel-first image whose spatial shape and metadata the filled volumes take.
        annotation_key: key whose presence sets ``has_annotation``.
        fill_values: fill value per key; unlisted keys get 0. ``None``: :data:`DEFAULT_FILL_VALUES`.
    """

    def __init__(self, keys: KeysCollection = DEFAULT_FILL_KEYS, reference_key: str = schema.IMAGE,
                 annotation_key: str = schema.ANNOTATION, fill_values: dict[str, float] | None = None) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.reference_key = reference_key
        self.annotation_key = annotation_key
        self.fill_values = dict(DEFAULT_FILL_VALUES if fill_values is None else fill_values)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.reference_key not in d:
            raise KeyError(f"FillMissingExplanationKeysd: reference key {self.reference_key!r} missing from the item "
                           f"(keys: {sorted(map(str, d))})")
        reference = d[self.reference_key]
        if not isinstance(reference, torch.Tensor) or reference.ndim != 4:
            raise ValueError(f"{_source_name(reference)}: {self.reference_key} must be a loaded channel-first "
                             f"(C, X, Y, Z) tensor, got {getattr(reference, 'shape', type(reference).__name__)}")
        d[HAS_ANNOTATION] = torch.tensor(1.0 if self.annotation_key in d else 0.0)
        for key in self.keys:
            if key in d:
                continue
            filled = torch.full((1, *reference.shape[1:]), float(self.fill_values.get(key, 0.0)),
                                dtype=torch.float32)
            if isinstance(reference, MetaTensor):
                # Same metadata keys as loaded volumes, so MetaTensor batches collate.
                meta = dict(reference.meta)
                meta["affine"] = reference.affine.clone()
                filled = MetaTensor(filled, meta=meta)
            d[key] = filled
        return d


def nearest_slices(positions: Mapping[int, float], new_depth: int) -> dict[int, int]:
    """Put source slices on the nearest slice of a new Z grid, one source per new slice.

    The one rule for moving annotated slices to another grid (resizing: :func:`remap_slices`; orientation and
    spacing: :class:`due_ext.data.preprocessing.PlaceSparseSlicesd`).

    Args:
        positions: ``{source index: its centre in the new grid's continuous Z index}`` (voxel centres at
            integers).
        new_depth: number of slices of the new grid; positions outside it go to the nearest end slice.

    Returns:
        ``{new index: source index}`` sorted by new index. When several sources land on one new slice, the one
        nearest to its centre wins (ties: the lower source index).
    """
    if new_depth < 1:
        raise ValueError(f"new depth must be positive, got {new_depth}")
    chosen: dict[int, int] = {}
    for source in sorted(positions):
        position = float(positions[source])
        target = min(new_depth - 1, max(0, math.floor(position + 0.5)))
        if target not in chosen or abs(position - target) < abs(positions[chosen[target]] - target):
            chosen[target] = source
    return dict(sorted(chosen.items()))


def remap_slices(slices: Sequence[int], depth: int, new_depth: int) -> dict[int, int]:
    """Map annotated Z indices of a ``depth``-slice grid to a ``new_depth``-slice grid.

    Each source slice goes to the new slice whose extent holds its centre (voxel centres at ``z + 0.5``,
    field of view preserved, as in ``align_corners=False`` resizing), i.e. the nearest new slice
    (:func:`nearest_slices`). When several source slices land on the same new slice (downsampling), the one
    whose centre is closest to the new slice's centre wins (ties: the lower index), so the result is
    deduplicated.

    Returns:
        ``{new_index: source_index}``, sorted by new index.
    """
    if depth < 1 or new_depth < 1:
        raise ValueError(f"depths must be positive, got {depth} -> {new_depth}")
    scale = new_depth / depth
    positions: dict[int, float] = {}
    for source in {int(s) for s in slices}:
        if not 0 <= source < depth:
            raise ValueError(f"annotated slice {source} outside [0, {depth})")
        positions[source] = (source + 0.5) * scale - 0.5  # its centre in the new grid's voxel index
    return nearest_slices(positions, new_depth)


class ResampleToSized(MapTransform, InvertibleTransform):
    """Resize every volume key to ``size`` and remap ``annotated_slices`` to the new Z grid.

    Interpolation by kind: the image with ``image_mode`` (trilinear by default; ``"area"`` averages when
    downsampling); binary masks with nearest neighbour (``nearest-exact``, no half-voxel shift); soft maps
    (interpolation, weights, variance) trilinear. Keys defined only on annotated slices (``sparse_keys``:
    the annotation and ``annotated_mask``) are resized in-plane with nearest neighbour and each annotated
    slice is copied to its remapped Z index (:func:`remap_slices`), so annotation, ``annotated_mask`` and
    ``annotated_slices`` stay consistent. A tiny lesion may lose its foreground when shrunk in-plane.
    Without ``annotated_slices`` in the item, sparse keys are resized as masks.

    Invertible (``Invertd``), so that a map computed on the resized grid goes back to the input's grid: the
    inverse is MONAI ``Resize``'s, with the interpolation mode the key was resized with.

    Args:
        keys: volume keys to resize; each must be ``image_key`` or in ``mask_keys`` or ``soft_keys``.
        size: target ``X,Y,Z`` (3 ints or a string ``"X,Y,Z"``).
        image_key: key of the image.
        mask_keys: keys resized with nearest neighbour.
        soft_keys: keys resized trilinearly.
        sparse_keys: mask keys that live on annotated slices only.
        slices_key: key of the annotated Z indices, rewritten for the new grid.
        image_mode: interpolation mode of the image (``torch.nn.functional.interpolate`` names).
        allow_missing_keys: skip keys absent from the item (e.g. a negative's annotation).
    """

    def __init__(self, keys: KeysCollection, size: Sequence[int] | str, image_key: str = schema.IMAGE,
                 mask_keys: Sequence[str] = DEFAULT_MASK_KEYS, soft_keys: Sequence[str] = DEFAULT_SOFT_KEYS,
                 sparse_keys: Sequence[str] = DEFAULT_SPARSE_KEYS, slices_key: str = schema.ANNOTATED_SLICES,
                 image_mode: str = "trilinear", allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.size = parse_size(size)
        self.image_key = image_key
        self.mask_keys = tuple(mask_keys)
        self.soft_keys = tuple(soft_keys)
        self.sparse_keys = tuple(sparse_keys)
        self.slices_key = slices_key
        unknown = [k for k in self.keys if k != image_key and k not in self.mask_keys and k not in self.soft_keys]
        if unknown:
            raise ValueError(f"ResampleToSized: keys {unknown} are neither the image ({image_key!r}) nor in "
                             f"mask_keys {self.mask_keys} or soft_keys {self.soft_keys}; say how to interpolate them")
        self._resizers = {
            "image": Resize(self.size, mode=image_mode),
            "mask": Resize(self.size, mode="nearest-exact"),
            "soft": Resize(self.size, mode="trilinear"),
        }

    def _kind(self, key: Hashable) -> str:
        if key == self.image_key:
            return "image"
        return "mask" if key in self.mask_keys else "soft"

    def _resize_sparse(self, volume: torch.Tensor, mapping: dict[int, int]) -> torch.Tensor:
        """Nearest in-plane resize, then each annotated source slice copied to its new Z index."""
        out = self._resizers["mask"](volume)  # right shape, dtype and updated metadata; content replaced
        x, y, _ = self.size
        plain = volume.as_tensor() if isinstance(volume, MetaTensor) else volume
        in_plane = F.interpolate(plain[None].float(), size=(x, y, plain.shape[-1]), mode="nearest-exact")[0]
        values = out.as_tensor() if isinstance(out, MetaTensor) else out
        values.zero_()
        if mapping:
            values[..., list(mapping)] = in_plane[..., list(mapping.values())].to(values.dtype)
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        mapping = None
        depths = {d[k].shape[-1] for k in self.key_iterator(d) if isinstance(d[k], torch.Tensor)}
        if self.slices_key in d and depths:
            if len(depths) != 1:
                raise ValueError(f"ResampleToSized: volumes of one item have different Z sizes {sorted(depths)}")
            mapping = remap_slices(d[self.slices_key], depths.pop(), self.size[2])
        for key in self.key_iterator(d):
            volume = d[key]
            if not isinstance(volume, torch.Tensor) or volume.ndim != 4:
                raise ValueError(f"{_source_name(volume)}: {key} must be a channel-first (C, X, Y, Z) tensor to "
                                 f"resize, got {getattr(volume, 'shape', type(volume).__name__)}")
            if mapping is not None and key in self.sparse_keys:
                d[key] = self._resize_sparse(volume, mapping)
            else:
                d[key] = self._resizers[self._kind(key)](volume)
        if mapping is not None:
            d[self.slices_key] = list(mapping)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._resizers[self._kind(key)].inverse(d[key])
        return d


def load_transforms(keys: Sequence[str], size: Sequence[int] | str | None = None, keep_slices: bool = False,
                    **profile: Any) -> Compose:
    """The standard loading pipeline of DUE items: :func:`due_ext.data.preprocessing.preprocessing_transforms`.

    ``LoadImaged`` (channel first, missing keys allowed, MetaTensor out) -> ``EnsureTyped`` float32 volumes
    and int64 ``label`` -> :class:`SparseAnnotationd` -> the profile's orientation, spacing and intensity
    steps (``profile``: ``orientation``, ``spacing``, ``intensity``, ``size_mode``; all off by default) ->
    :class:`FillMissingExplanationKeysd` -> :class:`ResampleToSized` when ``size`` is given -> drop the paths
    of volume keys not loaded and ``annotated_slices`` (it has a different length per item and cannot
    collate; ``annotated_mask`` carries it) unless ``keep_slices``.

    Args:
        keys: volume keys to load (``image`` first; e.g. ``["image", "annotation", "weights"]``).
        size: target ``X,Y,Z`` or ``None`` to keep the stored size (then all volumes must share a size to
            collate).
        keep_slices: keep ``annotated_slices`` (for batch size 1 or custom collation).
    """
    # imported here: the chain module builds on the transforms of this one
    from due_ext.data.preprocessing import preprocessing_transforms

    return preprocessing_transforms(keys, size=size, keep_slices=keep_slices, **profile)


__all__ = [
    "ANNOTATED_MASK",
    "DEFAULT_FILL_KEYS",
    "DEFAULT_FILL_VALUES",
    "HAS_ANNOTATION",
    "FillMissingExplanationKeysd",
    "ResampleToSized",
    "SparseAnnotationd",
    "ValidateItemd",
    "load_transforms",
    "nearest_slices",
    "remap_slices",
]
