"""The preprocessing chain for raw scans: sparse annotations through orientation and spacing (hand-checked Z
remapping), the intensity steps, crop or pad, the Grad-CAM back on the input grid, and a tiny raw CT through
the DUE bundle (train, then inference) with the raw-scan profile ``bundles/due/raw_ct.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Spacingd

from due_ext.data.axes import foreground_slices
from due_ext.data.nifti import write_nifti
from due_ext.data.preprocessing import (
    PlaceSparseSlicesd,
    cam_on_input_grid,
    cams_on_input_grid,
    intensity_transform,
    preprocessing_transforms,
)
from due_ext.data.transforms import ANNOTATED_MASK, SparseAnnotationd, nearest_slices
from due_ext.data.validate import DatalistError

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "due"


def _write_case(folder: Path, image: np.ndarray, affine: np.ndarray, annotation: np.ndarray | None = None,
                name: str = "case") -> dict:
    item = {"image": str(write_nifti(folder / f"{name}_image.nii.gz", image.astype(np.float32), affine)),
            "label": 0}
    if annotation is not None:
        item.update(annotation=str(write_nifti(folder / f"{name}_annotation.nii.gz", annotation.astype(np.uint8),
                                               affine)),
                    annotated_slices=foreground_slices(annotation), label=1)
    return item


def _striped_annotation(shape: tuple[int, int, int], slices: list[int]) -> np.ndarray:
    """Foreground on ``slices`` only, a different block per slice (its rows 0..z), so that a slice that moved
    to the wrong place is seen."""
    annotation = np.zeros(shape, np.uint8)
    for z in slices:
        annotation[: z + 1, 1:3, z] = 1
    return annotation


def _z_affine(spacing_z: float, origin_z: float = -7.0) -> np.ndarray:
    affine = np.diag([1.0, 1.0, spacing_z, 1.0])
    affine[2, 3] = origin_z
    return affine


def _run(item: dict, **profile) -> dict:
    return preprocessing_transforms(["image", "annotation"], keep_slices=True, **profile)(item)


# ---------------------------------------------------------------------------------------------------------------
# the Z rule


def test_nearest_slices_rounds_to_the_nearest_and_keeps_the_nearer_of_a_collision():
    # 0.4 -> 0, 0.6 -> 1, 2.5 -> 3 (halves go up), -0.7 and 9.2 clamp to the ends (0 and 3)
    assert nearest_slices({0: 0.4, 1: 2.5}, 4) == {0: 0, 3: 1}
    assert nearest_slices({5: 9.2}, 4) == {3: 5}
    # 0.6 and 1.3 both land on 1: 1.3 is nearer (0.3 < 0.4); -0.7 clamps to 0 beside 0.1: 0.1 wins
    assert nearest_slices({2: 0.6, 3: 1.3, 7: -0.7, 8: 0.1}, 4) == {0: 8, 1: 3}
    # halves go up (0.5 -> 1, 1.5 -> 2); a tie on one slice (0.75 and 1.25, both 0.25 from 1): the lower source
    assert nearest_slices({4: 0.5, 6: 1.5}, 3) == {1: 4, 2: 6}
    assert nearest_slices({6: 1.25, 4: 0.75}, 3) == {1: 4}


def test_upsampling_along_z_puts_each_annotated_slice_on_one_new_slice(tmp_path):
    # 6 slices of 5 mm -> 2.5 mm: MONAI keeps the first slice centre, so 11 slices and stored z -> new 2z.
    shape = (6, 5, 6)
    annotation = _striped_annotation(shape, [1, 4])
    item = _write_case(tmp_path, np.zeros(shape), _z_affine(5.0), annotation)
    out = _run(item, spacing=[1.0, 1.0, 2.5])
    assert out["image"].shape[1:] == (6, 5, 11)
    assert out["annotated_slices"] == [2, 8]
    assert foreground_slices(out[ANNOTATED_MASK].numpy()) == [2, 8]
    assert out[ANNOTATED_MASK][0, :, :, [2, 8]].eq(1).all()
    placed = out["annotation"][0].numpy()
    np.testing.assert_array_equal(placed[..., 2], annotation[..., 1])
    np.testing.assert_array_equal(placed[..., 8], annotation[..., 4])
    assert foreground_slices(placed) == [2, 8]  # nothing copied into the neighbours 1, 3, 7, 9
    # what plain nearest resampling would have done: the drawing of slice 1 copied to more than one new slice
    loaded = MetaTensor(torch.as_tensor(annotation[None], dtype=torch.float32), affine=torch.as_tensor(_z_affine(5.0)))
    nearest = Spacingd("a", pixdim=[1.0, 1.0, 2.5], mode="nearest")({"a": loaded})["a"]
    assert len(foreground_slices(nearest[0].numpy())) > 2


def test_downsampling_along_z_keeps_every_annotated_slice_nearest_resampling_would_miss(tmp_path):
    # 12 slices of 1 mm -> 3 mm: 5 slices, stored z -> new z / 3. Slices 1, 4, 7, 10 sit at 0.33, 1.33, 2.33,
    # 3.33: new slices 0, 1, 2, 3. Nearest resampling samples stored 0, 3, 6, 9, 12: none is annotated.
    shape = (12, 4, 12)
    annotation = _striped_annotation(shape, [1, 4, 7, 10])
    item = _write_case(tmp_path, np.zeros(shape), _z_affine(1.0), annotation)
    out = _run(item, spacing=[1.0, 1.0, 3.0])
    assert out["image"].shape[-1] == 5
    assert out["annotated_slices"] == [0, 1, 2, 3]
    assert foreground_slices(out[ANNOTATED_MASK].numpy()) == [0, 1, 2, 3]
    for new, stored in zip([0, 1, 2, 3], [1, 4, 7, 10], strict=True):
        np.testing.assert_array_equal(out["annotation"][0, ..., new].numpy(), annotation[..., stored])
    loaded = MetaTensor(torch.as_tensor(annotation[None], dtype=torch.float32), affine=torch.as_tensor(_z_affine(1.0)))
    nearest = Spacingd("a", pixdim=[1.0, 1.0, 3.0], mode="nearest")({"a": loaded})["a"]
    assert foreground_slices(nearest[0].numpy()) == []


def test_two_annotated_slices_on_one_new_slice_keep_the_nearer(tmp_path):
    # 12 slices of 1 mm -> 4 mm: 4 slices, stored z -> z / 4: 0 -> 0, 3 -> 0.75 -> 1, 6 -> 1.5 -> 2, 9 -> 2.25 -> 2;
    # on new slice 2, stored 9 (0.25 away) beats stored 6 (0.5 away)
    shape = (12, 4, 12)
    annotation = _striped_annotation(shape, [0, 3, 6, 9])
    out = _run(_write_case(tmp_path, np.zeros(shape), _z_affine(1.0), annotation), spacing=[1.0, 1.0, 4.0])
    assert out["annotated_slices"] == [0, 1, 2]
    np.testing.assert_array_equal(out["annotation"][0, ..., 2].numpy(), annotation[..., 9])


def test_in_plane_spacing_of_the_annotation_matches_monai_nearest_on_coinciding_slices(tmp_path):
    # 0.7 x 0.7 x 5 mm -> 1.4 x 1.4 x 2.5: stored slice z and new slice 2z share their world position, so the
    # placed slice must equal MONAI's nearest resampling of the full annotation there
    shape = (21, 19, 6)  # odd: 20 and 18 intervals of 0.7 mm make whole numbers of 1.4 mm ones
    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    annotation = np.zeros(shape, np.uint8)
    annotation[5:12, 3:9, 1] = 1
    annotation[9:17, 8:15, 4] = 1
    item = _write_case(tmp_path, np.zeros(shape), affine, annotation)
    out = _run(item, spacing=[1.4, 1.4, 2.5])
    stored = torch.as_tensor(nib.load(item["annotation"]).affine)  # as the chain read it (float32 header)
    loaded = MetaTensor(torch.as_tensor(annotation[None], dtype=torch.float32), affine=stored)
    nearest = Spacingd("a", pixdim=[1.4, 1.4, 2.5], mode="nearest")({"a": loaded})["a"]
    assert out["annotated_slices"] == [2, 8]
    for new in (2, 8):
        torch.testing.assert_close(out["annotation"][0, ..., new].as_tensor(), nearest[0, ..., new].as_tensor())
    torch.testing.assert_close(out["annotation"].affine, out["image"].affine)


def test_lps_to_ras_flips_the_annotation_in_plane_and_keeps_its_slices(tmp_path):
    shape = (8, 6, 5)
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[:3, 3] = [7.0, 5.0, 0.0]  # LPS: RAS orientation reverses X and Y, the world grid stays the same
    annotation = _striped_annotation(shape, [1, 3])
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    out = _run(_write_case(tmp_path, image, affine, annotation), orientation="RAS")
    np.testing.assert_allclose(out["image"].affine.numpy(), np.diag([1.0, 1.0, 2.0, 1.0]))
    np.testing.assert_array_equal(out["image"][0].numpy(), image[::-1, ::-1, :])
    assert out["annotated_slices"] == [1, 3]
    np.testing.assert_array_equal(out["annotation"][0].numpy(), annotation[::-1, ::-1, :])
    assert foreground_slices(out[ANNOTATED_MASK].numpy()) == [1, 3]


def test_a_reversed_z_axis_reverses_the_annotated_slices(tmp_path):
    shape = (4, 4, 5)
    affine = np.diag([1.0, 1.0, -2.0, 1.0])
    affine[2, 3] = 8.0  # stored slice z at 8 - 2z mm: RAS puts it at new index 4 - z
    annotation = _striped_annotation(shape, [0, 3])
    out = _run(_write_case(tmp_path, np.zeros(shape), affine, annotation), orientation="RAS")
    assert out["annotated_slices"] == [1, 4]
    np.testing.assert_array_equal(out["annotation"][0, ..., 4].numpy(), annotation[..., 0])
    np.testing.assert_array_equal(out["annotation"][0, ..., 1].numpy(), annotation[..., 3])


def test_slices_drawn_along_a_stored_axis_that_is_not_axial(tmp_path):
    # stored axes: X -> R, Y -> S, Z -> A (a coronal stack); RAS moves the drawn axis to Y: a clear error.
    shape = (6, 5, 4)
    affine = np.array([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
    annotation = _striped_annotation(shape, [1, 2])
    item = _write_case(tmp_path, np.zeros(shape), affine, annotation)
    with pytest.raises(RuntimeError) as raised:  # MONAI's Compose wraps a transform's error, keeping it as cause
        _run(item, orientation="RAS")
    assert isinstance(raised.value.__cause__, DatalistError)
    assert "case_annotation.nii.gz: the annotated slices index the stored last axis" in str(raised.value.__cause__)
    # keeping the stored axes (orientation null) keeps the drawn axis as Z
    out = _run(item, orientation=None, spacing=[1.0, 1.0, 0.5])
    assert out["annotated_slices"] == [2, 4]


def test_place_sparse_slices_passes_negatives_and_keeps_collation_metadata(tmp_path):
    shape = (6, 5, 6)
    negative = _write_case(tmp_path, np.zeros(shape), _z_affine(5.0), name="neg")
    positive = _write_case(tmp_path, np.zeros(shape), _z_affine(5.0), _striped_annotation(shape, [1, 4]), "pos")
    chain = preprocessing_transforms(["image", "annotation"], spacing=[1.0, 1.0, 2.5], orientation="RAS")
    batch = list_data_collate([chain(positive), chain(negative)])
    assert batch["annotation"].shape == (2, 1, 6, 5, 11) and batch["has_annotation"].tolist() == [1.0, 0.0]
    negative_item = {"image": batch["image"][1]}
    passed = PlaceSparseSlicesd()(negative_item)
    assert list(passed) == ["image"] and passed["image"] is negative_item["image"]


# ---------------------------------------------------------------------------------------------------------------
# intensity and size


def test_ct_window_maps_hu_to_unit_range():
    hu = torch.tensor([[-1200.0, -1000.0, -300.0, 400.0, 1500.0]])
    out = intensity_transform({"ct": [-1000, 400]})({"image": hu})["image"]
    # (clip(hu) + 1000) / 1400: -300 HU is exactly half way
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.5, 1.0, 1.0]]))


def test_mr_percentiles_map_to_unit_range():
    values = torch.arange(101, dtype=torch.float32)[None]  # percentile p of 0..100 is p itself
    out = intensity_transform({"mr": [10, 90]})({"image": values})["image"]
    expected = ((values - 10) / 80).clamp(0, 1)
    # float32 division of integers < 128: within a few ulps of 1
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("intensity", [{"ct": [400, -1000]}, {"pet": [0, 1]}, {"ct": [0, 1], "mr": [1, 99]},
                                       {"mr": [1, 120]}, [0, 1]])
def test_bad_intensity_settings_are_refused(intensity):
    with pytest.raises(ValueError, match="intensity"):
        intensity_transform(intensity)


def test_bad_chain_settings_are_refused():
    with pytest.raises(ValueError, match="size_mode"):
        preprocessing_transforms(["image"], size_mode="stretch")
    with pytest.raises(ValueError, match="spacing"):
        preprocessing_transforms(["image"], spacing=[1.0, 0.0, 2.0])


def test_crop_or_pad_shifts_the_annotated_slices(tmp_path):
    # Z 10 -> 6: ResizeWithPadOrCrop drops (10 - 6) // 2 = 2 slices in front: 4 -> 2; 0 and 8 are cut away
    shape = (4, 4, 10)
    annotation = _striped_annotation(shape, [0, 4, 8])
    out = _run(_write_case(tmp_path, np.zeros(shape), np.eye(4), annotation, "crop"), size=[4, 4, 6],
               size_mode="crop_or_pad")
    assert out["annotated_slices"] == [2]
    np.testing.assert_array_equal(out["annotation"][0, ..., 2].numpy(), annotation[..., 4])
    # Z 4 -> 8: (8 - 4) // 2 = 2 empty slices in front: 1 -> 3, 3 -> 5; voxel size kept
    shape = (4, 4, 4)
    out = _run(_write_case(tmp_path, np.zeros(shape), np.diag([2.0, 2.0, 3.0, 1.0]),
                           _striped_annotation(shape, [1, 3]), "pad"), size=[4, 4, 8], size_mode="crop_or_pad")
    assert out["annotated_slices"] == [3, 5]
    np.testing.assert_allclose(np.diag(out["image"].affine.numpy())[:3], [2.0, 2.0, 3.0])


def test_default_chain_is_the_identity_on_stored_data(tmp_path):
    """No profile step: the chain returns the stored arrays and affines (the demo data's behaviour)."""
    shape = (6, 5, 4)
    affine = np.diag([-1.25, -1.25, 2.5, 1.0])
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    annotation = _striped_annotation(shape, [1, 3])
    out = _run(_write_case(tmp_path, image, affine, annotation))
    np.testing.assert_array_equal(out["image"][0].numpy(), image)
    np.testing.assert_allclose(out["image"].affine.numpy(), affine)
    assert out["annotated_slices"] == [1, 3] and out["image"].applied_operations == []
    expected = SparseAnnotationd()({"annotation": torch.as_tensor(annotation[None]), "annotated_slices": [1, 3]})
    np.testing.assert_array_equal(out["annotation"][0].numpy(), expected["annotation"][0].numpy())


# ---------------------------------------------------------------------------------------------------------------
# the CAM back on the input grid

RAW_SHAPE = (40, 36, 6)


def _raw_affine() -> np.ndarray:
    """LPS storage (as DICOM/ITK write it), 0.7 x 0.7 x 5 mm, an origin off zero."""
    affine = np.diag([-0.7, -0.7, 5.0, 1.0])
    affine[:3, 3] = [12.0, -4.0, -30.0]
    return affine


@pytest.mark.parametrize("size_mode", ["crop_or_pad", "resample"])
def test_cam_goes_back_to_the_input_shape_and_affine(tmp_path, size_mode):
    item = _write_case(tmp_path, np.full(RAW_SHAPE, -500.0), _raw_affine())
    chain = preprocessing_transforms(["image"], size=[16, 16, 8], orientation="RAS", spacing=[1.4, 1.4, 2.5],
                                     intensity={"ct": [-1000, 400]}, size_mode=size_mode)
    batch = list_data_collate([chain(dict(item))])
    assert batch["image"].shape == (1, 1, 16, 16, 8)
    cam = torch.full((1, 16, 16, 8), 0.5)
    [on_input] = cams_on_input_grid(cam, batch["image"], chain)
    assert on_input.shape == RAW_SHAPE
    np.testing.assert_allclose(on_input.affine.numpy(), _raw_affine(), atol=1e-5)
    if size_mode == "resample":  # a constant map stays constant through every linear resampling
        torch.testing.assert_close(on_input.as_tensor(), torch.full(RAW_SHAPE, 0.5))


def test_in_memory_chain_matches_the_file_chain_and_maps_back_the_same(tmp_path):
    # MONAI Deploy hands the bundle operator the loaded (X, Y, Z) array with its affine, not a path
    rng = np.random.default_rng(0)
    volume = rng.uniform(-1000, 400, RAW_SHAPE)
    item = _write_case(tmp_path, volume, _raw_affine())
    profile = {"size": [16, 16, 8], "orientation": "RAS", "spacing": [1.4, 1.4, 2.5], "intensity": {"ct": [-1000, 400]}}
    from_file = preprocessing_transforms(["image"], **profile)
    in_memory = preprocessing_transforms(["image"], loaded=True, **profile)
    loaded = MetaTensor(torch.as_tensor(volume, dtype=torch.float32), affine=torch.as_tensor(_raw_affine()))
    ours, theirs = in_memory({"image": loaded})["image"], from_file(dict(item))["image"]
    torch.testing.assert_close(ours.as_tensor(), theirs.as_tensor(), atol=1e-5, rtol=0)
    cam = torch.rand(16, 16, 8)
    back = cam_on_input_grid(cam, ours, in_memory)
    [reference] = cams_on_input_grid(cam[None], list_data_collate([{"image": theirs}])["image"], from_file)
    assert back.shape == RAW_SHAPE
    np.testing.assert_allclose(back.affine.numpy(), _raw_affine(), atol=1e-5)
    torch.testing.assert_close(back.as_tensor(), reference.as_tensor(), atol=1e-5, rtol=0)


def test_cam_on_input_grid_needs_the_preprocessed_metatensor():
    with pytest.raises(ValueError, match="preprocessed MetaTensor"):
        cam_on_input_grid(torch.rand(4, 4, 4), torch.rand(1, 4, 4, 4), preprocessing_transforms(["image"]))


def test_cam_peak_lands_on_the_same_world_point(tmp_path):
    item = _write_case(tmp_path, np.zeros(RAW_SHAPE), _raw_affine())
    chain = preprocessing_transforms(["image"], size=[16, 16, 8], orientation="RAS", spacing=[1.4, 1.4, 2.5],
                                     size_mode="crop_or_pad")
    batch = list_data_collate([chain(dict(item))])
    peak = (11, 4, 5)  # network voxel; its world point, mapped to the input's voxels, must hold the maximum
    grid = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (16, 16, 8)), indexing="ij"))
    cam = torch.exp(-((grid - torch.tensor(peak, dtype=torch.float32)[:, None, None, None]) ** 2).sum(0) / 2.0)
    [on_input] = cams_on_input_grid(cam[None], batch["image"], chain)
    world = batch["image"].affine[0].numpy() @ np.array([*peak, 1.0])
    expected = np.linalg.solve(_raw_affine(), world)[:3]
    found = np.unravel_index(int(on_input.argmax()), RAW_SHAPE)
    # the input grid is finer (0.7 mm in-plane, 5 mm in Z against 2.5): the maximum sits within one input
    # voxel of the point in-plane and on the nearest slice along Z
    assert np.abs(np.asarray(found) - expected).max() <= 1.0, (found, expected)


