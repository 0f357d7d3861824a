"""What a DUE training run leaves for the people watching it, through monai.bundle on the tiny dataset: MONAI's
``--tracking mlflow`` (a local SQLite store), Grad-CAM overlays of validation positives in TensorBoard, each test
case's Grad-CAM as NIfTI on the case's own grid, and the initial-network floor in the test report."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from due_ext.report.figures import cam_overlay

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "due"
EPOCHS = 2
# the tiny data are stored RAS; training in LPS flips X and Y, so the test CAMs must be flipped back to be on the
# cases' grids
TINY = ["--method", "baseline_plus", "--max_epochs", str(EPOCHS), "--block_inplanes", "[4, 8, 8, 8]",
        "--orientation", "LPS"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, _tiny_dataset_master):
    tmp = tmp_path_factory.mktemp("tracking")
    root, store = tmp / "bundle", tmp / "mlflow"
    store.mkdir()
    env = dict(os.environ, DUE_EXT_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # it would take precedence over --tracking_uri
    uri = f"sqlite:///{store / 'mlruns.db'}"
    run = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "train.json"),
         "--bundle_root", str(root), "--datalist", str(_tiny_dataset_master), *TINY,
         "--tracking", "mlflow", "--tracking_uri", uri],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return root / "eval" / "baseline_plus", uri, _tiny_dataset_master


def _tensorboard(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0})
        events.Reload()
        yield events


def test_mlflow_tracks_the_training_loss_and_the_validation_metrics(tracked_run):
    from mlflow.tracking import MlflowClient

    run_dir, uri, _ = tracked_run
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("monai_experiment")
    runs = client.search_runs([experiment.experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("baseline_plus", "FINISHED")]  # DUE's run_name
    run_id = runs[0].info.run_id
    losses = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, EPOCHS + 1))  # one iteration per epoch on 4 items
    # the same numbers as TensorBoard's train_loss, which reads the trainer's output the same way
    scalars = {e.step: e.value for events in _tensorboard(run_dir) if "train_loss" in events.Tags()["scalars"]
               for e in events.Scalars("train_loss")}
    # TensorBoard stores float32: equal to float32 rounding of the float64 MLflow value
    assert [m.value for m in losses] == pytest.approx([scalars[m.step] for m in losses], rel=2 ** -23)
    for name in ("val_pr_auc", "val_roc_auc", "val_iou"):
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == list(range(1, EPOCHS + 1)), name
        assert all(0.0 <= m.value <= 1.0 for m in history), name


def test_validation_writes_cam_overlays_of_its_positives_to_tensorboard(tracked_run):
    from PIL import Image

    run_dir, _, datalist = tracked_run
    positives = [item for item in json.loads(datalist.read_text())["validation"] if item["label"] == 1]
    images = {tag: events.Images(tag) for events in _tensorboard(run_dir) for tag in events.Tags()["images"]}
    expected = {f"val_cam/{Path(item['image']).name.removesuffix('.nii.gz')}" for item in positives}
    assert set(images) == expected
    for records in images.values():
        assert [r.step for r in records] == list(range(1, EPOCHS + 1))  # every epoch, at the trainer's epoch
        picture = np.asarray(Image.open(io.BytesIO(records[-1].encoded_image_string)))
        assert picture.shape == (16, 16, 3)  # (Y, X) of the 16x16x8 validation case, RGB
        assert (picture == 255).all(-1).any()  # the lesion outline is drawn in white


def test_test_evaluation_writes_each_cam_on_its_case_grid(tracked_run):
    run_dir, _, datalist = tracked_run
    test_items = json.loads(datalist.read_text())["test"]
    cams = run_dir / "test" / "cams"
    predictions = json.loads((cams / "predictions.json").read_text())
    assert len(predictions) == len(test_items)
    recorded = np.load(run_dir / "test" / "evaluation.npz")
    for item in test_items:
        source = nib.load(str(datalist.parent / item["image"]))
        stem = Path(item["image"]).name.removesuffix(".nii.gz")
        cam = nib.load(str(cams / f"{stem}_gradcam.nii.gz"))
        assert cam.shape == source.shape
        np.testing.assert_allclose(cam.affine, source.affine, atol=1e-6)
        assert predictions[stem]["predicted"] in ("no_lesion", "lesion")
    # the positive's CAM on the network's (LPS) grid, kept for the report figure, is the written one flipped in X
    # and Y: a flip moves values without arithmetic, so they agree to float32 storage
    positive = next(item for item in test_items if item["label"] == 1)
    written = np.asarray(nib.load(str(cams / f"{Path(positive['image']).name.removesuffix('.nii.gz')}"
                                             "_gradcam.nii.gz")).dataobj)
    np.testing.assert_allclose(written, recorded["fig/cam"][0][::-1, ::-1], atol=1e-6)


def test_test_report_carries_the_initial_network_floor(tracked_run):
    run_dir, _, _ = tracked_run
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    floor = metrics["floors"]["initial_cam"]
    assert {"iou", "f1", "pointing_game", "energy_pointing_game", "mask_auroc", "iou_best_threshold"} <= set(floor)
    assert floor["iou"]["n"] == metrics["n_explained"] == 1


# ---------------------------------------------------------------------------------------------------------------
# the overlay picture


def test_cam_overlay_blends_the_cam_over_the_grey_image_and_outlines_the_mask():
    from matplotlib import colormaps

    image = np.arange(20.0).reshape(5, 4)  # (X, Y): min 0, max 19
    cam = np.zeros((5, 4))
    cam[3, 1] = 1.0
    mask = np.zeros((5, 4))
    mask[1:4, 0:3] = 1.0  # a 3x3 block: its centre (2, 1) is the only interior voxel
    picture = cam_overlay(image, cam, mask, alpha=0.4)
    assert picture.shape == (4, 5, 3) and picture.dtype == np.uint8  # (Y, X, RGB)
    jet = colormaps["jet"]

    def expected(x, y, value):
        return np.round((0.6 * image[x, y] / 19.0 + 0.4 * np.asarray(jet(value)[:3])) * 255.0)

    # outside the mask: grey blended with jet(0) (dark blue); the interior voxel likewise
    np.testing.assert_array_equal(picture[3, 4], expected(4, 3, 0.0))
    np.testing.assert_array_equal(picture[1, 2], expected(2, 1, 0.0))
    # on the outline (even where the CAM is 1): white
    assert (picture[1, 3] == 255).all() and (picture[0, 1] == 255).all()
    # the CAM's peak outside the mask would be jet(1) (dark red) blended: check it at a voxel off the outline
    outside = cam_overlay(image, cam, None, alpha=0.4)
    np.testing.assert_array_equal(outside[1, 3], expected(3, 1, 1.0))
    assert math.isclose(float(jet(1.0)[0]), 0.5, abs_tol=0.01)  # the reference colour really is dark red


def test_a_cam_of_a_chain_that_moves_nothing_is_already_on_the_input_grid(tmp_path):
    # the demo profile (no spatial step): the CAM comes back as it is, with the scan's affine, and without MONAI's
    # "no invertible transforms" warning on every test batch
    import warnings

    import torch
    from monai.data import list_data_collate

    from due_ext.data.nifti import write_nifti
    from due_ext.data.preprocessing import cams_on_input_grid, preprocessing_transforms

    affine = np.diag([0.7, 0.8, 5.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, 30.0]
    path = write_nifti(tmp_path / "scan.nii.gz", np.zeros((6, 5, 4), np.float32), affine)
    chain = preprocessing_transforms(["image"], intensity={"ct": [-1000, 400]})
    batch = list_data_collate([chain({"image": str(path)})])
    cam = torch.rand(1, 6, 5, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (on_input,) = cams_on_input_grid(cam, batch["image"], chain)
    torch.testing.assert_close(on_input.as_tensor(), cam[0])
    np.testing.assert_allclose(on_input.affine.numpy(), affine, atol=1e-6)


def test_test_cams_of_two_files_with_one_name_stop_with_both_named(tmp_path):
    # case_1/image.nii.gz and case_2/image.nii.gz would both write image_gradcam.nii.gz
    import torch
    from ignite.engine import Engine
    from monai.data import MetaTensor

    from due_ext.engines import PredictionWriter

    files = ["data/case_1/image.nii.gz", "data/case_2/image.nii.gz"]
    image = MetaTensor(torch.zeros(2, 1, 4, 4, 2), affine=torch.eye(4).repeat(2, 1, 1),  # collated: one per item
                       meta={"filename_or_obj": files})
    output = {"image": image, "pred": torch.full((2, 2), 0.5), "cam": torch.zeros(2, 4, 4, 2)}
    engine = Engine(lambda _engine, _batch: output)
    PredictionWriter(tmp_path / "cams").attach(engine)
    with pytest.raises(ValueError, match=r"case_2/image\.nii\.gz: .*would overwrite that of data/case_1/image"):
        engine.run([0])
