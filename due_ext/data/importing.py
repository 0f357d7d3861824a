"""Import a folder of scans and sparse drawings as a DUE datalist (``python -m due_ext data import``).

Steps, all checks before anything is written:

1. **Pair** image and label files by case id: the file name without its format's extension
   (``case_7.nii.gz``, ``case_7.seg.nrrd`` -> ``case_7``), a DICOM series folder by its name; a label name may
   end with ``label_suffix`` (``case_7_seg.nii.gz`` with ``label_suffix="_seg"``).
2. **Read** both (:mod:`due_ext.data.readers`) and check them: 3D, same grid (shape and affine), label values
   in {0, 1} (3D Slicer segments are merged first), at least one drawn slice.
3. **Annotated slices** are the axial slices (Z, the last axis; :mod:`due_ext.data.axes`) that hold a drawing,
   plus the slices listed for the case in ``empty_slices`` (looked at and left empty: annotated, no
   foreground). The latter are also written as the item's ``empty_slices``.
4. **Label** of a case: the ``label`` column of ``labels_csv`` (an empty cell: unlabelled, left out), else 1
   when the case has a drawing and 0 when it has no label file.
5. **Split** by patient (``patient`` column of the CSV, else ``patient_regex`` on the case id, else one
   patient per case), seeded, stratified by whether a patient has a positive case.
6. **Write**: NIfTI inputs are referenced where they are; other formats (NRRD, DICOM) and merged Slicer
   segments are written as NIfTI copies into ``<datalist stem>_nifti/`` beside the datalist, because the rest
   of DUE reads NIfTI (:mod:`due_ext.data.nifti`, ``LoadImaged`` with nibabel). Paths are relative to the
   datalist's folder. Copies are staged in a temporary folder, every item is checked with
   :func:`~due_ext.data.validate.validate_item`, and only then are the folder and the datalist moved into
   place. Any problem: nothing is written, and :class:`DataImportError` lists every problem, each naming the
   file.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from due_ext.data import schema
from due_ext.data.axes import foreground_slices
from due_ext.data.datalist import SECTIONS, read_datalist, write_datalist
from due_ext.data.nifti import write_nifti
from due_ext.data.readers import (
    Volume,
    VolumeReadError,
    case_stem,
    read_dicom_seg,
    read_volume,
    segment_mask,
    volume_format,
)
from due_ext.data.validate import AFFINE_ATOL, validate_item

#: Default training/validation/test fractions.
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


class DataImportError(ValueError):
    """The inputs cannot be imported; ``problems`` lists every problem found, each naming the file."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__(f"{len(self.problems)} problem(s):\n" + "\n".join(self.problems))


@dataclass
class _Case:
    """What the import knows about one case once its files are read and checked."""

    case: str
    image: Path
    label_file: Path | None = None
    label: int | None = None
    patient: str | None = None
    annotated_slices: list[int] = field(default_factory=list)
    empty_slices: list[int] = field(default_factory=list)
    has_drawing: bool = False
    #: The image's RAS affine, given to the NIfTI copy of a drawing.
    affine: np.ndarray | None = None
    #: Path of the drawing's NIfTI copy in the staging folder, when the drawing is not a NIfTI file.
    staged_annotation: Path | None = None


@dataclass
class ImportSummary:
    """What :func:`import_dataset` wrote."""

    datalist: Path
    counts: dict[str, Counter]
    converted: int
    unlabelled: list[str]

    def __str__(self) -> str:
        sections = ", ".join(f"{name} {c['items']} ({c['positives']} pos, {c['negatives']} neg)"
                             for name, c in self.counts.items())
        text = f"{self.datalist}: {sections}; {self.converted} volume(s) converted to NIfTI"
        if self.unlabelled:
            text += f"; {len(self.unlabelled)} unlabelled case(s) left out: {', '.join(self.unlabelled)}"
        return text


