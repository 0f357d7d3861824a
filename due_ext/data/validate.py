"""Validation of datalists and their items: every file, grid, label and annotated slice.

Anything that reads a DUE datalist checks it first (``python -m due_ext data check`` runs
:func:`check_datalist`; pipelines use :func:`assert_valid_item` through
:class:`due_ext.data.transforms.ValidateItemd`). Checking never stops at the first problem: every problem of
every item is reported, each naming the datalist section and index, the file and what is wrong, e.g.::

    training[3] (img_003.nii.gz): annotation ann_003.nii.gz: shape (32, 32, 15) != image shape (32, 32, 16)

Rules (see :mod:`due_ext.data.schema` for the keys):

- ``image`` is required; every volume key present (:data:`~due_ext.data.schema.VOLUME_KEYS`) must name a
  readable NIfTI file holding a finite 3D ``(X, Y, Z)`` array. A trailing singleton 4th dimension
  ``(X, Y, Z, 1)`` is accepted and squeezed (MONAI's ``EnsureChannelFirstd`` turns it into the channel); the
  report lists it as a note, not a problem.
- ``annotation``, ``mask``, ``interpolation``, ``variance`` and ``weights`` share the image's shape and affine
  (``np.allclose``, ``atol=1e-4``).
- ``label`` is 0 or 1: ints, or floats equal to 0.0/1.0. JSON booleans are rejected: the Decathlon format
  uses numbers, and a boolean usually means a column was mixed up (bool tensors do not feed cross-entropy).
- A positive (label 1) needs ``annotation`` and a non-empty ``annotated_slices``: a sorted list of unique ints
  in ``[0, Z)``, each slice holding foreground in the annotation. Negatives may carry them (checked the same
  way, an empty list allowed); their annotation files, if any, are checked like a positive's.
- ``empty_slices`` (optional) lists annotated slices that were looked at and left empty: ints, each in
  ``annotated_slices`` and holding no foreground; they are exempt from the foreground rule, and a
  positive still needs one annotated slice that is not among them.
- ``annotation`` and ``mask`` are binary (values 0/1); ``interpolation`` and ``weights`` lie in ``[0, 1]``;
  ``variance`` is ``>= 0``.

Each volume of an item is read once (datasets can be large); only the image's grid and the annotation are
kept while the other volumes are checked.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from due_ext.data import schema
from due_ext.data.datalist import SECTIONS, read_datalist
from due_ext.data.nifti import NiftiError, read_nifti

#: Sections checked when present; they must be lists. ``real_tumours`` is the lung-CT sanity set.
KNOWN_SECTIONS = (*SECTIONS, "real_tumours")
#: Tolerance of the affine comparison between an item's volumes.
AFFINE_ATOL = 1e-4
#: Volumes whose values must be exactly 0 or 1.
BINARY_KEYS = (schema.ANNOTATION, schema.MASK)
#: Volumes whose values must lie in [0, 1].
UNIT_RANGE_KEYS = (schema.INTERPOLATION, schema.WEIGHTS, schema.DIFFUSION_WEIGHTS)
#: Volumes whose values must be non-negative.
NON_NEGATIVE_KEYS = (schema.VARIANCE,)


class DatalistError(ValueError):
    """A datalist or one of its items is invalid; the message lists every problem, each naming the file."""


@dataclass
class DatalistReport:
    """What :func:`check_datalist` found: ``problems`` (empty when valid), ``notes`` and the dataset counts."""

    path: Path
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: section -> Counter with keys "items", "positives", "negatives".
    counts: dict[str, Counter] = field(default_factory=dict)
    shapes: Counter = field(default_factory=Counter)
    annotated_slices: int = 0

    @property
    def valid(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def summary(self) -> str:
        """One line: items per section (positives/negatives), volume shape(s) and annotated slices."""
        sections = ", ".join(
            f"{name} {c['items']} ({c['positives']} pos, {c['negatives']} neg)" for name, c in self.counts.items()
        )
        shapes = ", ".join("x".join(str(s) for s in shape) + (f" ({n})" if len(self.shapes) > 1 else "")
                           for shape, n in self.shapes.most_common())
        positives = sum(c["positives"] for c in self.counts.values())
        state = "valid" if self.valid else f"{len(self.problems)} problem(s)"
        return (f"{self.path}: {state}; {sections or 'no sections'}; volume shape(s) {shapes or 'none'}; "
                f"{self.annotated_slices} annotated slices on {positives} positives"
                + (f"; {len(self.notes)} note(s)" if self.notes else ""))


@dataclass
class _ItemFindings:
    """Problems and facts gathered while checking one item."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    label: int | None = None
    shape: tuple[int, ...] | None = None
    annotated_slices: int = 0


