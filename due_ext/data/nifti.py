"""NIfTI reading and crash-safe writing.

Arrays are stored as ``(X, Y, Z)``; see :mod:`due_ext.data.axes` for the convention. Writers go to a
temporary name in the destination folder and rename, so a crash never leaves a half-written volume.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from due_ext.data.atomic import atomic_destination


class NiftiError(ValueError):
    """A NIfTI file is missing, unreadable or holds unusable values; the message names the file."""


def read_nifti(path: str | os.PathLike, *, check_finite: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Read ``path`` and return ``(array, affine)`` with the array as stored (``X, Y, Z``)."""
    path = Path(path)
    if not path.is_file():
        raise NiftiError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        array = np.asarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except Exception as err:  # nibabel raises many types for corrupt files
        raise NiftiError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if check_finite and np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise NiftiError(f"{path}: contains NaN or Inf values")
    return array, affine


def write_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    """Write ``array`` (``X, Y, Z``) to ``path`` atomically; returns the path.

    ``.nii.gz`` compresses. The affine defaults to identity (1 mm isotropic voxels).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    img = nib.Nifti1Image(np.asarray(array), affine)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    with atomic_destination(path, suffix=".tmp" + suffix) as tmp:
        nib.save(img, tmp)
    return path