def _listing(folder: Path, role: str, problems: list[str]) -> list[Path]:
    """Volume entries of ``folder`` (hidden files skipped); unknown files are problems."""
    if not folder.is_dir():
        problems.append(f"{folder}: {role} folder not found")
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if volume_format(path) is None:
            problems.append(f"{path}: not a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seg.nrrd) or DICOM file, nor a "
                            "DICOM series folder")
            continue
        entries.append(path)
    return entries


def _by_case(paths: list[Path], suffix: str, role: str, problems: list[str],
             duplicates: set[str] | None = None) -> dict[str, Path]:
    """Case id -> file; duplicate case ids (added to ``duplicates``) and label names without ``suffix`` are
    problems."""
    found: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        stem = case_stem(path)
        if suffix:
            if not stem.endswith(suffix):
                problems.append(f"{path}: {role} name does not end with the label suffix {suffix!r}")
                continue
            stem = stem[: -len(suffix)]
        found[stem].append(path)
    for case, files in found.items():
        if len(files) > 1:
            problems.append(f"{files[0]}: duplicate case name {case!r} ({role}s {', '.join(f.name for f in files)})")
            if duplicates is not None:
                duplicates.add(case)
    return {case: files[0] for case, files in found.items() if len(files) == 1}


def _read_csv(path: Path, patient_column: str, problems: list[str]) -> dict[str, tuple[int | None, str | None]]:
    """case -> (label or None when the cell is empty, patient or None) from a ``case,label[,patient]`` CSV."""
    rows: dict[str, tuple[int | None, str | None]] = {}
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in ("case", "label") if c not in header]
            if missing:
                problems.append(f"{path}: CSV header {header} lacks column(s) {', '.join(missing)} "
                                "(expected case,label[,patient])")
                return {}
            for line, row in enumerate(reader, start=2):
                case = (row["case"] or "").strip()
                cell = (row["label"] or "").strip()
                if not case:
                    problems.append(f"{path}:{line}: empty case id")
                    continue
                if case in rows:
                    problems.append(f"{path}:{line}: duplicate case {case!r}")
                    continue
                if cell in ("0", "1"):
                    label: int | None = int(cell)
                elif cell == "":
                    label = None
                else:
                    problems.append(f"{path}:{line}: label {cell!r} of case {case!r} is not 0, 1 or empty")
                    continue
                patient = (row.get(patient_column) or "").strip() or None if patient_column in header else None
                rows[case] = (label, patient)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        problems.append(f"{path}: not a readable CSV file ({err})")
    return rows


def _read_empty_slices(path: Path, problems: list[str]) -> dict[str, list[int]]:
    """case -> Z indices looked at and left empty, from a JSON object ``{"case": [z, ...]}``."""
    try:
        payload = read_datalist(path)  # any JSON object, read with the datalist reader's errors
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"{err}")
        return {}
    result = {}
    for case, slices in payload.items():
        if not isinstance(slices, list) or any(isinstance(s, bool) or not isinstance(s, int) for s in slices):
            problems.append(f"{path}: empty slices of {case!r} are {slices!r}, not a list of ints")
            continue
        result[case] = sorted(set(slices))
    return result


def _as_3d(volume: Volume, role: str, problems: list[str]) -> np.ndarray | None:
    array = volume.array
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        problems.append(f"{volume.path}: {role} has shape {array.shape}, not a 3D volume (X, Y, Z)")
        return None
    return array


