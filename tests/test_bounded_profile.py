"""The lesion-bounded data set (``bounded`` builder) has the properties its docs claim, and the
``bundles/due/bounded.json`` profile trains through monai.bundle. Uses the pyradiomics chest CTs of the
download cache (fetched once, like the ``lung-ct`` build test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from due_ext.data.builders import build_dataset
from due_ext.data.builders.bounded import LESION_DIAMETER_MM, MARGIN, REAL_TUMOURS
from due_ext.data.nifti import read_nifti
from due_ext.data.validate import check_datalist

REPO = Path(__file__).resolve().parents[1]
SIZE = (24, 24, 24)  # at least 24 per axis: the lesion keeps half a voxel from every face (docs)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bounded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bounded") / "set"
    return Path(build_dataset("bounded", out, n_pos=6, n_neg=7, size=SIZE, every_k=1, seed=0).datalist)


def _items(path: Path, section: str, label: int) -> list[dict]:
    return [item for item in json.loads(path.read_text())[section] if item["label"] == label]


def _voxel_mm(path: Path, item: dict) -> np.ndarray:
    """Voxel size (mm) per axis read from the item's NIfTI affine."""
    affine = read_nifti(path.parent / item["image"])[1]
    return np.linalg.norm(affine[:3, :3], axis=0)


def test_datalist_is_valid_and_split_by_subject(bounded):
    assert check_datalist(bounded).problems == []
    payload = json.loads(bounded.read_text())
    assert any("two CT subjects" in note for note in payload["builder"]["notes"])
    for section, subject in (("training", "lung1"), ("validation", "lung1"), ("test", "lung2")):
        assert {it["subject"] for it in payload[section]} == {subject}
        assert {it["label"] for it in payload[section]} == {0, 1}
    # training and validation boxes (same CT) never overlap: they lie in the two X halves of lung1
    train_x = [it["box_start_mm"][0] + it["box_extent_mm"][0] for it in payload["training"]]
    val_x = [it["box_start_mm"][0] for it in payload["validation"]]
    low_first = max(train_x) <= min(val_x)
    high_first = max(it["box_start_mm"][0] + it["box_extent_mm"][0] for it in payload["validation"]) <= min(
        it["box_start_mm"][0] for it in payload["training"])
    assert low_first or high_first


def test_negatives_share_the_physical_sizes_of_the_positives(bounded):
    for section in ("training", "validation", "test"):
        positives, negatives = _items(bounded, section, 1), _items(bounded, section, 0)
        for pos, neg in zip(positives, negatives, strict=False):  # negative i takes positive i's box size
            np.testing.assert_allclose(neg["box_extent_mm"], pos["box_extent_mm"])
        for item in positives + negatives:
            # the affine's voxel size times the grid is the box (rounded to 1e-4 mm in the datalist)
            np.testing.assert_allclose(_voxel_mm(bounded, item) * np.asarray(SIZE), item["box_extent_mm"],
                                       atol=1e-3)
    # the one extra negative of training draws its own size from the same distribution: bounded by the
    # largest lesion times the largest margin
    extra = _items(bounded, "training", 0)[-1]
    assert max(extra["box_extent_mm"]) <= LESION_DIAMETER_MM[1] * MARGIN[1] + 1.0


def test_lesion_fills_the_crop_and_stays_inside_it(bounded):
    for section in ("training", "validation", "test"):
        for item in _items(bounded, section, 1):
            mask = read_nifti(bounded.parent / item["mask"])[0] > 0
            image = read_nifti(bounded.parent / item["image"])[0]
            faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[..., 0], mask[..., -1]]
            assert not any(face.any() for face in faces), item["mask"]  # margin >= 1.2: never touches the crop
            where = np.argwhere(mask)
            span = where.max(axis=0) - where.min(axis=0) + 1  # voxels per axis
            fraction = span / np.asarray(SIZE)
            # box = lesion box x margin in [1.2, 2.0]: the lesion spans 1/2.0 to 1/1.2 of every axis, give or
            # take one voxel of sampling at each end
            assert np.all(fraction >= 1 / MARGIN[1] - 2 / np.asarray(SIZE)), (item["mask"], fraction)
            assert np.all(fraction <= 1 / MARGIN[0] + 2 / np.asarray(SIZE)), (item["mask"], fraction)
            longest_mm = float((span * _voxel_mm(bounded, item)).max())
            assert LESION_DIAMETER_MM[0] - 2 * _voxel_mm(bounded, item).max() <= longest_mm
            assert longest_mm <= LESION_DIAMETER_MM[1] + _voxel_mm(bounded, item).max()
            # the lesion (0-60 HU, about 0.71-0.76 after the [-1000, 400] window) is denser than the lung around it
            assert image[mask].mean() > 0.5 > np.median(image[~mask])


