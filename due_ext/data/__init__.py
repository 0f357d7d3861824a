"""The data layer of DUE: datalists, NIfTI I/O, validation and MONAI transforms.

- :mod:`~due_ext.data.axes`: the axis convention (stored ``X, Y, Z``; annotated slices index Z).
- :mod:`~due_ext.data.schema`: the keys of a datalist item.
- :mod:`~due_ext.data.nifti`, :mod:`~due_ext.data.datalist`: crash-safe reading and writing.
- :mod:`~due_ext.data.validate`: checks of datalists and items (``python -m due_ext data check``).
- :mod:`~due_ext.data.transforms`: dictionary transforms and the standard loading pipeline.
- :mod:`~due_ext.data.preprocessing`: that pipeline as one chain for raw scans too (orientation, spacing, CT window
  or MR percentiles, crop or pad) and the way back of a Grad-CAM onto its input's grid.
- :mod:`~due_ext.data.importing`, :mod:`~due_ext.data.readers`: importing your own scans and drawings (NIfTI,
  NRRD, 3D Slicer segmentations, DICOM) as a datalist (``python -m due_ext data import``).

The transforms import MONAI; they are loaded on first access so that validation stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

from due_ext.data.axes import SLICE_AXIS, foreground_slices, parse_size, slice_of
from due_ext.data.datalist import SECTIONS, read_datalist, write_datalist
from due_ext.data.nifti import NiftiError, read_nifti, write_nifti
from due_ext.data.validate import (
    DatalistError,
    DatalistReport,
    assert_valid_item,
    check_datalist,
    validate_item,
)

_TRANSFORMS = (
    "FillMissingExplanationKeysd",
    "ResampleToSized",
    "SparseAnnotationd",
    "ValidateItemd",
    "load_transforms",
    "remap_slices",
)


def __getattr__(name: str) -> Any:
    if name in _TRANSFORMS:
        return getattr(importlib.import_module("due_ext.data.transforms"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SECTIONS",
    "SLICE_AXIS",
    "DatalistError",
    "DatalistReport",
    "NiftiError",
    "assert_valid_item",
    "check_datalist",
    "foreground_slices",
    "parse_size",
    "read_datalist",
    "read_nifti",
    "slice_of",
    "validate_item",
    "write_datalist",
    "write_nifti",
    *_TRANSFORMS,
]