def _paste_onto_grid(mask: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], image_affine: np.ndarray
                     ) -> np.ndarray | None:
    """Place ``mask`` onto the image grid when it lies on it with an integer voxel offset, else None.

    3D Slicer saves a segmentation cropped to the segments' extent by default: same spacing and orientation
    as the image, shifted by whole voxels.
    """
    voxel_map = np.linalg.solve(image_affine, affine)  # label voxel -> image voxel
    offset = voxel_map[:3, 3]
    if not np.allclose(voxel_map[:3, :3], np.eye(3), atol=1e-3) or not np.allclose(offset, np.round(offset),
                                                                                      atol=1e-3):
        return None
    offset = np.round(offset).astype(int)
    placed = np.zeros(shape, dtype=np.uint8)
    src = [slice(max(0, -o), min(n, s - o)) for o, n, s in zip(offset, mask.shape, shape, strict=True)]
    dst = [slice(max(0, o), min(s, o + n)) for o, n, s in zip(offset, mask.shape, shape, strict=True)]
    if any(d.stop <= d.start for d in dst):
        return None
    placed[tuple(dst)] = mask[tuple(src)]
    if int(placed.sum()) != int(mask.sum()):
        return None  # foreground outside the image
    return placed


def _read_label(case: _Case, image: Volume, image_array: np.ndarray, segments: Sequence[str] | None,
                problems: list[str]) -> np.ndarray | None:
    """The binary ``(X, Y, Z)`` drawing of a case on the image grid; None (and problems) when unusable."""
    path = case.label_file
    assert path is not None
    kind = volume_format(path)
    count = len(problems)
    try:
        if kind == "dicom":
            label = read_dicom_seg(path, image.path, segments)
        else:
            label = read_volume(path)
    except VolumeReadError as err:
        problems.append(str(err))
        return None
    if kind == "seg.nrrd":
        try:
            merged = segment_mask(label, segments)
        except VolumeReadError as err:
            problems.append(str(err))
            return None
        if merged.shape != image_array.shape or not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL):
            placed = _paste_onto_grid(merged, label.affine, image_array.shape, image.affine)
            if placed is None:
                problems.append(f"{path}: segmentation grid (shape {merged.shape}) is not a whole-voxel crop of "
                                f"the image grid of {image.path} (shape {image_array.shape}); resample it onto "
                                "the image")
                return None
            merged = placed
        return merged
    array = _as_3d(label, "label", problems)
    if array is None:
        return None
    if array.shape != image_array.shape:
        problems.append(f"{path}: label shape {array.shape} != image shape {image_array.shape} of {image.path}")
    elif not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL):
        problems.append(f"{path}: label affine differs from the image's ({image.path}; max abs difference "
                        f"{np.abs(label.affine - image.affine).max():.3g})")
    values = np.unique(array)
    outside = values[(values != 0) & (values != 1)]
    if outside.size:
        shown = ", ".join(f"{v:g}" for v in outside[:5]) + (", ..." if outside.size > 5 else "")
        problems.append(f"{path}: label values {shown} outside {{0, 1}}; save the drawing as a binary mask")
    return None if len(problems) > count else (array == 1).astype(np.uint8)


def _check_case(case: _Case, segments: Sequence[str] | None, empty: list[int] | None,
                problems: list[str]) -> np.ndarray | None:
    """Read a case's image and drawing, set its slices; returns the drawing (None without label file)."""
    try:
        image = read_volume(case.image)
    except VolumeReadError as err:
        problems.append(str(err))
        return None
    image_array = _as_3d(image, "image", problems)
    case.affine = image.affine
    if image_array is None or case.label_file is None:
        if empty:
            problems.append(f"{case.image}: empty slices listed for case {case.case!r}, which has no label file")
        return None
    drawing = _read_label(case, image, image_array, segments, problems)
    if drawing is None:
        return None
    drawn = foreground_slices(drawing)
    empty = empty or []
    depth = drawing.shape[-1]
    outside = [z for z in empty if not 0 <= z < depth]
    if outside:
        problems.append(f"{case.label_file}: empty slices {outside} outside [0, {depth})")
    painted = sorted(set(empty) & set(drawn))
    if painted:
        problems.append(f"{case.label_file}: slice(s) {painted} listed as looked at and left empty hold a drawing")
    if not drawn and not empty:
        problems.append(f"{case.label_file}: no drawing at all (no foreground voxel); remove the file for an "
                        "unannotated case, or list the slices looked at and left empty")
    case.has_drawing = bool(drawn)
    case.empty_slices = [z for z in empty if 0 <= z < depth]
    case.annotated_slices = sorted(set(drawn) | set(case.empty_slices))
    return drawing


