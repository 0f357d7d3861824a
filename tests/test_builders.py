"""Dataset builders: sparse annotation, lesion shapes, splits, phantom and lung-CT builds, preview, cache."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from due_ext.data import schema
from due_ext.data.builders import build_dataset
from due_ext.data.builders.nodules import (
    lesion_field,
    lesion_mask,
    plain_ellipsoid,
    random_lesion_shape,
    soft_edge,
    surface_bound,
)
from due_ext.data.builders.sparse import sparse_slices, sparsify
from due_ext.data.builders.splits import split_counts
from due_ext.data.nifti import read_nifti
from due_ext.data.validate import check_datalist


def _mask_on_slices(slices: list[int], depth: int = 12) -> np.ndarray:
    mask = np.zeros((4, 4, depth), dtype=np.uint8)
    for z in slices:
        mask[1:3, 1:3, z] = 1
    return mask


# --- sparse annotation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("occupied", "every_k", "expected"), [
    (range(2, 10), 3, [2, 5, 8, 9]),  # last slice kept although the gap 8 -> 9 is shorter than k
    (range(2, 9), 3, [2, 5, 8]),  # last slice already on the grid: not duplicated
    ([6], 3, [6]),  # a lesion on one slice
    (range(3, 7), 1, [3, 4, 5, 6]),  # k = 1 keeps every lesion slice
    (range(0, 12), 20, [0, 11]),  # k beyond the lesion: first and last only
    ([2, 3, 7, 8], 2, [2, 8]),  # grid slices 4 and 6 are empty (hole along Z): skipped
])
def test_sparse_slices_hand_made(occupied, every_k, expected):
    assert sparse_slices(_mask_on_slices(list(occupied)), every_k) == expected


def test_sparse_slices_rejects_bad_input():
    with pytest.raises(ValueError, match="no foreground"):
        sparse_slices(np.zeros((4, 4, 5)), 2)
    with pytest.raises(ValueError, match="every_k"):
        sparse_slices(_mask_on_slices([1, 2]), 0)


def test_sparsify_keeps_only_listed_slices():
    mask = _mask_on_slices(list(range(2, 10)))
    sparse = sparsify(mask, [2, 5])
    assert sparse.dtype == mask.dtype
    np.testing.assert_array_equal(sparse[..., [2, 5]], mask[..., [2, 5]])
    assert sparse.sum() == mask[..., [2, 5]].sum()
    with pytest.raises(ValueError, match="outside the Z range"):
        sparsify(mask, [12])


def test_split_counts():
    assert split_counts(8) == {"training": 4, "validation": 2, "test": 2}
    assert split_counts(24) == {"training": 12, "validation": 6, "test": 6}
    assert split_counts(3) == {"training": 1, "validation": 1, "test": 1}
    assert sum(split_counts(11).values()) == 11
    with pytest.raises(ValueError, match="at least 3 positives"):
        split_counts(2, "positives")


# --- lesion shapes ---------------------------------------------------------------------------------------


def test_sphere_mask_volume_and_soft_edge():
    sphere = plain_ellipsoid((16.0, 16.0, 16.0), (8.0, 8.0, 8.0), np.eye(3))
    field_mm = lesion_field(sphere, (33, 33, 33), (1.0, 1.0, 1.0))
    mask = lesion_mask(field_mm)
    assert abs(mask.sum() / (4 / 3 * np.pi * 8**3) - 1) < 0.03
    assert field_mm[16, 16, 16] == pytest.approx(-8.0)  # signed distance at the centre
    assert field_mm[16, 16, 24] == pytest.approx(0.0, abs=1e-9)  # on the surface
    assert soft_edge(np.array([0.0]), 0.5)[0] == pytest.approx(0.5)


def test_anisotropic_spacing_scales_the_grid():
    sphere = plain_ellipsoid((10.0, 10.0, 10.0), (6.0, 6.0, 6.0), np.eye(3))
    mask = lesion_mask(lesion_field(sphere, (21, 21, 11), (1.0, 1.0, 2.0)))
    z = np.nonzero(mask.any(axis=(0, 1)))[0]
    assert (z[0], z[-1]) == (3, 7)  # |2 z - 10| < 6 mm


def test_random_lesion_stays_within_its_diameter():
    rng = np.random.default_rng(3)
    for _ in range(10):
        shape = random_lesion_shape(rng, 12.0, (15.0, 15.0, 15.0), lobulated_probability=1.0)
        assert shape.bounding_radius_mm <= 6.0 + 1e-9
        inside = np.argwhere(lesion_mask(lesion_field(shape, (31, 31, 31), (1.0, 1.0, 1.0))))
        assert len(inside) > 0
        assert np.linalg.norm(inside - 15.0, axis=1).max() <= 6.0 + 1e-9


def test_surface_bound_hand_computed():
    x, y = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    # lobes (wide bumps) add their amplitudes
    assert surface_bound(np.stack([x, y]), np.array([0.2, 0.3]), np.array([0.1, 0.2])) == pytest.approx(1.5)
    # one spicule adds its amplitude
    assert surface_bound(x[None], np.array([0.7]), np.array([0.01])) == pytest.approx(1.7)
    # two orthogonal spicules: half-angle pi/4, the other adds at most a exp((cos(pi/4) - 1) / w)
    tail = 0.5 * np.exp((np.cos(np.pi / 4) - 1) / 0.01)
    assert surface_bound(np.stack([x, y]), np.array([0.7, 0.5]), np.array([0.01, 0.01])) == pytest.approx(
        1.7 + 0.7 * np.exp((np.cos(np.pi / 4) - 1) / 0.01) + tail)
    # ... and never more than the sum of the amplitudes (two spicules on one axis)
    assert surface_bound(np.stack([x, x]), np.array([0.7, 0.5]), np.array([0.01, 0.01])) == pytest.approx(2.2)


def test_spiculated_lesion_stays_within_its_diameter_and_has_spikes():
    rng = np.random.default_rng(5)
    for _ in range(5):
        shape = random_lesion_shape(rng, 12.0, (15.0, 15.0, 15.0), lobulated_probability=0.0,
                                    spiculated_probability=1.0)
        assert shape.bounding_radius_mm <= 6.0 + 1e-9
        assert np.all(shape.lobe_widths <= 0.012) and len(shape.lobe_widths) >= 3
        inside = np.argwhere(lesion_mask(lesion_field(shape, (61, 61, 61), (0.5, 0.5, 0.5))))
        distance = np.linalg.norm(inside * 0.5 - 15.0, axis=1)
        assert distance.max() <= 6.0 + 1e-9
        # spikes reach well beyond the body: the farthest voxel lies beyond every ellipsoid radius
        assert distance.max() > 1.2 * max(shape.radii_mm)


# --- phantom ---------------------------------------------------------------------------------------------


def _arrays(datalist_path: Path) -> dict[str, np.ndarray]:
    datalist = json.loads(datalist_path.read_text())
    root = datalist_path.parent
    return {f"{section}/{item[key]}": read_nifti(root / item[key])[0]
            for section in ("training", "validation", "test") for item in datalist[section]
            for key in schema.VOLUME_KEYS if key in item}


def test_phantom_build_content(tmp_path):
    summary = build_dataset("phantom", tmp_path / "p", n_pos=4, n_neg=3, size="24,20,12", every_k=2, seed=1)
    assert "training" in str(summary) and "24,20,12" in str(summary)
    path = Path(summary.datalist)
    datalist = json.loads(path.read_text())
    assert datalist["builder"]["parameters"]["seed"] == 1
    assert check_datalist(path).problems == []
    for section in ("training", "validation", "test"):
        labels = [item["label"] for item in datalist[section]]
        assert 0 in labels and 1 in labels, section
    for item in datalist["training"] + datalist["validation"] + datalist["test"]:
        image, affine = read_nifti(path.parent / item["image"])
        assert image.shape == (24, 20, 12) and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        np.testing.assert_allclose(np.diag(affine)[:3], (1.0, 1.0, 2.0))
        if item["label"] == 0:
            assert set(item) == {"image", "label"}
            continue
        annotation = read_nifti(path.parent / item["annotation"])[0]
        mask = read_nifti(path.parent / item["mask"])[0]
        assert annotation.dtype == np.uint8 and mask.dtype == np.uint8
        slices = item["annotated_slices"]
        assert slices == sparse_slices(mask, 2)
        np.testing.assert_array_equal(annotation[..., slices], mask[..., slices])
        assert annotation.sum() == annotation[..., slices].sum()  # zeros on every other slice
        # the lesion is brighter than the background on average
        assert image[mask > 0].mean() > image[mask == 0].mean() + 0.1


def test_phantom_is_deterministic_and_rebuilds_cleanly(tmp_path):
    first = build_dataset("phantom", tmp_path / "a", n_pos=3, n_neg=3, seed=7)
    second = build_dataset("phantom", tmp_path / "b", n_pos=3, n_neg=3, seed=7)
    a, b = _arrays(Path(first.datalist)), _arrays(Path(second.datalist))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other = _arrays(Path(build_dataset("phantom", tmp_path / "c", n_pos=3, n_neg=3, seed=8).datalist))
    assert any(not np.array_equal(a[k], other[k]) for k in a if "images/" in k)

    # A smaller re-build into the same folder leaves no volume of the larger one behind.
    build_dataset("phantom", tmp_path / "a", n_pos=5, n_neg=5, seed=7)
    build_dataset("phantom", tmp_path / "a", n_pos=3, n_neg=4, seed=7)
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.nii.gz"))
    datalist = json.loads((tmp_path / "a" / "datalist.json").read_text())
    referenced = sorted(item[key] for section in ("training", "validation", "test") for item in datalist[section]
                        for key in schema.VOLUME_KEYS if key in item)
    assert files == referenced
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no staging left


def test_builder_chosen_annotated_slices_must_hold_lesion(tmp_path):
    from due_ext.data.builders.output import StagedDataset

    mask = np.zeros((4, 4, 5), dtype=np.uint8)
    mask[1:3, 1:3, 1:4] = 1
    with StagedDataset(tmp_path / "s") as staged:
        item = staged.add_item("training", "a", mask.astype(np.float32), np.eye(4), 1, mask=mask,
                               annotated_slices=[3, 1, 3])
        assert item[schema.ANNOTATED_SLICES] == [1, 3]  # sorted, unique; every_k not needed
        for bad in ([0, 1], [5], []):  # slice 0 holds no lesion, 5 is outside Z, none at all
            with pytest.raises(ValueError, match="annotated slices"):
                staged.add_item("training", "b", mask.astype(np.float32), np.eye(4), 1, mask=mask,
                                annotated_slices=bad)


def test_build_errors(tmp_path):
    with pytest.raises(ValueError, match="phantom, lung-ct"):
        build_dataset("brain", tmp_path / "x")
    with pytest.raises(ValueError, match="at least 3 negatives"):
        build_dataset("phantom", tmp_path / "x", n_neg=2)
    with pytest.raises(ValueError, match="X,Y,Z"):
        build_dataset("phantom", tmp_path / "x", size="32,32")
    with pytest.raises(ValueError, match="every_k"):
        build_dataset("phantom", tmp_path / "x", every_k=0)
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "mine.nii.gz").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="refusing"):
        build_dataset("phantom", foreign)
    assert (foreign / "images" / "mine.nii.gz").read_bytes() == b"not ours"


def test_phantom_loads_with_monai_and_previews(tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    summary = build_dataset("phantom", tmp_path / "p", n_pos=3, n_neg=3, seed=0, preview=True)
    items = load_decathlon_datalist(str(summary.datalist), data_list_key="training")
    loaded = LoadImaged(keys=["image", "annotation", "mask"], allow_missing_keys=True,
                        ensure_channel_first=True)(items[0])
    assert tuple(loaded["image"].shape) == (1, 32, 32, 16)
    assert loaded["annotation"].sum() > 0
    png = Path(summary.preview)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width = matplotlib.image.imread(png).shape[:2]
    assert width > height > 300  # two rows (positives, negatives) of three columns


# --- lung CT: pieces that need no download ---------------------------------------------------------------


def test_resampled_size_never_leaves_the_field_of_view():
    from due_ext.data.builders.lung_ct import resampled_size

    assert resampled_size((512, 512, 48), (0.5703125, 0.5703125, 5.0), (1.25, 1.25, 2.5)) == [234, 234, 95]
    # rounding (48 * 5 / 2.5 = 96) would sample a 96th slice past the last original one
    assert resampled_size((10,), (5.0,), (2.5,)) == [19]


def test_lung_mask_on_a_synthetic_chest():
    from due_ext.data.builders.lung_ct import hu_to_unit, lung_mask

    x, y, z = np.meshgrid(np.arange(60), np.arange(50), np.arange(20), indexing="ij")
    hu = np.full((60, 50, 20), -1000.0)  # outside air touching the border
    body = ((x - 30) / 27) ** 2 + ((y - 25) / 22) ** 2 <= 1
    hu[body] = 40.0
    right = ((x - 18) / 9) ** 2 + ((y - 25) / 12) ** 2 <= 1
    left = ((x - 42) / 9) ** 2 + ((y - 25) / 12) ** 2 <= 1
    hu[right | left] = -850.0
    hu[(x == 18) & (y == 25)] = 30.0  # a vessel: closed into the lung
    gas = ((x - 30) ** 2 + (y - 8) ** 2 <= 4) & (z < 5)  # bowel-gas-like pocket, tiny: dropped
    hu[gas] = -900.0
    mask = lung_mask(hu)
    assert mask[right | left].all()
    assert not mask[~body].any() and not mask[gas].any()
    np.testing.assert_allclose(hu_to_unit(np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0])),
                               [0.0, 0.0, 0.5, 1.0, 1.0])


# --- cache / fetch ---------------------------------------------------------------------------------------


def _tarball(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return path


def test_extract_takes_only_the_lung_files(tmp_path):
    from due_ext.data.cache import LUNG_FILES, FetchError, _extract_data_files

    prefix = "pyradiomics-3.0.1/data/"
    members = {prefix + name: name.encode() for name in LUNG_FILES if name != "lung2_label.nrrd"}
    members[prefix + "../../../evil.txt"] = b"x"
    members[prefix + "brain1_image.nrrd"] = b"x"
    tarball = _tarball(tmp_path / "t.tar.gz", members, link=prefix + "lung2_label.nrrd")
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(FetchError, match="lung2_label.nrrd"):  # the symlink is not taken for the file
        _extract_data_files(tarball, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(n for n in LUNG_FILES if n != "lung2_label.nrrd")
    assert not (tmp_path / "evil.txt").exists() and not list(tmp_path.rglob("evil.txt"))
    assert (target / "lung1_image.nrrd").read_bytes() == b"lung1_image.nrrd"


def test_fetch_errors_are_clear(tmp_path, monkeypatch):
    from due_ext.data import cache

    monkeypatch.setenv("DUE_EXT_CACHE", str(tmp_path / "cache"))
    assert cache.cache_dir() == tmp_path / "cache"
    monkeypatch.setattr(cache.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: network unreachable"))
    with pytest.raises(cache.FetchError, match="Offline.*cache") as err:
        cache.fetch_pyradiomics_data()
    assert "network unreachable" in str(err.value)
    (tmp_path / "cache" / cache.PYRADIOMICS_SDIST).write_bytes(b"not the sdist")
    with pytest.raises(cache.FetchError, match="SHA-256"):
        cache.fetch_pyradiomics_data()
    assert not list((tmp_path / "cache").glob("pyradiomics-*-data"))  # nothing half-extracted
    with pytest.raises(cache.FetchError, match="Offline.*nilearn-0.14.1-py3-none-any.whl"):
        cache.fetch_icbm152_tissue_maps()  # the wheel's fetch: same messages
    (tmp_path / "cache" / cache.NILEARN_WHEEL).write_bytes(b"not the wheel")
    with pytest.raises(cache.FetchError, match="SHA-256"):
        cache.fetch_icbm152_tissue_maps()
    assert not list((tmp_path / "cache").glob("nilearn-*-icbm152"))


# --- lung CT: a real (small) build; downloads pyradiomics 3.0.1 once into the cache ----------------------


@pytest.mark.slow
def test_lung_ct_build(tmp_path):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    from due_ext.data.builders.lung_ct import crop, hu_to_unit, load_chest_ct

    size = (32, 32, 16)
    summary = build_dataset("lung-ct", tmp_path / "l", n_pos=3, n_neg=4, size="32,32,16", every_k=2, seed=0)
    path = Path(summary.datalist)
    datalist = json.loads(path.read_text())
    assert check_datalist(path).problems == []
    assert "two CT subjects" in str(summary) and any("two" in n for n in datalist["builder"]["notes"])
    cts = {name: load_chest_ct(name) for name in ("lung1", "lung2")}
    boxes = {}
    for section, subject in (("training", "lung1"), ("validation", "lung1"), ("test", "lung2")):
        items = datalist[section]
        assert {it["label"] for it in items} == {0, 1}, section
        assert {it["subject"] for it in items} == {subject}, section
        boxes[section] = [np.asarray(it["crop_start"]) for it in items]
        loaded = [LoadImaged(keys=["image", "annotation", "mask"], allow_missing_keys=True,
                             ensure_channel_first=True)(it)
                  for it in load_decathlon_datalist(str(path), data_list_key=section)]
        assert all(tuple(d["image"].shape) == (1, *size) for d in loaded)
        for item in items:
            ct = cts[item["subject"]]
            start = np.asarray(item["crop_start"])
            image, affine = read_nifti(path.parent / item["image"])
            np.testing.assert_allclose(affine, ct.crop_affine(start))
            assert not crop(ct.tumour, start, size).any()  # crops never show the real tumour
            if item["label"] == 0:
                np.testing.assert_array_equal(image, hu_to_unit(crop(ct.hu, start, size)))
                continue
            mask = read_nifti(path.parent / item["mask"])[0].astype(bool)
            annotation = read_nifti(path.parent / item["annotation"])[0]
            lung = crop(ct.lung, start, size)
            assert mask.any() and lung[mask].all()  # the nodule lies inside the lung
            assert all(annotation[..., z].any() for z in item["annotated_slices"])
            # the nodule (0-60 HU) is much denser than the lung around it (about -850 HU)
            assert image[mask].mean() > hu_to_unit(np.array(-300.0)) > image[lung & ~mask].mean()
    # training and validation crops (same subject) never overlap
    for a in boxes["training"]:
        for b in boxes["validation"]:
            assert np.any((a + size <= b) | (b + size <= a))
    again = build_dataset("lung-ct", tmp_path / "again", n_pos=3, n_neg=4, size="32,32,16", every_k=2, seed=0)
    first, second = _arrays(path), _arrays(Path(again.datalist))
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)  # same seed -> identical arrays
    real = datalist["real_tumours"]
    assert [it["subject"] for it in real] == ["lung1", "lung2"] and {it["label"] for it in real} == {1}
    for item in real:
        mask = read_nifti(path.parent / item["mask"])[0]
        np.testing.assert_array_equal(mask, crop(cts[item["subject"]].tumour, item["crop_start"], size))
