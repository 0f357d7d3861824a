"""docs/your_data.md, end to end: every ``bash`` block of the tutorial, run in order, on crops of a real chest CT at
its native grid (pyradiomics' ``lung2``: 0.63 x 0.63 x 5 mm, LPS as acquired, HU) with its real tumour drawn on
every 3rd slice; the inference CAM must lie on the input's grid and its binarised map be centred in the tumour's
bounding box."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "your_data.md"
pytestmark = pytest.mark.slow

# Crops of CROP voxels (z, y, x of the stored arrays; 80 x 80 x 80 mm at lung2's grid, the field of raw_ct.json).
CROP = (16, 128, 128)
TUMOUR_CENTRE = (20, 365, 361)  # lung2's tumour (z 15-25, y 333-398, x 318-404 in the stored array)
# positives: the tumour at several offsets in the field; negatives: the mirrored side of the chest at the tumour's
# level (spine, chest wall and lung as around the tumour, no tumour), the tumour's place above it, other lung
# fields of lung2, and lung fields of the other CT (lung1, away from its own small tumour)
POSITIVE_OFFSETS = [(0, 0, 0), (1, -16, -16), (-1, 16, 16), (2, -16, 16), (-2, 16, -16), (0, -24, 0), (1, 0, 24),
                    (-1, 24, 0)]
LUNG2_NEGATIVES = [(20, 365, 151), (21, 349, 167), (19, 381, 135), (38, 365, 361), (40, 345, 340), (37, 300, 150),
                   (42, 250, 380), (36, 280, 180)]
LUNG1_NEGATIVES = [(22, 330, 160), (24, 330, 350), (28, 300, 300), (26, 300, 170)]
NEW_SCAN_OFFSET = (1, 8, -8)  # a crop of the tumour not imported: the inference input
EVERY_K = 3

# The test's changes to the tutorial's monai.bundle commands, so that it trains in seconds on 2 CPU cores:
# - half the resolution over the same 80 mm field (2.5 x 2.5 x 5 mm, 32 x 32 x 16 voxels) and a narrower
#   network; layer2 then gives the 4 x 4 x 4 Grad-CAM that raw_ct.json's layer3 gives at 64 x 64 x 32;
# - baseline_plus instead of due: the derivation due adds is tested in tests/test_due_bundle.py.
SMALL = ["--spacing", "[2.5, 2.5, 5.0]", "--spatial_size", "[32, 32, 16]", "--target_layer", "layer2",
         "--block_inplanes", "[8, 16, 16, 16]"]
# - training: 150 epochs with lambda 1, validated once at the end, so the model kept is the last one: with one
#   validation positive, PR-AUC reaches 1 within a few epochs and the "best" epoch is then an early, untrained
#   one (measured: with 20 epochs validated every epoch, epoch 2 was kept and its CAM peaked outside the tumour).
#   Measured over training seeds 0-7 (this data, one thread): the inference CAM peaked inside the tumour's box
#   for 7 of 8 seeds (seed 1 missed), and the scan was predicted "lesion" for 7 of 8 (seed 4 missed); with 60
#   epochs for 3 of seeds 0-4. The test runs seed 0, deterministic on the CPU.
TRAINING = ["--max_epochs", "150", "--val_interval", "150", "--lam", "1.0", "--batch_size", "4"]


def tutorial_commands(text: str) -> list[list[str]]:
    """The commands of the page's ``bash`` blocks, in order (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def test_the_tutorial_is_import_check_train_evaluate_infer():
    steps = [(c[:3], next((a for a in c if a.endswith("]")), None)) for c in tutorial_commands(DOC.read_text())]
    assert [s[0] for s in steps] == [["python", "-m", "due_ext"]] * 2 + [["python", "-m", "monai.bundle"]] * 3
    configs = [s[1] for s in steps[2:]]
    assert configs == ["['bundles/due/train.json','bundles/due/raw_ct.json']",
                       "['bundles/due/train.json','bundles/due/raw_ct.json','bundles/due/evaluate.json']",
                       "['bundles/due/inference.json','bundles/due/raw_ct.json']"]