def _split(cases: list[_Case], fractions: Sequence[float], seed: int) -> dict[str, list[_Case]]:
    """Patients shuffled with ``seed`` and dealt to the sections by ``fractions``, per stratum (any positive)."""
    patients: dict[str, list[_Case]] = defaultdict(list)
    for case in cases:
        patients[case.patient or case.case].append(case)
    rng = np.random.default_rng(seed)
    sections: dict[str, list[_Case]] = {name: [] for name in SECTIONS}
    share = np.asarray(fractions, dtype=np.float64)
    dealt = np.zeros(len(SECTIONS), dtype=int)  # patients per section so far, over the strata
    for positive in (True, False):
        stratum = sorted(p for p, cs in patients.items() if any(c.label == 1 for c in cs) == positive)
        stratum = [stratum[i] for i in rng.permutation(len(stratum))]
        # Largest-remainder rounding of the patient counts, so the counts add up to the stratum; equal
        # remainders go first to the sections the earlier strata left furthest below their share.
        exact = share * len(stratum)
        counts = np.floor(exact).astype(int)
        shortfall = share * dealt.sum() - dealt
        order = sorted(range(len(SECTIONS)), key=lambda i: (-round(exact[i] - counts[i], 9), -shortfall[i], i))
        for i in order[: len(stratum) - counts.sum()]:
            counts[i] += 1
        dealt += counts
        start = 0
        for name, count in zip(SECTIONS, counts, strict=True):
            for patient in stratum[start:start + count]:
                sections[name].extend(patients[patient])
            start += count
    return {name: sorted(items, key=lambda c: c.case) for name, items in sections.items()}


def _parse_fractions(fractions: str | Sequence[float]) -> tuple[float, float, float]:
    parts = fractions.split(",") if isinstance(fractions, str) else list(fractions)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError) as err:
        raise ValueError(f"fractions {fractions!r} are not three numbers training,validation,test") from err
    if len(values) != 3 or min(values) < 0 or not np.isclose(sum(values), 1.0, atol=1e-6):
        raise ValueError(f"fractions {fractions!r} must be three non-negative numbers summing to 1")
    return values  # type: ignore[return-value]


def _relative(path: Path, folder: Path) -> str:
    return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()


