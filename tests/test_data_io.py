"""NIfTI and datalist I/O, and the axis convention through MONAI's loader."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImaged

from due_ext.data import nifti
from due_ext.data.axes import SLICE_AXIS, foreground_slices, parse_size, slice_of
from due_ext.data.datalist import SECTIONS, read_datalist, write_datalist, write_json_atomic
from due_ext.data.nifti import NiftiError, read_nifti, write_nifti


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_values_shape_and_affine(tmp_path, suffix):
    array = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    affine = np.array([[-0.8, 0, 0, 10], [0, 0.8, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    path = write_nifti(tmp_path / "sub" / f"vol{suffix}", array, affine)
    assert path == tmp_path / "sub" / f"vol{suffix}"
    loaded, loaded_affine = read_nifti(path)
    np.testing.assert_array_equal(loaded, array)
    np.testing.assert_allclose(loaded_affine, affine, atol=1e-6)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary left
    if suffix == ".nii.gz":
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip magic: really compressed


def test_write_nifti_defaults_to_identity_affine(tmp_path):
    _, affine = read_nifti(write_nifti(tmp_path / "v.nii.gz", np.zeros((2, 3, 4), np.uint8)))
    np.testing.assert_array_equal(affine, np.eye(4))


def test_failed_nifti_write_leaves_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "v.nii.gz", np.ones((2, 2, 2), np.float32))
    before = path.read_bytes()

    def crash(img, filename):
        with open(filename, "wb") as handle:
            handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nifti.nib, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        write_nifti(path, np.zeros((2, 2, 2), np.float32))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v.nii.gz"]


def test_read_nifti_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    with pytest.raises(NiftiError, match=f"{missing}: file not found"):
        read_nifti(missing)

    noise = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)  # incompressible: truncation bites
    corrupt = write_nifti(tmp_path / "corrupt.nii.gz", noise)
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    with pytest.raises(NiftiError, match="corrupt.nii.gz: not a readable NIfTI"):
        read_nifti(corrupt)

    text = tmp_path / "text.nii"
    text.write_text("not an image")
    with pytest.raises(NiftiError, match="text.nii: not a readable NIfTI"):
        read_nifti(text)

    array = np.ones((2, 2, 2), np.float32)
    array[1, 1, 1] = np.nan
    nan = write_nifti(tmp_path / "nan.nii.gz", array)
    with pytest.raises(NiftiError, match="nan.nii.gz: contains NaN or Inf"):
        read_nifti(nan)
    assert np.isnan(read_nifti(nan, check_finite=False)[0][1, 1, 1])


def test_datalist_round_trip_adds_sections(tmp_path):
    path = write_datalist(tmp_path / "d" / "datalist.json", {"training": [{"image": "a.nii.gz", "label": 0}]})
    payload = read_datalist(path)
    assert payload["training"] == [{"image": "a.nii.gz", "label": 0}]
    assert all(payload[s] == [] for s in SECTIONS[1:])
    assert [p.name for p in path.parent.iterdir()] == ["datalist.json"]


def test_failed_json_write_keeps_old_content(tmp_path):
    path = write_json_atomic(tmp_path / "x.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_read_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist not found"):
        read_datalist(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        read_datalist(bad)
    bad.write_text("[]")
    with pytest.raises(ValueError, match="bad.json: a datalist must be a JSON object"):
        read_datalist(bad)


def test_parse_size():
    assert parse_size("128,128,64") == (128, 128, 64)
    assert parse_size([16, 16, 8]) == (16, 16, 8)
    for bad in ("128,128", "a,b,c", "1,0,1", (1, 2, 3, 4)):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)


def test_axis_helpers_index_the_last_axis():
    mask = np.zeros((1, 4, 5, 6), np.uint8)
    mask[0, 1, 2, [1, 4]] = 1
    assert SLICE_AXIS == -1
    assert foreground_slices(mask) == [1, 4]
    assert foreground_slices(mask[0]) == [1, 4]
    assert slice_of(mask, 4).shape == (1, 4, 5) and slice_of(mask, 4).sum() == 1


def test_load_imaged_keeps_xyz_order_and_annotated_slices(tmp_path):
    """A NIfTI written (X, Y, Z) loads channel-first (1, X, Y, Z) unreoriented; slice indices hit Z."""
    size = (6, 7, 5)
    image = np.zeros(size, np.float32)
    image[1, 2, 3] = 5.0  # one marker voxel, all coordinates distinct
    annotation = np.zeros(size, np.uint8)
    annotation[2:4, 3:5, 1] = 1
    annotation[0, 0, 4] = 1
    # A flipped, anisotropic affine: MONAI's loader must not reorient to match it.
    affine = np.diag([-1.25, -1.25, 2.5, 1.0])
    write_nifti(tmp_path / "img.nii.gz", image, affine)
    write_nifti(tmp_path / "ann.nii.gz", annotation, affine)
    write_datalist(tmp_path / "datalist.json", {"training": [
        {"image": "img.nii.gz", "annotation": "ann.nii.gz", "annotated_slices": [1, 4], "label": 1}]})
    item = load_decathlon_datalist(tmp_path / "datalist.json", data_list_key="training")[0]
    assert item["annotated_slices"] == [1, 4]  # ints are left alone, paths resolved
    assert item["annotation"] == str(tmp_path / "ann.nii.gz")

    loaded = LoadImaged(["image", "annotation"], ensure_channel_first=True, image_only=True)(item)
    assert tuple(loaded["image"].shape) == (1, *size)
    assert torch.nonzero(loaded["image"]).tolist() == [[0, 1, 2, 3]]
    assert foreground_slices(loaded["annotation"].numpy()) == item["annotated_slices"]
    np.testing.assert_array_equal(loaded["annotation"][0, ..., 1].numpy(), annotation[..., 1])
    np.testing.assert_allclose(loaded["image"].affine.numpy(), affine)


def test_trailing_singleton_loads_as_channel(tmp_path):
    array = np.random.default_rng(0).random((4, 5, 6, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / "v4.nii.gz")
    loaded = LoadImaged("image", ensure_channel_first=True, image_only=True)({"image": str(tmp_path / "v4.nii.gz")})
    assert tuple(loaded["image"].shape) == (1, 4, 5, 6)
    np.testing.assert_allclose(loaded["image"][0].numpy(), array[..., 0])


def test_atomic_writers_give_plain_file_permissions(tmp_path):
    import os

    import numpy as np

    from due_ext.data.datalist import write_json_atomic
    from due_ext.data.nifti import write_nifti

    old = os.umask(0o022)
    try:
        volume = write_nifti(tmp_path / "v.nii.gz", np.zeros((2, 2, 2), np.float32))
        listing = write_json_atomic(tmp_path / "d.json", {"training": []})
    finally:
        os.umask(old)
    assert (volume.stat().st_mode & 0o777) == 0o644
    assert (listing.stat().st_mode & 0o777) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.json", "v.nii.gz"]  # no temporaries left


def test_collect_annotated_items_makes_paths_absolute_and_checks_items(tmp_path):
    import numpy as np
    import pytest

    from due_ext.data.annotated_items import collect_annotated_items
    from due_ext.data.datalist import write_datalist
    from due_ext.data.nifti import write_nifti

    mask = np.zeros((4, 4, 5), np.uint8)
    mask[1:3, 1:3, [0, 4]] = 1
    write_nifti(tmp_path / "m.nii.gz", mask)
    positive = {"image": "i.nii.gz", "label": 1, "annotation": "m.nii.gz", "annotated_slices": [0, 4]}
    write_datalist(tmp_path / "d.json", {"training": [positive, {"image": "n.nii.gz", "label": 0}],
                                         "test": [dict(positive)]})
    payload, items = collect_annotated_items(tmp_path / "d.json", ["training"])
    assert [item.name for item in items] == ["training_m"] and items[0].slices == [0, 4]
    assert payload["training"][1]["image"] == str((tmp_path / "n.nii.gz").resolve())
    assert payload["test"][0]["annotation"] == str((tmp_path / "m.nii.gz").resolve())  # copied, not collected
    write_datalist(tmp_path / "bad.json", {"training": [{**positive, "annotated_slices": [0, 7]}]})
    with pytest.raises(ValueError, match=r"m.nii.gz: annotated slices \[7\]"):
        collect_annotated_items(tmp_path / "bad.json", ["training"])
