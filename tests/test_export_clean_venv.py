"""The exported bundles run where ``due_ext`` is not installed, and their TorchScript/ONNX exports match PyTorch.

The clean environment is ``python -m venv --without-pip`` with a ``.pth`` file naming the project venv's
site-packages: a plain directory line puts that folder on ``sys.path`` *without* running the ``.pth`` files
inside it, so torch, monai... import while the editable install's ``due_ext`` finder is never installed. Every
bundle command runs with its working directory in the exported folder, as the model zoo documents.

Chain on a tiny phantom dataset (32x32x16): the exported interpolator's inference adds ``interpolation``, the
exported uncertainty bundle's inference adds ``weights``, the exported DUE bundle trains one epoch with
``method=due`` on that datalist and runs inference on two volumes; then ``ckpt_export`` and ``onnx_export``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from export_helpers import random_due_weights

from due_ext.data.builders import build_dataset
from due_ext.export import export_bundle

pytestmark = pytest.mark.slow
SECTIONS = "['training','validation']"


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory) -> str:
    venv = tmp_path_factory.mktemp("clean") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "project_site_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(python)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bundles")
    weights = {"due": random_due_weights(root / "due_weights.pt")}
    for name in ("due", "interpolator", "uncertainty"):
        export_bundle(name, root / name, model=weights.get(name))
    build_dataset("phantom", root / "data", n_pos=6, n_neg=4, size="32,32,16", seed=0)
    return root


def run_clean(python: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DUE_EXT_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"  # the CI machine has 2 cores
    proc = subprocess.run([python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def bundle_run(python: str, cwd: Path, config: str, *overrides: str) -> subprocess.CompletedProcess:
    return run_clean(python, cwd, "-m", "monai.bundle", "run", "--config_file", f"configs/{config}", *overrides)


def test_due_ext_is_not_importable_but_the_vendored_copy_falls_back(clean_python, workspace):
    code = (
        "import importlib.util, json\n"
        "assert importlib.util.find_spec('due_ext') is None, 'due_ext is importable'\n"
        "import scripts.due_ext as d\n"
        "print(json.dumps({k: [s.available, s.reason] for k, s in d.backends().items()}))\n"
    )
    status = json.loads(run_clean(clean_python, workspace / "due", "-c", code).stdout.strip().splitlines()[-1])
    assert status["cpp"][0] is False and "_C" in status["cpp"][1]
    assert status["reference"][0] is True
    # the same interpreter without the .pth: torch is not there either, so the .pth is what provides it
    proc = subprocess.run([clean_python, "-S", "-c", "import torch"], capture_output=True, text=True)
    assert proc.returncode != 0


def test_exported_bundles_derive_train_and_infer_without_due_ext(clean_python, workspace):
    data = workspace / "data"
    derived = data / "derived"
    bundle_run(
        clean_python,
        workspace / "interpolator",
        "inference.json",
        "--datalist",
        str(data / "datalist.json"),
        "--output_dir",
        str(derived / "interpolator"),
        "--sections",
        SECTIONS,
        "--sampler#steps",
        "2",
        "--sampler#repeats",
        "2",
    )
    bundle_run(
        clean_python,
        workspace / "uncertainty",
        "inference.json",
        "--datalist",
        str(derived / "interpolator" / "datalist.json"),
        "--output_dir",
        str(derived),
        "--sections",
        SECTIONS,
    )
    datalist = json.loads((derived / "datalist.json").read_text())
    positives = [item for item in datalist["training"] if item["label"] == 1]
    assert positives and all({"interpolation", "weights"} <= set(item) for item in positives)

    due = workspace / "due"
    shipped = (due / "models" / "model.pt").read_bytes()
    proc = bundle_run(
        clean_python,
        due,
        "train.json",
        "--datalist",
        str(derived / "datalist.json"),
        "--max_epochs",
        "1",
        "--batch_size",
        "2",
    )
    assert "using the slow PyTorch reference" in proc.stdout + proc.stderr  # no _C: the reference loss ran
    assert (due / "eval" / "due" / "checkpoints").is_dir()
    assert (due / "models" / "model.pt").read_bytes() != shipped  # the epoch's best model replaced it

    inputs = workspace / "inference_input"
    inputs.mkdir()
    for name in ("test_pos_000", "test_neg_000"):
        (inputs / f"{name}.nii.gz").symlink_to(data / "images" / f"{name}.nii.gz")
    bundle_run(clean_python, due, "inference.json", "--input_dir", str(inputs))
    predictions = json.loads((due / "eval" / "inference" / "predictions.json").read_text())
    assert set(predictions) == {"test_pos_000", "test_neg_000"}
    for name, entry in predictions.items():
        assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        cam = nib.load(due / "eval" / "inference" / f"{name}_gradcam.nii.gz").get_fdata()
        assert cam.shape == nib.load(inputs / f"{name}.nii.gz").shape
        assert 0.0 <= cam.min() and cam.max() <= 1.0 + 1e-6


def test_upstream_bundles_train_one_tiny_epoch_without_due_ext(clean_python, workspace):
    datalist = str(workspace / "data" / "datalist.json")
    commands = {
        "interpolator": ["--max_epochs", "1", "--samples_per_epoch", "32", "--val_samples", "16", "--batch_size", "16"],
        # its targets come from the interpolator shipped in its models/ (2 repeats of 2 DDIM steps here)
        "uncertainty": [
            "--max_epochs",
            "1",
            "--n_shapes",
            "0",
            "--n_val_shapes",
            "0",
            "--every_k",
            "[2]",
            "--target_sampler#repeats",
            "2",
            "--target_sampler#steps",
            "2",
            "--batch_size",
            "8",
        ],
    }
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DUE_EXT_BACKEND")}
    env["OMP_NUM_THREADS"] = "1"
    procs = {  # the two are independent: run them side by side (2 cores)
        name: subprocess.Popen(
            [
                clean_python,
                "-m",
                "monai.bundle",
                "run",
                "--config_file",
                "configs/train.json",
                "--datalist",
                datalist,
                *args,
            ],
            cwd=workspace / name,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name, args in commands.items()
    }
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} training failed:\n{output[-3000:]}"
        assert "training finished" in output
    assert (workspace / "uncertainty" / "logs" / "targets").is_dir()  # targets sampled with the shipped interpolator


def test_torchscript_and_onnx_exports_match_pytorch(clean_python, workspace):
    import onnxruntime
    from monai.bundle import ConfigParser

    due = workspace / "due"
    export = (
        "from monai.bundle import ckpt_export, onnx_export\n"
        "common = dict(net_id='network_def', ckpt_file='models/model.pt', meta_file='configs/metadata.json',"
        " config_file='configs/inference.json')\n"
        "ckpt_export(filepath='models/model.ts', **common)\n"
        "onnx_export(filepath='models/model.onnx', use_trace=True, converter_kwargs={'dynamo': False}, **common)\n"
    )
    run_clean(clean_python, due, "-c", export)

    parser = ConfigParser()
    parser.read_config(str(due / "configs" / "inference.json"))
    parser["imports"] = []  # network_def needs only MONAI
    network = parser.get_parsed_content("network_def").eval()
    network.load_state_dict(torch.load(due / "models" / "model.pt", map_location="cpu", weights_only=True))
    meta = json.loads((due / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    x = torch.rand(1, meta["num_channels"], *meta["spatial_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(x).numpy()
        scripted = torch.jit.load(str(due / "models" / "model.ts")).eval()(x).numpy()
    session = onnxruntime.InferenceSession(str(due / "models" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert expected.shape == (1, 2)
    assert np.abs(scripted - expected).max() < 1e-4
    assert np.abs(onnx_out - expected).max() < 1e-4