def _resolve(reference: str, dataset_dir: Path | None) -> Path:
    path = Path(reference)
    if path.is_absolute() or dataset_dir is None:
        return path
    return dataset_dir / path


def _check_label(item: dict[str, Any], found: _ItemFindings) -> None:
    if schema.LABEL not in item:
        found.problems.append("label missing (expected 0 or 1)")
        return
    label = item[schema.LABEL]
    # bool is a subclass of int: reject it explicitly (see the module docstring).
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label not in (0, 1):
        found.problems.append(f"label {label!r} is not 0 or 1")
        return
    found.label = int(label)


def _check_slice_list(slices: Any, found: _ItemFindings) -> list[int] | None:
    """Type, sortedness and duplicates of ``annotated_slices``; returns the ints when usable."""
    if not isinstance(slices, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in slices):
        found.problems.append(f"annotated_slices {slices!r} is not a list of ints")
        return None
    duplicates = sorted(s for s, n in Counter(slices).items() if n > 1)
    if duplicates:
        found.problems.append(f"annotated_slices has duplicates {duplicates}")
    elif slices != sorted(slices):
        found.problems.append(f"annotated_slices {slices} is not sorted")
    return slices


def _load_volume(key: str, reference: Any, dataset_dir: Path | None,
                 found: _ItemFindings) -> tuple[np.ndarray, np.ndarray] | None:
    """Read one volume, check it is finite and 3D (squeezing a trailing singleton); None on a problem."""
    if not isinstance(reference, (str, os.PathLike)) or not str(reference):
        found.problems.append(f"{key} {reference!r} is not a file path")
        return None
    path = _resolve(str(reference), dataset_dir)
    try:
        array, affine = read_nifti(path, check_finite=False)
    except NiftiError as err:
        found.problems.append(f"{key}: {err}")
        return None
    if array.ndim == 4 and array.shape[3] == 1:
        found.notes.append(f"{key} {path}: shape {array.shape} has a trailing singleton dimension; "
                           "read as 3D (X, Y, Z)")
        array = array[..., 0]
    if array.ndim != 3:
        found.problems.append(f"{key} {path}: shape {array.shape} is not 3D (X, Y, Z)")
        return None
    if not np.issubdtype(array.dtype, np.number):
        found.problems.append(f"{key} {path}: dtype {array.dtype} is not numeric")
        return None
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        found.problems.append(f"{key} {path}: {bad} NaN or Inf value(s)")
        return None
    return array, affine


def _check_values(key: str, path: Path, array: np.ndarray, found: _ItemFindings) -> None:
    if key in BINARY_KEYS:
        offending = (array != 0) & (array != 1)
        if offending.any():
            extra = np.unique(array[offending])
            shown = ", ".join(f"{v:g}" for v in extra[:5]) + (", ..." if extra.size > 5 else "")
            found.problems.append(f"{key} {path}: not binary (values {shown} besides 0/1)")
    elif key in UNIT_RANGE_KEYS:
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            found.problems.append(f"{key} {path}: values in [{low:g}, {high:g}], outside [0, 1]")
    elif key in NON_NEGATIVE_KEYS:
        low = float(array.min())
        if low < 0:
            found.problems.append(f"{key} {path}: negative values (min {low:g})")