def _write_example_scans(root: Path) -> tuple[Path, tuple[np.ndarray, np.ndarray]]:
    """``root/scans/{images,labels}`` (NRRD crops, the tumour drawn on every 3rd of the CT's tumour slices) and
    ``root/new_scans/lung2_new.nii.gz``; returns the new scan's path and its tumour's bounding box (voxel
    indices, NIfTI axis order x, y, z, inclusive)."""
    import SimpleITK as sitk

    from due_ext.data.cache import fetch_pyradiomics_data

    data = fetch_pyradiomics_data()
    lung2, lung1 = (sitk.ReadImage(str(data / f"{name}_image.nrrd")) for name in ("lung2", "lung1"))
    tumour = sitk.ReadImage(str(data / "lung2_label.nrrd"))
    full = sitk.GetArrayFromImage(tumour)
    drawn = np.nonzero(full.any(axis=(1, 2)))[0][::EVERY_K]
    sparse_array = np.zeros_like(full)
    sparse_array[drawn] = full[drawn]
    sparse = sitk.GetImageFromArray(sparse_array)
    sparse.CopyInformation(tumour)

    def crop(image, centre):
        z, y, x = centre
        start = [x - CROP[2] // 2, y - CROP[1] // 2, z - CROP[0] // 2]
        return sitk.RegionOfInterest(image, [CROP[2], CROP[1], CROP[0]], start)

    images, labels, new = root / "scans" / "images", root / "scans" / "labels", root / "new_scans"
    for folder in (images, labels, new):
        folder.mkdir(parents=True)
    for i, offset in enumerate(POSITIVE_OFFSETS):
        centre = tuple(c + o for c, o in zip(TUMOUR_CENTRE, offset, strict=True))
        sitk.WriteImage(crop(lung2, centre), str(images / f"lung2_pos{i}.nrrd"), True)
        sitk.WriteImage(crop(sparse, centre), str(labels / f"lung2_pos{i}_seg.nrrd"), True)
    for name, ct, centres in (("lung2", lung2, LUNG2_NEGATIVES), ("lung1", lung1, LUNG1_NEGATIVES)):
        for i, centre in enumerate(centres):
            sitk.WriteImage(crop(ct, centre), str(images / f"{name}_neg{i}.nrrd"), True)
    centre = tuple(c + o for c, o in zip(TUMOUR_CENTRE, NEW_SCAN_OFFSET, strict=True))
    path = new / "lung2_new.nii.gz"
    sitk.WriteImage(crop(lung2, centre), str(path), True)
    inside = np.nonzero(sitk.GetArrayFromImage(crop(tumour, centre)))  # (z, y, x) indices
    lower = np.asarray([inside[2].min(), inside[1].min(), inside[0].min()])
    upper = np.asarray([inside[2].max(), inside[1].max(), inside[0].max()])
    return path, (lower, upper)


def _run(command: list[str], cwd: Path, env: dict) -> None:
    if command[:2] == ["python", "-m"]:
        command = [sys.executable, *command[1:]]
    if command[2] == "monai.bundle":
        command = [a if a != "due" else "baseline_plus" for a in command] + SMALL
        if any(a.endswith("train.json','bundles/due/raw_ct.json']") for a in command):
            command += TRAINING
    run = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert run.returncode == 0, f"{shlex.join(command)}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"


def test_the_tutorial_runs_on_a_raw_ct_and_its_cam_finds_the_tumour(tmp_path):
    new_scan, (lower, upper) = _write_example_scans(tmp_path)
    (tmp_path / "bundles").symlink_to(REPO / "bundles")  # the commands run "from the repository root"
    env = dict(os.environ, DUE_EXT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    for command in tutorial_commands(DOC.read_text()):
        _run(command, tmp_path, env)

    datalist = json.loads((tmp_path / "data" / "datalist.json").read_text())
    sections = [datalist[s] for s in ("training", "validation", "test")]
    assert sum(item["label"] for section in sections for item in section) == len(POSITIVE_OFFSETS)
    assert sum(len(section) for section in sections) == len(POSITIVE_OFFSETS) + 12

    # the test evaluation: each case's CAM on its own image's grid
    for item in datalist["test"]:
        image = nib.load(str(tmp_path / "data" / item["image"]))
        cam = nib.load(str(tmp_path / "runs" / "eval" / "lungs" / "test" / "cams" /
                           (Path(item["image"]).name.removesuffix(".nii.gz") + "_gradcam.nii.gz")))
        assert cam.shape == image.shape
        np.testing.assert_allclose(cam.affine, image.affine, atol=1e-4)

    # inference: the input's grid (float32 header values: 1e-4 mm)
    out = tmp_path / "runs" / "eval" / "inference"
    cam = nib.load(str(out / "lung2_new_gradcam.nii.gz"))
    source = nib.load(str(new_scan))
    assert cam.shape == source.shape == (CROP[2], CROP[1], CROP[0])
    np.testing.assert_allclose(cam.affine, source.affine, atol=1e-4)
    # Where the explanation points: the centroid of the binarised CAM (>= 0.5, the threshold of every explanation
    # metric here) must lie in the tumour's box. Not the single maximum voxel: this CAM is a 4 x 4 x 4 grid
    # (20 mm cells) upsampled trilinearly, so its maximum sits on a cell centre or the field's border slice and
    # jumps a whole cell with float rounding. Measured on the portable build (seed 0): maximum at the field's top
    # slice z = 15, one cell above the box (z 2-12), in-plane inside it; on a -march=native build, inside.
    values = np.asarray(cam.dataobj, dtype=np.float64)
    hot = values >= 0.5 * values.max()
    centroid = np.asarray([np.average(np.arange(n), weights=hot.sum(axis=tuple(a for a in range(3) if a != axis)))
                           for axis, n in enumerate(values.shape)])
    assert np.all(lower <= centroid) and np.all(centroid <= upper), (centroid, lower, upper)
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["lung2_new"]["predicted"] == "lesion"