def import_dataset(images: str | os.PathLike, out: str | os.PathLike, labels: str | os.PathLike | None = None,
                   labels_csv: str | os.PathLike | None = None, label_suffix: str = "",
                   segments: Sequence[str] | None = None, empty_slices: str | os.PathLike | None = None,
                   patient_column: str = "patient", patient_regex: str | None = None,
                   fractions: str | Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                   name: str | None = None) -> ImportSummary:
    """Import scans and sparse drawings as a Decathlon-style datalist; see the module docstring.

    Args:
        images: folder of scans (NIfTI, NRRD files, or one folder per DICOM series).
        out: datalist JSON to write; NIfTI copies of other formats go to ``<out stem>_nifti/`` beside it.
        labels: folder of drawings (NIfTI, NRRD, 3D Slicer ``.seg.nrrd``, DICOM SEG ``.dcm``); optional.
        labels_csv: CSV with columns ``case,label[,patient]``; an empty label leaves the case out.
        label_suffix: ending of label names after the case id, e.g. ``"_seg"``.
        segments: names of the ``.seg.nrrd`` / DICOM SEG segments that make the drawing (default: all).
        empty_slices: JSON ``{"case": [z, ...]}`` of axial slices looked at and left empty.
        patient_column: CSV column with the patient id.
        patient_regex: regular expression on the case id giving the patient (its first group, or the whole
            match); used when the CSV has no patient column.
        fractions: training, validation and test fractions (of patients).
        seed: seed of the split.
        name: the datalist's ``name`` (default: the stem of ``out``).

    Raises:
        DataImportError: listing every problem; nothing was written.
    """
    out = Path(out)
    problems: list[str] = []
    fractions = _parse_fractions(fractions)
    pattern = None
    if patient_regex is not None:
        try:
            pattern = re.compile(patient_regex)
        except re.error as err:
            raise ValueError(f"patient regex {patient_regex!r} is not a regular expression ({err})") from err

    duplicates: set[str] = set()
    image_files = _by_case(_listing(Path(images), "image", problems), "", "image", problems, duplicates)
    label_files = (_by_case(_listing(Path(labels), "label", problems), label_suffix, "label", problems)
                   if labels is not None else {})
    for case, path in label_files.items():
        if case not in image_files and case not in duplicates:
            problems.append(f"{path}: label of case {case!r} has no image in {images}")
    rows = _read_csv(Path(labels_csv), patient_column, problems) if labels_csv is not None else None
    empty_by_case = _read_empty_slices(Path(empty_slices), problems) if empty_slices is not None else {}
    for case in sorted(set(empty_by_case) - set(image_files)):
        problems.append(f"{empty_slices}: empty slices listed for case {case!r}, which has no image in {images}")
    if rows is not None:
        for case in sorted(set(rows) - set(image_files)):
            problems.append(f"{labels_csv}: case {case!r} has no image in {images}")

    cases: list[_Case] = []
    unlabelled: list[str] = []
    # NIfTI copies are written into a hidden staging folder beside the datalist, moved into place at the end.
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    copies_name = f"{out.stem}_nifti"
    # Absolute, so that it does not depend on the folder relative datalist paths are resolved against.
    staging = Path(tempfile.mkdtemp(prefix=f".{copies_name}.", suffix=".partial", dir=out.parent)).absolute()
    try:
        for case_id, image_path in sorted(image_files.items()):
            case = _Case(case_id, image_path, label_files.get(case_id))
            before = len(problems)
            drawing = _check_case(case, segments, empty_by_case.get(case_id), problems)
            if len(problems) > before:
                continue  # a label derived from unusable files would only add follow-on problems
            _label_case(case, rows, labels_csv, pattern, patient_regex, problems, unlabelled, cases)
            kept = bool(cases) and cases[-1] is case
            if drawing is not None and kept and not problems and volume_format(case.label_file) != "nifti":
                case.staged_annotation = write_nifti(staging / f"{case_id}_annotation.nii.gz", drawing, case.affine)
            del drawing  # one case's volumes in memory at a time
        if not problems and not cases:
            problems.append(f"{images}: no case to import")
        if problems:
            raise DataImportError(problems)
        return _write(cases, staging, copies_name, out, fractions, seed, name, unlabelled)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # folders made for the output, when nothing was written into them
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()


def _label_case(case: _Case, rows: dict[str, tuple[int | None, str | None]] | None,
                labels_csv: str | os.PathLike | None, pattern: re.Pattern | None, patient_regex: str | None,
                problems: list[str], unlabelled: list[str], cases: list[_Case]) -> None:
    """Set the label and patient of a checked case and append it to ``cases`` (or ``unlabelled``)."""
    case_id, image_path = case.case, case.image
    row = rows.get(case_id) if rows is not None else None
    if rows is not None and row is None:
        problems.append(f"{image_path}: case {case_id!r} is not in {labels_csv} (an empty label cell marks an "
                        "unlabelled case)")
        return
    if row is not None:
        case.label, case.patient = row
        if case.label is None:
            unlabelled.append(case_id)
            return
        if case.label == 1 and not case.has_drawing:
            problems.append(f"{case.label_file or image_path}: case {case_id!r} has label 1 in {labels_csv} but "
                            "no drawing (a positive needs at least one drawn slice)")
        if case.label == 0 and case.has_drawing:
            problems.append(f"{case.label_file}: case {case_id!r} has label 0 in {labels_csv} but a drawing")
    else:
        case.label = int(case.has_drawing)
    if case.patient is None and pattern is not None:
        match = pattern.search(case_id)
        if match is None:
            problems.append(f"{image_path}: case id {case_id!r} does not match the patient regex {patient_regex!r}")
        else:
            case.patient = match.group(1) if pattern.groups else match.group(0)
    cases.append(case)


