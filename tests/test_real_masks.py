"""The real-anatomy evaluation masks (`python -m due_ext interp real-masks`): what the interpolator docs' table on
real shapes is measured on. Downloads the pyradiomics sdist and the nilearn wheel from PyPI once (cache)."""

from __future__ import annotations

import numpy as np
import pytest

from due_ext.data.nifti import read_nifti

EXPECTED = {  # name: (voxel count, spacing in mm)
    "pyradiomics_brain1": (4137, (0.78125, 0.78125, 6.5)),
    "pyradiomics_brain2": (453, (0.78125, 0.78125, 6.5)),
    "pyradiomics_breast1": (143, (0.664062, 0.664062, 2.1)),
    "pyradiomics_lung1": (837, (0.5703125, 0.5703125, 5.0)),
    "pyradiomics_lung2": (24644, (0.6269531, 0.6269531, 5.0)),
    "icbm_brain_2mm": (218472, (2.0, 2.0, 2.0)),
    "icbm_wm_2mm": (79030, (2.0, 2.0, 2.0)),
    "icbm_wm_left_1x1x3mm": (105237, (1.0, 1.0, 3.0)),
    "icbm_deepgrey_0": (2821, (1.0, 1.0, 1.0)),
    "icbm_deepgrey_1": (2584, (1.0, 1.0, 1.0)),
    "icbm_deepgrey_2": (2141, (1.0, 1.0, 1.0)),
    "icbm_ventricle": (1543, (1.0, 1.0, 1.0)),
}


@pytest.fixture(scope="module")
def real_masks(tmp_path_factory):
    from due_ext.interp.real_masks import build_real_masks

    return build_real_masks(tmp_path_factory.mktemp("real_masks"))


def test_real_masks_are_the_documented_set(real_masks):
    assert sorted(p.name.removesuffix(".nii.gz") for p in real_masks) == sorted(EXPECTED)
    for path in real_masks:
        count, spacing = EXPECTED[path.name.removesuffix(".nii.gz")]
        mask, affine = read_nifti(path)
        assert mask.ndim == 3 and set(np.unique(mask)) == {0, 1}
        assert int(mask.sum()) == count, path.name
        np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), spacing, rtol=1e-5)
        # cropped to the mask's box plus 2 voxels, unless the box touches the source's border
        assert all(mask.shape[a] - np.ptp(np.nonzero(mask)[a]) - 1 <= 4 for a in range(3)), path.name
        # several slices along Z: there is something to interpolate at k = 2
        assert mask.any(axis=(0, 1)).sum() >= 3, path.name


def test_icbm_structures_come_from_the_left_hemisphere_only():
    from due_ext.interp.real_masks import _left_components

    mask = np.zeros((20, 8, 8), bool)
    mask[2:5, 2:5, 2:5] = True  # left, 27 voxels
    mask[14:18, 2:6, 2:6] = True  # right, larger (64 voxels)
    mask[7:8, 1:2, 1:2] = True  # left, too small
    parts = _left_components(mask, count=3, min_voxels=5)
    assert len(parts) == 1 and parts[0].sum() == 27 and parts[0][3, 3, 3]