def test_annotated_slices_are_the_acquired_slices(bounded):
    import SimpleITK as sitk

    from due_ext.data.cache import fetch_pyradiomics_data

    planes = {}
    for name in ("lung1", "lung2"):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(fetch_pyradiomics_data() / f"{name}_image.nrrd"))
        reader.ReadImageInformation()
        origin, spacing, depth = reader.GetOrigin()[2], reader.GetSpacing()[2], reader.GetSize()[2]
        planes[name] = origin + spacing * np.arange(depth)  # world Z (LPS and RAS agree on Z)
    for section in ("training", "validation", "test", REAL_TUMOURS):
        for item in _items(bounded, section, 1):
            affine = read_nifti(bounded.parent / item["image"])[1]
            mask = read_nifti(bounded.parent / item["mask"])[0] > 0
            annotation = read_nifti(bounded.parent / item["annotation"])[0] > 0
            slice_z = affine[2, 2] * np.arange(SIZE[2]) + affine[2, 3]  # world Z of each output slice
            half = 0.5 * abs(affine[2, 2])
            # every acquired slice inside the crop maps to its nearest output slice; with every_k = 1 the
            # annotated ones are exactly those holding lesion
            inside = [z for z in planes[item["subject"]] if slice_z.min() - half <= z <= slice_z.max() + half]
            nearest = {int(np.argmin(np.abs(slice_z - z))) for z in inside}
            expected = sorted(k for k in nearest if mask[..., k].any())
            assert item["annotated_slices"] == expected and expected, item["image"]
            np.testing.assert_array_equal(annotation[..., expected], mask[..., expected])
            others = [k for k in range(SIZE[2]) if k not in expected]
            assert not annotation[..., others].any()


def test_every_k_keeps_fewer_acquired_slices(tmp_path, bounded):
    sparser = Path(build_dataset("bounded", tmp_path / "k2", n_pos=6, n_neg=7, size=SIZE, every_k=2,
                                 seed=0).datalist)
    for dense, sparse in zip(_items(bounded, "training", 1), _items(sparser, "training", 1), strict=True):
        assert dense["box_extent_mm"] == sparse["box_extent_mm"]  # the same crops, only fewer slices drawn
        kept = dense["annotated_slices"][::2]
        assert sparse["annotated_slices"] == sorted(set(kept) | {dense["annotated_slices"][-1]})


def test_margin_and_jitter_move_the_lesion_off_the_centre(tmp_path, bounded):
    wide = Path(build_dataset("bounded", tmp_path / "wide", n_pos=6, n_neg=7, size=SIZE, every_k=1, seed=0,
                              margin=(2.5, 2.5), jitter=1.0).datalist)

    def offsets_and_spans(path: Path) -> tuple[np.ndarray, np.ndarray]:
        offsets, spans = [], []
        for item in _items(path, "training", 1) + _items(path, "test", 1):
            where = np.argwhere(read_nifti(path.parent / item["mask"])[0] > 0)
            offsets.append(np.abs(where.mean(axis=0) - (np.asarray(SIZE) - 1) / 2) / np.asarray(SIZE))
            spans.append((where.max(axis=0) - where.min(axis=0) + 1) / np.asarray(SIZE))
        return np.asarray(offsets), np.asarray(spans)

    default_offsets, _ = offsets_and_spans(bounded)
    offsets, spans = offsets_and_spans(wide)
    # extent = 2.5 x the box: the lesion spans 1/2.5 of every axis, give or take a voxel at each end
    assert np.all(np.abs(spans - 1 / 2.5) <= 2 / np.asarray(SIZE)), spans
    # jitter 0.5 keeps the centre within a quarter of the free room; jitter 1 with more room moves it further
    assert offsets.mean() > 1.5 * default_offsets.mean(), (offsets.mean(), default_offsets.mean())
    assert json.loads(wide.read_text())["builder"]["parameters"]["margin"] == [2.5, 2.5]


@pytest.mark.parametrize("name, options, message", [
    ("bounded", {"margin": (0.9, 2.0)}, "margin"), ("bounded", {"margin": (2.0, 1.5)}, "margin"),
    ("bounded", {"margin": 2.0}, "two numbers"), ("bounded", {"margin": (1.5, 2.0, 3.0)}, "two numbers"),
    ("bounded", {"jitter": 1.5}, "jitter"), ("phantom", {"jitter": 0.5}, "bounded builder only")])
def test_bad_placement_options_are_rejected(tmp_path, name, options, message):
    with pytest.raises(ValueError, match=message):
        build_dataset(name, tmp_path / "bad", n_pos=6, n_neg=7, size=SIZE, **options)


def test_demo_datalist_builds_the_bounded_set(tmp_path, bounded):
    from due_ext.bundles import demo_datalist

    path = Path(demo_datalist("bounded", seed=0, size="24,24,24", n_pos=6, n_neg=7, every_k=1,
                              root=str(tmp_path / "demo")))
    for section in ("training", "test"):  # same parameters and seed: identical arrays
        for ours, theirs in zip(json.loads(path.read_text())[section], json.loads(bounded.read_text())[section],
                                strict=True):
            np.testing.assert_array_equal(read_nifti(path.parent / ours["image"])[0],
                                          read_nifti(bounded.parent / theirs["image"])[0])


def test_profile_trains_through_monai_bundle(tmp_path, bounded):
    from monai.bundle import ConfigParser

    configs = [str(REPO / "bundles" / "due" / "train.json"), str(REPO / "bundles" / "due" / "bounded.json")]
    parser = ConfigParser()
    parser.read_config(configs)
    assert parser["demo_dataset"] == "bounded" and parser["target_layer"] == "layer3"
    root = tmp_path / "bundle"
    root.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", str(configs),
                          "--bundle_root", str(root), "--datalist", str(bounded), "--method", "baseline_plus",
                          "--max_epochs", "1", "--block_inplanes", "[4, 8, 8, 8]"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((root / "eval" / "baseline_plus" / "test" / "metrics.json").read_text())
    assert metrics["n_positives"] == len(_items(bounded, "test", 1))
    assert list((root / "models").rglob("model.pt"))  # the best model was saved