def _write(cases: list[_Case], staging: Path, copies_name: str, out: Path, fractions: Sequence[float], seed: int,
           name: str | None, unlabelled: list[str]) -> ImportSummary:
    """Stage the images' NIfTI copies, check every item, then move the copies and the datalist into place."""
    folder = out.parent
    datalist: dict[str, Any] = {"name": name or out.stem,
                                "description": "imported by python -m due_ext data import"}
    problems: list[str] = []
    sections = _split(cases, fractions, seed)
    for section, members in sections.items():
        items = []
        for case in members:
            item = _item(case, staging, copies_name, folder)
            # Check the item as it will be read once moved: staged copies at their staging path.
            prefix = f"{copies_name}/"
            check = {k: (str(staging / v[len(prefix):]) if k in schema.VOLUME_KEYS and v.startswith(prefix) else v)
                     for k, v in item.items()}
            problems += validate_item(check, folder, where=f"{section} (case {case.case})")
            items.append(item)
        datalist[section] = items
    # A JSON object, not a list: check_datalist reads every top-level list as a section.
    datalist["import"] = {"seed": seed, "fractions": list(fractions),
                          "patients": {c.case: c.patient or c.case for c in cases}, "unlabelled": unlabelled}
    if problems:
        raise DataImportError(problems)
    converted = sum(1 for _ in staging.iterdir())
    _commit(staging if converted else None, folder / copies_name, out, datalist)
    counts = {s: Counter(items=len(m), positives=sum(c.label == 1 for c in m), negatives=sum(c.label == 0 for c in m))
              for s, m in sections.items()}
    return ImportSummary(out, counts, converted, unlabelled)


def _item(case: _Case, staging: Path, copies_name: str, folder: Path) -> dict[str, Any]:
    """The datalist item of a case; a non-NIfTI image is written as a NIfTI copy into ``staging``."""
    item: dict[str, Any] = {}
    if volume_format(case.image) == "nifti":
        item[schema.IMAGE] = _relative(case.image, folder)
    else:
        image = read_volume(case.image)
        write_nifti(staging / f"{case.case}_image.nii.gz", _as_3d(image, "image", []), image.affine)
        item[schema.IMAGE] = f"{copies_name}/{case.case}_image.nii.gz"
    item[schema.LABEL] = case.label
    if case.label_file is not None:
        if case.staged_annotation is None:  # a NIfTI drawing, already checked binary and on the image grid
            item[schema.ANNOTATION] = _relative(case.label_file, folder)
        else:
            item[schema.ANNOTATION] = f"{copies_name}/{case.staged_annotation.name}"
        item[schema.ANNOTATED_SLICES] = case.annotated_slices
        if case.empty_slices:
            item[schema.EMPTY_SLICES] = case.empty_slices
    return item


def _commit(staging: Path | None, copies: Path, out: Path, datalist: dict[str, Any]) -> None:
    """Move the staged copies (if any) to ``copies``, replacing an earlier import's, and write the datalist."""
    previous = None
    if copies.exists():
        previous = Path(tempfile.mkdtemp(prefix=f".{copies.name}.", suffix=".old", dir=copies.parent))
        os.replace(copies, previous / copies.name)
    try:
        if staging is not None:
            os.replace(staging, copies)
        write_datalist(out, datalist)
    except BaseException:
        if staging is not None and copies.exists():
            os.replace(copies, staging)  # removed with the staging folder
        if previous is not None:
            os.replace(previous / copies.name, copies)
        raise
    finally:
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)


__all__ = ["DEFAULT_FRACTIONS", "DataImportError", "ImportSummary", "import_dataset"]
