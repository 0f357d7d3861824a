"""Reading scans and label maps for import: NIfTI, NRRD (3D Slicer ``.seg.nrrd`` included) and DICOM.

Every reader returns a :class:`Volume`: the array as stored, ``(X, Y, Z)`` (see :mod:`due_ext.data.axes`),
and its 4x4 voxel-to-world affine in nibabel's RAS convention, the affine a NIfTI copy of it would carry.
Every failure raises :class:`VolumeReadError` naming the file and the problem.

- NIfTI: MONAI's ``NibabelReader``, the reader the training pipeline's ``LoadImaged`` uses for NIfTI, so the
  import sees the arrays and affines training will see.
- NRRD and DICOM image series: SimpleITK (a core dependency). MONAI's ``ITKReader`` needs the ``itk`` package
  and its ``NrrdReader`` needs ``pynrrd``, neither of which DUE requires; the LPS-to-RAS conversion below is
  the one ``ITKReader`` applies, so a volume gets the same affine whichever library read it.
- 3D Slicer segmentations (``.seg.nrrd``): the segments are listed in the header (``SegmentN_Name``,
  ``SegmentN_LabelValue``, ``SegmentN_Layer``); :func:`segment_mask` merges the chosen ones into one binary mask.
- DICOM SEG: highdicom (the ``dicom`` extra). RT structure sets are not read: their contours would have to be
  rasterised onto the image grid, which is out of scope; the error says how to export a label map instead.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: File name endings of each format, longest first so ``.seg.nrrd`` wins over ``.nrrd``.
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEG_NRRD_SUFFIXES = (".seg.nrrd",)
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_FILE_SUFFIXES = (".dcm",)
#: ``pip install`` hint for the optional DICOM object readers.
DICOM_EXTRA_HINT = "pip install 'due-ext[dicom]'"
#: LPS (ITK, DICOM) to RAS (NIfTI) world coordinates: x and y change sign.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class VolumeReadError(ValueError):
    """A scan or label file is missing, unreadable or of an unsupported kind; the message names the file."""


@dataclass(frozen=True)
class Segment:
    """One segment of a 3D Slicer segmentation: its name, the value it is stored with and its layer."""

    name: str
    value: int
    layer: int = 0


@dataclass
class Volume:
    """A volume as stored, ``(X, Y, Z)`` (``(X, Y, Z, layers)`` for a layered ``.seg.nrrd``), and its RAS affine."""

    path: Path
    array: np.ndarray
    affine: np.ndarray
    #: The segments of a ``.seg.nrrd`` file; empty for any other file.
    segments: list[Segment] = field(default_factory=list)


def volume_format(path: str | os.PathLike) -> str | None:
    """``"nifti"``, ``"seg.nrrd"``, ``"nrrd"``, ``"dicom-series"`` (a folder), ``"dicom"`` (one file) or None."""
    path = Path(path)
    if path.is_dir():
        return "dicom-series"
    name = path.name.lower()
    for kind, suffixes in (("nifti", NIFTI_SUFFIXES), ("seg.nrrd", SEG_NRRD_SUFFIXES), ("nrrd", NRRD_SUFFIXES),
                           ("dicom", DICOM_FILE_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def case_stem(path: str | os.PathLike) -> str:
    """The file name without its format's extension (``case_1.seg.nrrd`` -> ``case_1``); a folder's name."""
    path = Path(path)
    if path.is_dir():
        return path.name
    lower = path.name.lower()
    for suffix in (*NIFTI_SUFFIXES, *SEG_NRRD_SUFFIXES, *NRRD_SUFFIXES, *DICOM_FILE_SUFFIXES):
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def sitk_to_ras(image) -> tuple[np.ndarray, np.ndarray]:
    """A 3D SimpleITK image as ``(X, Y, Z[, components])`` array and RAS affine (ITK's own geometry is LPS)."""
    import SimpleITK as sitk

    dim = image.GetDimension()
    if dim != 3:
        raise ValueError(f"{dim}D image, expected a 3D volume (X, Y, Z)")
    # SimpleITK arrays are (Z, Y, X[, C]); reverse the spatial axes to the stored (X, Y, Z) order.
    array = sitk.GetArrayFromImage(image)
    array = np.moveaxis(array, (0, 1, 2), (2, 1, 0)) if array.ndim == 4 else array.transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return np.ascontiguousarray(array), _LPS_TO_RAS @ lps


def _read_nifti(path: Path) -> Volume:
    # The reader itself rather than LoadImage: LoadImage falls back to every other reader on failure and
    # reports all their tracebacks, where nibabel's one-line reason is what the user needs.
    from monai.data import NibabelReader

    reader = NibabelReader()
    try:
        array, meta = reader.get_data(reader.read(str(path)))
    except Exception as err:  # nibabel raises many types for corrupt files
        raise VolumeReadError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    return Volume(path, np.asarray(array), np.asarray(meta["affine"], dtype=np.float64))


def _read_sitk(path: Path, what: str) -> tuple[object, np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise VolumeReadError(f"{path}: not a readable {what} file ({first})") from err
    try:
        array, affine = sitk_to_ras(image)
    except ValueError as err:
        raise VolumeReadError(f"{path}: {err}") from err
    return image, array, affine


def _seg_nrrd_segments(path: Path, image) -> list[Segment]:
    """The segments listed in a 3D Slicer ``.seg.nrrd`` header (``SegmentN_*`` keys)."""
    keys = set(image.GetMetaDataKeys())
    indices = sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"Segment(\d+)_LabelValue", k))})
    segments = []
    for i in indices:
        try:
            value = int(image.GetMetaData(f"Segment{i}_LabelValue"))
            layer = int(image.GetMetaData(f"Segment{i}_Layer")) if f"Segment{i}_Layer" in keys else 0
        except ValueError as err:
            raise VolumeReadError(f"{path}: segment {i} has a non-integer label value or layer ({err})") from err
        name = image.GetMetaData(f"Segment{i}_Name") if f"Segment{i}_Name" in keys else f"Segment_{i}"
        segments.append(Segment(name, value, layer))
    if not segments:
        raise VolumeReadError(f"{path}: no SegmentN_LabelValue entries in the header; not a 3D Slicer "
                              "segmentation (rename it to .nrrd if it is a plain label map)")
    return segments


