"""Real anatomical masks that registry packages ship: the interpolators' evaluation set on real shapes.

``python -m due_ext interp real-masks --out DIR`` writes twelve full 3D binary masks as NIfTI (the grid's
spacing in the affine, slices along the third axis), cropped to their bounding box plus 2 voxels:

- five real tumour drawings from the ``data/`` folder of the pyradiomics 3.0.1 sdist (PyPI), at their native
  resolution: ``brain1``, ``brain2`` (MR, 0.78 x 0.78 x 6.5 mm), ``breast1`` (0.66 x 0.66 x 2.1 mm), ``lung1``,
  ``lung2`` (CT, 0.57-0.63 mm pixels, 5 mm slices);
- seven structures of the MNI ICBM 2009a symmetric template's tissue maps, shipped in the nilearn 0.14.1 wheel
  (PyPI): the brain (grey + white matter > 0.5, holes filled) and the white matter at 2 mm, the left white
  matter at 1 x 1 x 3 mm, the three largest deep grey-matter bodies (grey matter > 0.5 deeper than 15 mm
  inside the brain, opened once: caudate, putamen, thalamus) and the largest ventricle (brain with
  grey + white < 0.3 deeper than 15 mm), each from the left hemisphere only: the template is symmetric, so
  a right-side copy would be the same shape mirrored.

None of these trains anything here; the data rule of issue #16 holds (Debian's ``mricron-data`` and the
``dicompyler-core`` structure sets are held out and never read by this project).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from scipy import ndimage

from due_ext.data.nifti import write_nifti

PYRADIOMICS_TUMOURS = ("brain1", "brain2", "breast1", "lung1", "lung2")


def _cropped(mask: np.ndarray, pad: int = 2) -> np.ndarray:
    found = np.argwhere(mask)
    lo = np.maximum(found.min(0) - pad, 0)
    hi = found.max(0) + pad + 1
    return mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].astype(np.uint8)


def pyradiomics_tumours() -> dict[str, tuple[np.ndarray, tuple[float, float, float]]]:
    """``name -> (mask (X, Y, Z) uint8, spacing mm)`` of the five pyradiomics tumour labels."""
    import SimpleITK as sitk

    from due_ext.data.cache import fetch_pyradiomics_labels

    folder = fetch_pyradiomics_labels()
    out = {}
    for name in PYRADIOMICS_TUMOURS:
        image = sitk.ReadImage(str(folder / f"{name}_label.nrrd"))
        mask = sitk.GetArrayFromImage(image).transpose(2, 1, 0) > 0  # SimpleITK arrays are (Z, Y, X)
        out[f"pyradiomics_{name}"] = (_cropped(mask), tuple(float(s) for s in image.GetSpacing()))
    return out


def _left_components(mask: np.ndarray, count: int, min_voxels: int) -> list[np.ndarray]:
    """The ``count`` largest connected components of ``mask`` whose centre lies left of the midline (X < half;
    the template is in RAS, so low X is the left side)."""
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    centres = ndimage.center_of_mass(mask, labels, range(1, n + 1))
    order = [i for i in np.argsort(sizes)[::-1] if centres[i][0] < mask.shape[0] / 2 and sizes[i] >= min_voxels]
    return [labels == i + 1 for i in order[:count]]


def icbm152_structures() -> dict[str, tuple[np.ndarray, tuple[float, float, float]]]:
    """``name -> (mask (X, Y, Z) uint8, spacing mm)`` of the seven ICBM 2009a structures (module docstring)."""
    import nibabel as nib

    from due_ext.data.cache import fetch_icbm152_tissue_maps

    folder = fetch_icbm152_tissue_maps()
    grey, white = (np.asarray(nib.load(folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz")
                              .dataobj, np.float32) / 255.0 for kind in ("gm", "wm"))
    brain = ndimage.binary_fill_holes((grey + white) > 0.5)
    depth = ndimage.distance_transform_edt(brain)
    white_matter = white > 0.5
    out = {"icbm_brain_2mm": (_cropped(brain[::2, ::2, ::2]), (2.0, 2.0, 2.0)),
           "icbm_wm_2mm": (_cropped(white_matter[::2, ::2, ::2]), (2.0, 2.0, 2.0)),
           "icbm_wm_left_1x1x3mm": (_cropped(white_matter[: brain.shape[0] // 2, :, ::3]), (1.0, 1.0, 3.0))}
    deep_grey = ndimage.binary_opening((grey > 0.5) & (depth > 15))
    for i, component in enumerate(_left_components(deep_grey, 3, 400)):
        out[f"icbm_deepgrey_{i}"] = (_cropped(component), (1.0, 1.0, 1.0))
    ventricles = brain & ((grey + white) < 0.3) & (depth > 15)
    for component in _left_components(ventricles, 1, 400):
        out["icbm_ventricle"] = (_cropped(component), (1.0, 1.0, 1.0))
    return out


def build_real_masks(out: str | os.PathLike) -> list[Path]:
    """Write every mask of the module docstring to ``out/<name>.nii.gz``; returns the paths (sorted)."""
    out = Path(out)
    paths = []
    for name, (mask, spacing) in sorted({**pyradiomics_tumours(), **icbm152_structures()}.items()):
        paths.append(write_nifti(out / f"{name}.nii.gz", mask, np.diag([*spacing, 1.0])))
    return sorted(paths)
