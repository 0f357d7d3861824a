"""The uncertainty bundle end to end through ``monai.bundle``: a tiny interpolator gives cached variance targets,
the neural process trains for two epochs with validation and checkpointing, and inference writes ``variance``
and ``weights`` NIfTI plus an updated datalist. Tiny sizes everywhere; the code path is the shipped one."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run

from due_ext.data.builders import build_dataset
from due_ext.data.nifti import read_nifti
from due_ext.interp.diffusion.model import SliceInterpolationUNet
from due_ext.uncertainty.targets import VarianceTargets

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "uncertainty"
CROP = 16
TINY_INTERPOLATOR = {"_target_": "due_ext.interp.diffusion.model.SliceInterpolationUNet", "channels": [8, 8],
                     "norm_num_groups": 4, "num_head_channels": 8, "crop_size": CROP}
TINY_NP = {"_target_": "due_ext.uncertainty.model.NeuralProcessUncertainty", "features": [8, 8], "latent_dim": 4,
           "embed_dim": 8, "norm_groups": 4, "crop_size": CROP}
TINY_SAMPLER = {"steps": 1, "eta": 1.0, "repeats": 2, "seed": 0, "max_batch": 256, "bf16": False, "clip_x0": 1.0}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("uncertainty_bundle")
    build_dataset("phantom", root / "data", n_pos=3, n_neg=3, seed=1)
    torch.manual_seed(0)
    interpolator = SliceInterpolationUNet(channels=(8, 8), norm_num_groups=4, num_head_channels=8, crop_size=CROP)
    torch.save(interpolator.state_dict(), root / "interpolator.pt")
    return root


def _train(root: Path, out: Path, **extra) -> None:
    overrides = {"bundle_root": str(out), "datalist": str(root / "data" / "datalist.json"), "crop_size": CROP,
                 "interpolator_def": TINY_INTERPOLATOR, "interpolator_weights": str(root / "interpolator.pt"),
                 "target_sampler": TINY_SAMPLER, "every_k": [2, 3], "network_def": TINY_NP, "max_epochs": 2,
                 "batch_size": 4, "device": "cpu", "n_shapes": 1, "n_val_shapes": 1}  # one procedural shape each
    run(config_file=str(BUNDLE / "train.json"), logging_file=str(BUNDLE / "logging.conf"), **{**overrides, **extra})


def test_train_then_inference_through_monai_bundle(workspace, tmp_path):
    out = tmp_path / "bundle"
    (out / "models").mkdir(parents=True)
    _train(workspace, out)
    weights_file = out / "models" / "model.pt"
    assert weights_file.is_file()
    state = torch.load(weights_file, weights_only=True)  # a plain state dict
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    cache = VarianceTargets.load(out / "logs" / "targets" / "targets_training.npz")
    assert len(cache) > 0 and cache.variance.shape[1] == cache.gaps.max()
    assert (cache.variance >= 0).all() and cache.meta["settings"]["repeats"] == 2
    assert (out / "logs" / "checkpoints" / "checkpoint_epoch=2.pt").is_file()

    run(config_file=str(BUNDLE / "inference.json"), logging_file=str(BUNDLE / "logging.conf"),
        bundle_root=str(out), datalist=str(workspace / "data" / "datalist.json"), output_dir=str(tmp_path / "pred"),
        network_def=TINY_NP, crop_size=CROP, device="cpu")
    payload = json.loads((tmp_path / "pred" / "datalist.json").read_text())
    positives = [item for section in ("training", "validation", "test") for item in payload[section]
                 if item["label"] == 1]
    negatives = [item for section in ("training", "validation", "test") for item in payload[section]
                 if item["label"] == 0]
    assert len(positives) == 3 and all("weights" not in item for item in negatives)
    for item in positives:
        weights, _ = read_nifti(item["weights"])
        variance, _ = read_nifti(item["variance"])
        image, _ = read_nifti(item["image"])
        assert weights.shape == variance.shape == image.shape
        assert weights.min() >= 0.0 and weights.max() <= 1.0 and variance.min() >= 0.0
        assert np.all(weights[..., item["annotated_slices"]] == 1.0)
        assert np.all(variance[..., item["annotated_slices"]] == 0.0)


def _messages(error: BaseException) -> str:
    """Messages of an exception and its causes (monai.bundle wraps errors raised while instantiating)."""
    found = []
    while error is not None:
        found.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " | ".join(found)


def test_inference_without_weights_fails_loudly(workspace, tmp_path):
    with pytest.raises(Exception) as caught:
        run(config_file=str(BUNDLE / "inference.json"), logging_file=str(BUNDLE / "logging.conf"),
            bundle_root=str(tmp_path), datalist=str(workspace / "data" / "datalist.json"),
            output_dir=str(tmp_path / "pred"), network_def=TINY_NP, crop_size=CROP, device="cpu")
    assert "FileNotFoundError" in _messages(caught.value)
    assert "uncertainty-predictor weights not found" in _messages(caught.value)
    assert not (tmp_path / "pred").exists()


def test_training_without_interpolator_weights_fails_loudly(workspace, tmp_path):
    with pytest.raises(Exception) as caught:
        _train(workspace, tmp_path / "bundle", interpolator_weights=str(tmp_path / "missing.pt"))
    assert "interpolator weights not found" in _messages(caught.value)