def _check_annotated_slices(slices: list[int], annotation: np.ndarray | None, annotation_path: Path | None,
                            depth: int | None, found: _ItemFindings, declared_empty: frozenset[int] = frozenset()
                            ) -> None:
    """Range of the slice indices, foreground on each annotated slice, none on those ``declared_empty``."""
    if depth is None:
        return  # the image could not be read: its problem is already reported
    outside = [s for s in slices if not 0 <= s < depth]
    if outside:
        found.problems.append(f"annotated_slices {outside} outside [0, {depth}) (image has Z = {depth} slices)")
    if annotation is None:
        return
    inside = sorted({s for s in slices if 0 <= s < depth})
    empty = [s for s in inside if not np.any(annotation[..., s]) and s not in declared_empty]
    if empty:
        found.problems.append(f"annotation {annotation_path}: annotated slice(s) {empty} hold no foreground")
    drawn = [s for s in sorted(declared_empty & set(inside)) if np.any(annotation[..., s])]
    if drawn:
        found.problems.append(f"annotation {annotation_path}: slice(s) {drawn} listed in empty_slices hold "
                              "foreground")
    found.annotated_slices = len(inside) - len(empty) - len(drawn)


def _check_item(item: Any, dataset_dir: Path | None) -> _ItemFindings:
    found = _ItemFindings()
    if not isinstance(item, dict):
        found.problems.append(f"item is a {type(item).__name__}, not an object")
        return found
    _check_label(item, found)

    slices = None
    if schema.ANNOTATED_SLICES in item:
        slices = _check_slice_list(item[schema.ANNOTATED_SLICES], found)
    if found.label == 1:
        if schema.ANNOTATION not in item:
            found.problems.append("positive (label 1) without annotation")
        if schema.ANNOTATED_SLICES not in item:
            found.problems.append("positive (label 1) without annotated_slices")
        elif slices == []:
            found.problems.append("positive (label 1) with empty annotated_slices")
    declared_empty: frozenset[int] = frozenset()
    if schema.EMPTY_SLICES in item:
        declared = item[schema.EMPTY_SLICES]
        if not isinstance(declared, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in declared):
            found.problems.append(f"empty_slices {declared!r} is not a list of ints")
        else:
            declared_empty = frozenset(declared)
            stray = sorted(declared_empty - set(slices or []))
            if stray:
                found.problems.append(f"empty_slices {stray} not in annotated_slices")
            elif found.label == 1 and slices and declared_empty >= set(slices):
                found.problems.append("positive (label 1) whose annotated slices are all listed in empty_slices")

    # The image defines the grid. Other volumes are read one at a time, checked against it and dropped,
    # except the annotation, kept for the slice check.
    image_shape = image_affine = None
    if schema.IMAGE not in item:
        found.problems.append("image key missing")
    else:
        loaded = _load_volume(schema.IMAGE, item[schema.IMAGE], dataset_dir, found)
        if loaded is not None:
            image_shape, image_affine = loaded[0].shape, loaded[1]
            found.shape = image_shape
            del loaded

    annotation = annotation_path = None
    for key in schema.GRID_KEYS:
        if key not in item:
            continue
        loaded = _load_volume(key, item[key], dataset_dir, found)
        if loaded is None:
            continue
        array, affine = loaded
        path = _resolve(str(item[key]), dataset_dir)
        _check_values(key, path, array, found)
        if image_shape is not None:
            if array.shape != image_shape:
                found.problems.append(f"{key} {path}: shape {array.shape} != image shape {image_shape}")
                continue
            if not np.allclose(affine, image_affine, atol=AFFINE_ATOL):
                found.problems.append(f"{key} {path}: affine differs from the image's "
                                      f"(max abs difference {np.abs(affine - image_affine).max():.3g})")
        if key == schema.ANNOTATION:
            annotation, annotation_path = array, path

    if slices is not None:
        depth = image_shape[-1] if image_shape is not None else None
        _check_annotated_slices(slices, annotation, annotation_path, depth, found, declared_empty)
    return found