# ---------------------------------------------------------------------------------------------------------------
# the raw-scan profile through the bundle: tiny raw CTs, train, inference


def _raw_ct_dataset(folder: Path, seed: int = 0) -> Path:
    """Raw-like CTs: LPS, 0.7 x 0.7 x 5 mm, HU (air -1000, soft tissue ~ 40); positives carry a bright
    ellipsoid drawn on every 2nd of its slices."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in RAW_SHAPE), indexing="ij")
    sections: dict[str, list] = {}
    count = 0
    for section, labels in {"training": [1, 1, 0, 0], "validation": [1, 0], "test": [1, 0]}.items():
        sections[section] = []
        for label in labels:
            image = rng.normal(-700.0, 40.0, RAW_SHAPE)
            annotation = None
            if label:
                centre = (rng.uniform(14, 26), rng.uniform(12, 24), rng.uniform(2, 3))
                lesion = ((x - centre[0]) / 6) ** 2 + ((y - centre[1]) / 6) ** 2 + ((z - centre[2]) / 1.6) ** 2 <= 1
                image[lesion] = 40.0
                annotation = np.zeros(RAW_SHAPE, np.uint8)
                drawn = foreground_slices(lesion)[::2]
                annotation[..., drawn] = lesion[..., drawn]
            item = _write_case(folder, image, _raw_affine(), annotation, name=f"case_{count:02d}")
            sections[section].append({k: (os.path.basename(v) if isinstance(v, str) else v) for k, v in item.items()})
            count += 1
    path = folder / "datalist.json"
    path.write_text(json.dumps({"name": "raw", **sections}))
    return path


TINY = ["--method", "baseline_plus", "--max_epochs", "1", "--block_inplanes", "[4, 8, 8, 8]", "--batch_size", "2",
        "--spatial_size", "[16, 16, 8]"]


def _bundle(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DUE_EXT_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], capture_output=True, text=True,
                         cwd=REPO, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_raw_ct_profile_trains_and_infers_on_the_input_grid(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _raw_ct_dataset(data)
    root = tmp_path / "bundle"
    root.mkdir()
    profile = str(BUNDLE / "raw_ct.json")
    models = root / "models" / "raw"
    _bundle(["--config_file", json.dumps([str(BUNDLE / "train.json"), profile]), "--bundle_root", str(root),
             "--datalist", str(data / "datalist.json"), "--ckpt_dir", str(models), *TINY], tmp_path)
    assert (models / "model.pt").is_file()
    metrics = json.loads((root / "eval" / "baseline_plus" / "test" / "metrics.json").read_text())
    assert metrics["n_positives"] == 1

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    source = data / "case_06_image.nii.gz"  # the test positive
    (inputs / source.name).write_bytes(source.read_bytes())
    _bundle(["--config_file", json.dumps([str(BUNDLE / "inference.json"), profile]), "--bundle_root", str(root),
             "--input_dir", str(inputs), "--ckpt_dir", str(models), "--block_inplanes", "[4, 8, 8, 8]",
             "--spatial_size", "[16, 16, 8]"], tmp_path)
    out = root / "eval" / "inference"
    predictions = json.loads((out / "predictions.json").read_text())
    assert sum(predictions["case_06_image"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    cam = nib.load(str(out / "case_06_image_gradcam.nii.gz"))
    assert cam.shape == RAW_SHAPE
    np.testing.assert_allclose(cam.affine, nib.load(str(source)).affine, atol=1e-5)


def test_inference_cam_peak_is_the_bright_spot_of_a_raw_scan(tmp_path):
    """A network whose Grad-CAM is its (windowed) input: identity 1x1x1 convolution as the target layer, then
    global average pooling and a linear head that predicts "lesion" for any bright input (positive channel
    weight, so alpha > 0 and the CAM is the normalised windowed image). The CAM on the input grid must peak
    on the bright block of the raw file, whatever the chain did (flip to RAS, spacing, crop)."""
    from monai.bundle import ConfigWorkflow

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = np.full(RAW_SHAPE, -1000.0)
    block = (slice(26, 30), slice(8, 12), slice(3, 4))  # off-centre: a wrong flip puts the peak elsewhere
    image[block] = 400.0
    write_nifti(inputs / "raw.nii.gz", image.astype(np.float32), _raw_affine())
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.AdaptiveAvgPool3d(1), torch.nn.Flatten(),
                                  torch.nn.Linear(1, 2))
    with torch.no_grad():
        network[0].weight.fill_(1.0)
        network[0].bias.zero_()
        network[3].weight.copy_(torch.tensor([[-1.0], [1.0]]))
        network[3].bias.zero_()
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    torch.save(network.state_dict(), root / "models" / "model.pt")
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE / "inference.json"), str(BUNDLE / "raw_ct.json")], workflow_type="infer",
        bundle_root=str(root), input_dir=str(inputs), ckpt_dir=str(root / "models"), target_layer="0",
        spatial_size=[16, 16, 8], device="$torch.device('cpu')",
        network_def="$torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.AdaptiveAvgPool3d(1), "
                    "torch.nn.Flatten(), torch.nn.Linear(1, 2))")
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    cam = nib.load(str(root / "eval" / "inference" / "raw_gradcam.nii.gz"))
    values = np.asarray(cam.dataobj)
    assert cam.shape == RAW_SHAPE
    np.testing.assert_allclose(cam.affine, _raw_affine(), atol=1e-5)
    found = np.unravel_index(int(values.argmax()), RAW_SHAPE)
    assert all(s.start <= f < s.stop for f, s in zip(found, block, strict=True)), found
    # the block's centre is bright, far voxels dark (the CAM is the windowed image, resampled twice)
    assert values[27:29, 9:11, 3].min() > 0.5 and values[:10, 25:, :].max() < 0.1