def _dicom_series(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise VolumeReadError(f"{folder}: no DICOM image series in this folder")
    if len(series) > 1:
        raise VolumeReadError(f"{folder}: {len(series)} DICOM series in one folder ({', '.join(series)}); "
                              "put each series in its own folder")
    files = reader.GetGDCMSeriesFileNames(str(folder), series[0])
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise VolumeReadError(f"{folder}: DICOM series not readable ({first})") from err


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a scan or plain label map: a NIfTI or NRRD file, or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise VolumeReadError(f"{path}: file not found")
    kind = volume_format(path)
    if kind == "nifti":
        return _read_nifti(path)
    if kind in ("nrrd", "seg.nrrd"):
        image, array, affine = _read_sitk(path, "NRRD")
        segments = _seg_nrrd_segments(path, image) if kind == "seg.nrrd" else []
        return Volume(path, array, affine, segments)
    if kind == "dicom-series":
        try:
            array, affine = sitk_to_ras(_dicom_series(path))
        except ValueError as err:
            if isinstance(err, VolumeReadError):
                raise
            raise VolumeReadError(f"{path}: {err}") from err
        return Volume(path, array, affine)
    if kind == "dicom":
        raise VolumeReadError(f"{path}: a single DICOM file is read as a label object (DICOM SEG) only; put an "
                              "image series in a folder of its own")
    raise VolumeReadError(f"{path}: not a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .seg.nrrd) file or a DICOM series "
                          "folder")


def segment_mask(volume: Volume, names: Sequence[str] | None = None) -> np.ndarray:
    """Merge segments of a ``.seg.nrrd`` volume into one ``(X, Y, Z)`` uint8 mask (all segments by default).

    Slicer stores overlapping segments on separate layers (a 4th array axis), each segment as one label value
    of its layer.
    """
    segments = volume.segments
    if names is not None:
        by_name = {s.name: s for s in segments}
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise VolumeReadError(f"{volume.path}: no segment named {', '.join(map(repr, unknown))} "
                                  f"(segments: {', '.join(repr(s.name) for s in segments)})")
        segments = [by_name[n] for n in names]
    layers = volume.array if volume.array.ndim == 4 else volume.array[..., None]
    mask = np.zeros(layers.shape[:3], dtype=bool)
    for segment in segments:
        if not 0 <= segment.layer < layers.shape[3]:
            raise VolumeReadError(f"{volume.path}: segment {segment.name!r} is on layer {segment.layer}, but the "
                                  f"file has {layers.shape[3]} layer(s)")
        mask |= layers[..., segment.layer] == segment.value
    return mask.astype(np.uint8)


def read_dicom_seg(path: str | os.PathLike, image_folder: str | os.PathLike,
                   names: Sequence[str] | None = None) -> Volume:
    """Read a DICOM SEG file as a binary mask on the grid of the DICOM series in ``image_folder``.

    The segments chosen by ``names`` (default: all) are merged. Needs pydicom and highdicom (``dicom`` extra).
    """
    path, image_folder = Path(path), Path(image_folder)
    modality = dicom_modality(path)
    if modality == "RTSTRUCT":
        raise VolumeReadError(f"{path}: RT structure sets are not supported; export the structure as a label map "
                              "(e.g. 3D Slicer: Segmentations > Export to files, .seg.nrrd or .nii.gz)")
    if modality != "SEG":
        raise VolumeReadError(f"{path}: DICOM modality {modality!r}, expected a DICOM SEG (modality SEG)")
    try:
        import highdicom as hd
        import pydicom
    except ImportError as err:
        raise VolumeReadError(f"{path}: reading DICOM SEG needs highdicom: {DICOM_EXTRA_HINT}") from err
    if volume_format(image_folder) != "dicom-series":
        raise VolumeReadError(f"{path}: a DICOM SEG needs its image as a DICOM series folder, got {image_folder}")
    import SimpleITK as sitk

    series = _dicom_series(image_folder)
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(image_folder), reader.GetGDCMSeriesIDs(str(image_folder))[0])
    try:
        seg = hd.seg.segread(str(path))
        # SOP instance UID of each slice in the series' (sorted) Z order.
        uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files]
        by_name = {d.SegmentLabel: int(d.SegmentNumber) for d in seg.SegmentSequence}
        if names is not None:
            unknown = [n for n in names if n not in by_name]
            if unknown:
                raise VolumeReadError(f"{path}: no segment named {', '.join(map(repr, unknown))} "
                                      f"(segments: {', '.join(map(repr, by_name))})")
            numbers = [by_name[n] for n in names]
        else:
            numbers = sorted(by_name.values())
        # (slices, rows, columns, segments), one slice per source instance, absent slices zero.
        pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=numbers,
                                                   assert_missing_frames_are_empty=True)
    except VolumeReadError:
        raise
    except Exception as err:  # pydicom and highdicom raise many types for malformed objects
        raise VolumeReadError(f"{path}: DICOM SEG not readable against {image_folder} "
                              f"({type(err).__name__}: {err})") from err
    mask = (np.asarray(pixels) > 0).any(axis=-1)  # (Z, rows=Y, columns=X)
    _, affine = sitk_to_ras(series)
    return Volume(path, np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8), affine)


def dicom_modality(path: str | os.PathLike) -> str:
    """The Modality (0008,0060) of a single DICOM file; needs pydicom (``dicom`` extra)."""
    path = Path(path)
    try:
        import pydicom
    except ImportError as err:
        raise VolumeReadError(f"{path}: reading DICOM label objects (DICOM SEG) needs pydicom and highdicom: "
                              f"{DICOM_EXTRA_HINT}") from err
    try:
        return str(pydicom.dcmread(str(path), stop_before_pixels=True).get("Modality", ""))
    except Exception as err:  # pydicom raises InvalidDicomError, OSError and others
        raise VolumeReadError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from err


__all__ = [
    "DICOM_EXTRA_HINT",
    "Segment",
    "Volume",
    "VolumeReadError",
    "case_stem",
    "dicom_modality",
    "read_dicom_seg",
    "read_volume",
    "segment_mask",
    "sitk_to_ras",
    "volume_format",
]