def _item_name(item: Any) -> str:
    if isinstance(item, dict) and isinstance(item.get(schema.IMAGE), (str, os.PathLike)):
        return Path(item[schema.IMAGE]).name
    return "no image"


def validate_item(item: dict[str, Any], dataset_dir: str | os.PathLike | None = None,
                  where: str = "item") -> list[str]:
    """Every problem of one datalist item, each as ``"{where} ({image file name}): {problem}"``.

    Args:
        item: a datalist item (see :mod:`due_ext.data.schema`).
        dataset_dir: folder that relative paths are resolved against; ``None`` leaves them relative to the
            working directory (items from ``monai.data.load_decathlon_datalist`` are already absolute).
        where: how the item is named in the messages, e.g. ``"training[3]"``.

    Returns:
        The problems; an empty list when the item is valid.
    """
    folder = None if dataset_dir is None else Path(dataset_dir)
    found = _check_item(item, folder)
    return [f"{where} ({_item_name(item)}): {problem}" for problem in found.problems]


def assert_valid_item(item: dict[str, Any], dataset_dir: str | os.PathLike | None = None,
                      where: str = "item") -> None:
    """Raise :class:`DatalistError` listing every problem of ``item`` (one per line); return if valid."""
    problems = validate_item(item, dataset_dir, where=where)
    if problems:
        raise DatalistError(f"{len(problems)} problem(s):\n" + "\n".join(problems))


def check_datalist(datalist_path: str | os.PathLike, dataset_dir: str | os.PathLike | None = None
                   ) -> DatalistReport:
    """Check a whole datalist JSON and every item in it; never raises for invalid content.

    Args:
        datalist_path: path of the datalist JSON.
        dataset_dir: folder that relative paths are resolved against (default: the datalist's folder).

    Returns:
        A :class:`DatalistReport`; ``report.problems`` is empty when everything is valid.
    """
    path = Path(datalist_path)
    report = DatalistReport(path=path)
    try:
        datalist = read_datalist(path)
    except (FileNotFoundError, ValueError) as err:
        report.problems.append(str(err))
        return report
    folder = Path(dataset_dir) if dataset_dir is not None else path.parent

    # Known sections must be lists; any other list-valued key is treated as a section too, other keys
    # (name, description, numTraining, ...) are Decathlon metadata.
    sections = [name for name in KNOWN_SECTIONS if name in datalist]
    sections += [name for name, value in datalist.items() if name not in KNOWN_SECTIONS and isinstance(value, list)]
    for name in sections:
        items = datalist[name]
        if not isinstance(items, list):
            report.problems.append(f"{path}: section {name!r} is a {type(items).__name__}, not a list of items")
            continue
        counts = report.counts.setdefault(name, Counter(items=0, positives=0, negatives=0))
        for index, item in enumerate(items):
            where = f"{name}[{index}]"
            found = _check_item(item, folder)
            prefix = f"{where} ({_item_name(item)})"
            report.problems.extend(f"{prefix}: {problem}" for problem in found.problems)
            report.notes.extend(f"{prefix}: {note}" for note in found.notes)
            counts["items"] += 1
            if found.label is not None:
                counts["positives" if found.label == 1 else "negatives"] += 1
            if found.shape is not None:
                report.shapes[found.shape] += 1
            report.annotated_slices += found.annotated_slices
    if not report.problems and not any(c["items"] for c in report.counts.values()):
        report.problems.append(f"{path}: no items in any section ({', '.join(SECTIONS)})")
    return report


__all__ = [
    "AFFINE_ATOL",
    "KNOWN_SECTIONS",
    "DatalistError",
    "DatalistReport",
    "assert_valid_item",
    "check_datalist",
    "validate_item",
]
