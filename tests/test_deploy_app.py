"""The MONAI Deploy application (deploy/app.py) on demo NIfTI volumes, in the deploy virtual environment.

The SDK (holoscan, ~1.5 GB) lives in its own venv, built by ``make deploy-test`` (``.ci/run`` calls it after
``make test``), which sets ``DUE_DEPLOY_PYTHON``. Without that variable the test looks for the venv at its
default place and is skipped only when it is absent; with the variable set, a missing interpreter fails.

The app's outputs are compared with the exported bundle's own ``inference.json`` run on the same volumes in the
same interpreter: same probabilities and the same Grad-CAM volume (affine kept), on the demo volumes as stored and
on raw CT versions of them run with the bundle's ``raw_ct`` profile (``DUE_DEPLOY_PROFILE``), where the chain
reorients, resamples and windows the scan and the map must come back onto the scan's own grid.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from export_helpers import random_due_weights

from due_ext.data.builders import build_dataset
from due_ext.export import export_bundle

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DEPLOY_PYTHON = Path.home() / ".cache" / "due_ext" / "venv-deploy" / "bin" / "python"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def deploy_python() -> str:
    configured = os.environ.get("DUE_DEPLOY_PYTHON")
    python = Path(configured) if configured else DEFAULT_DEPLOY_PYTHON
    if not python.exists():
        if configured:
            pytest.fail(f"DUE_DEPLOY_PYTHON={configured} does not exist")
        pytest.skip(f"no deploy venv at {python}: run `make deploy-test`")
    return str(python)


def run(python: str, cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | (env or {})
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _raw_ct(source: Path, target: Path) -> None:
    """A phantom volume as a raw CT would arrive: Hounsfield units, LPS storage, 0.8 x 0.9 x 2 mm voxels, another
    shape than the network's (so the raw_ct profile reorients, resamples, windows and crops or pads it)."""
    volume = nib.load(source)
    hu = np.asarray(volume.dataobj, dtype=np.float32)[::-1, ::-1] * 1400.0 - 1000.0
    affine = np.diag([-0.8, -0.9, 2.0, 1.0])
    affine[:3, 3] = [40.0, 30.0, -20.0]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu[:, 3:, 2:]), affine), str(target))


@pytest.mark.parametrize("profile", [None, "raw_ct"])
def test_deploy_app_matches_the_bundle_inference(deploy_python, tmp_path, profile):
    # the app needs neither due_ext nor the repository: only the exported bundle
    probe = subprocess.run([deploy_python, "-c", "import due_ext"], cwd=tmp_path, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'due_ext'" in probe.stderr

    bundle = tmp_path / "due"
    export_bundle("due", bundle, model=random_due_weights(tmp_path / "due_weights.pt"))
    build_dataset("phantom", tmp_path / "data", n_pos=6, n_neg=4, size="64,64,32", seed=1)
    inputs = tmp_path / "input"
    inputs.mkdir()
    for name in ("test_pos_000", "test_neg_000"):
        source = tmp_path / "data" / "images" / f"{name}.nii.gz"
        if profile is None:
            (inputs / f"{name}.nii.gz").symlink_to(source)
        else:
            _raw_ct(source, inputs / f"{name}.nii.gz")

    out = tmp_path / "out"
    env = {} if profile is None else {"DUE_DEPLOY_PROFILE": profile}
    run(deploy_python, tmp_path, str(REPO / "deploy" / "app.py"), "-i", str(inputs), "-o", str(out), "-m", str(bundle),
        env=env)
    reference = tmp_path / "reference"
    configs = "configs/inference.json" if profile is None else f"['configs/inference.json','configs/{profile}.json']"
    run(deploy_python, bundle, "-m", "monai.bundle", "run", "--config_file", configs, "--input_dir", str(inputs),
        "--output_dir", str(reference))

    app_predictions = json.loads((out / "predictions.json").read_text())
    ref_predictions = json.loads((reference / "predictions.json").read_text())
    assert set(app_predictions) == {"test_pos_000", "test_neg_000"} == set(ref_predictions)
    maps = []
    for stem, entry in app_predictions.items():
        probs, ref = entry["probabilities"], ref_predictions[stem]["probabilities"]
        assert set(probs) == {"no_lesion", "lesion"}
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        for name in probs:
            assert probs[name] == pytest.approx(ref[name], abs=1e-5)
        assert entry["predicted"] == max(probs, key=probs.get)
        cam, ref_cam = nib.load(out / f"{stem}_gradcam.nii.gz"), nib.load(reference / f"{stem}_gradcam.nii.gz")
        source = nib.load(inputs / f"{stem}.nii.gz")
        assert cam.shape == source.shape  # on the input's grid, also when the profile resampled it
        np.testing.assert_allclose(cam.affine, source.affine, atol=1e-6)
        np.testing.assert_allclose(cam.get_fdata(), ref_cam.get_fdata(), atol=1e-5)
        assert cam.get_data_dtype() == np.float32  # the float map, not the SDK's uint8 image conversion
        assert 0.0 <= cam.get_fdata().min() and cam.get_fdata().max() <= 1.0 + 1e-6
        maps.append(cam.get_fdata())
    assert any(0 < np.mean((m > 0) & (m < 1)) for m in maps), "no map has graded values"


def test_deploy_app_names_a_missing_profile(deploy_python, tmp_path):
    bundle = tmp_path / "due"
    export_bundle("due", bundle, model=random_due_weights(tmp_path / "due_weights.pt"))
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), str(volume))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"DUE_DEPLOY_PROFILE": "no_such_profile"}
    proc = subprocess.run([deploy_python, str(REPO / "deploy" / "app.py"), "-i", str(volume), "-o", str(tmp_path / "o"),
                           "-m", str(bundle)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no_such_profile.json does not exist" in proc.stderr


def test_deploy_app_refuses_a_folder_that_is_not_a_bundle(deploy_python, tmp_path):
    volume = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), str(volume))
    proc = subprocess.run(
        [
            deploy_python,
            str(REPO / "deploy" / "app.py"),
            "-i",
            str(volume),
            "-o",
            str(tmp_path / "o"),
            "-m",
            str(tmp_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "not an exported DUE bundle folder" in proc.stdout + proc.stderr
