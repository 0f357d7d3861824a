"""The interpolator bundle: a tiny train + inference run through ``monai.bundle``, loud failure without weights,
and the behaviour of the shipped checkpoint (variance grows away from the annotated slices; no bridging)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run

from due_ext.data.builders import build_dataset
from due_ext.data.builders.sparse import sparse_slices, sparsify
from due_ext.data.nifti import read_nifti
from due_ext.interp.blocks import split_blocks
from due_ext.interp.diffusion.inference import default_network, interpolate_volumes, load_interpolator_weights
from due_ext.interp.diffusion.sampling import SamplerSettings
from due_ext.interp.evaluate import load_masks_for_evaluation

pytestmark = pytest.mark.usefixtures("one_thread")

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "interpolator"
SHIPPED = BUNDLE / "models" / "model.pt"
TINY = {"crop_size": 8, "network_def#channels": [8, 16], "network_def#norm_num_groups": 4,
        "network_def#num_head_channels": 8}


@pytest.fixture(scope="module")
def tiny_phantom(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("phantom")
    return str(build_dataset("phantom", out, n_pos=3, n_neg=3, size="16,16,12", every_k=2, seed=0).datalist)


@pytest.fixture(scope="module")
def tiny_phantom_every_slice(tmp_path_factory) -> str:
    """Every slice drawn: the tiny lesions span 3 slices, so fine-tuning has one drawn slice to hide."""
    out = tmp_path_factory.mktemp("phantom_dense")
    return str(build_dataset("phantom", out, n_pos=3, n_neg=3, size="16,16,12", every_k=1, seed=0).datalist)


def test_bundle_tiny_train_then_inference(tiny_phantom, tmp_path):
    root = tmp_path / "bundle"
    run(config_file=str(BUNDLE / "train.json"), datalist=tiny_phantom, bundle_root=str(root), max_epochs=2,
        samples_per_epoch=8, val_samples=4, batch_size=4, n_shapes=2, **TINY)
    weights = root / "models" / "model.pt"
    assert weights.is_file()
    state = torch.load(weights, weights_only=True)
    assert isinstance(state, dict) and any("class_embedding" in k for k in state)  # plain state dict
    assert (root / "logs").is_dir() and any((root / "logs").iterdir())  # TensorBoard events

    out = tmp_path / "out"
    run(config_file=str(BUNDLE / "inference.json"), datalist=tiny_phantom, bundle_root=str(root),
        output_dir=str(out), **{"sampler#steps": 2, "sampler#repeats": 2}, **TINY)
    payload = json.loads((out / "datalist.json").read_text())
    items = [item for section in ("training", "validation", "test") for item in payload[section]]
    positives = [item for item in items if item["label"] == 1]
    assert len(positives) == 3 and all("interpolation" in it and "variance" in it for it in positives)
    assert all("interpolation" not in it for it in items if it["label"] == 0)
    for item in positives:
        mean, _ = read_nifti(item["interpolation"])
        variance, _ = read_nifti(item["variance"])
        annotation, _ = read_nifti(item["annotation"])
        assert mean.shape == variance.shape == annotation.shape
        for z in item["annotated_slices"]:
            assert np.array_equal(mean[..., z], annotation[..., z]) and not variance[..., z].any()
        assert Path(item["image"]).is_absolute() and Path(item["image"]).is_file()


def test_finetune_on_sparse_annotations_starts_from_the_pretrained_weights(tiny_phantom_every_slice, tmp_path):
    """train.json + finetune.json through monai.bundle: reads the pretrained weights, trains on the drawn slices
    of the annotations only, writes model_finetuned.pt and leaves model.pt alone."""
    root = tmp_path / "bundle"
    run(config_file=str(BUNDLE / "train.json"), datalist=tiny_phantom_every_slice, bundle_root=str(root), max_epochs=1,
        samples_per_epoch=4, val_samples=4, batch_size=4, n_shapes=0, **TINY)
    pretrained = torch.load(root / "models" / "model.pt", weights_only=True)
    configs = [str(BUNDLE / "train.json"), str(BUNDLE / "finetune.json")]
    tuned_path = root / "models" / "model_finetuned.pt"
    # learning rate 0: the EMA weights saved are the pretrained ones (loaded, not re-initialised), up to the EMA
    # update's rounding: (1 - m) p + m p is p within a few float32 ulps (rtol 1e-6 = 8 ulps) after one iteration
    run(config_file=configs, datalist=tiny_phantom_every_slice, bundle_root=str(root), max_epochs=1,
        samples_per_epoch=4, val_samples=4, batch_size=4, learning_rate=0.0, **TINY)
    frozen = torch.load(tuned_path, weights_only=True)
    assert frozen.keys() == pretrained.keys()
    for k in pretrained:
        torch.testing.assert_close(frozen[k], pretrained[k], rtol=1e-6, atol=0)
    run(config_file=configs, datalist=tiny_phantom_every_slice, bundle_root=str(root), max_epochs=2,
        samples_per_epoch=8, val_samples=4, batch_size=4, learning_rate=0.01, **TINY)
    tuned = torch.load(tuned_path, weights_only=True)
    assert any(not torch.equal(tuned[k], pretrained[k]) for k in pretrained)
    again = torch.load(root / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(again[k], pretrained[k]) for k in pretrained)  # the pretrained file is untouched
    assert (root / "logs_finetune").is_dir()


def test_inference_fails_loudly_without_weights(tiny_phantom, tmp_path):
    with pytest.raises(Exception) as info:
        run(config_file=str(BUNDLE / "inference.json"), datalist=tiny_phantom, bundle_root=str(tmp_path),
            output_dir=str(tmp_path / "out"), **TINY)
    chain, error = [], info.value
    while error is not None:  # monai.bundle wraps the error raised while instantiating the component
        chain.append(error)
        error = error.__cause__ or error.__context__
    missing = [e for e in chain if isinstance(e, FileNotFoundError)]
    assert missing and "weights not found" in str(missing[0]) and "model.pt" in str(missing[0])
    assert not (tmp_path / "out" / "datalist.json").exists()


def test_load_weights_rejects_wrong_architecture(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"unexpected.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="do not fit"):
        load_interpolator_weights(default_network(), path)


@pytest.fixture(scope="module")
def shipped_model():
    assert SHIPPED.is_file(), f"{SHIPPED} is missing: the bundle must ship its trained weights"
    assert SHIPPED.stat().st_size <= 10 * 1024 * 1024
    return load_interpolator_weights(default_network(), SHIPPED)


def test_shipped_variance_grows_away_from_annotated_slices(shipped_model, tmp_path):
    """On phantom lesion masks (a fresh seed, not the training set) kept every 4th slice, the variance share of a
    missing slice two slices from the nearest annotated slice exceeds that of a slice next to one."""
    datalist = build_dataset("phantom", tmp_path, n_pos=24, n_neg=3, seed=123).datalist
    masks = [m for _, m in load_masks_for_evaluation(datalist, ["training", "validation", "test"])]
    slices = [sparse_slices(m, 4) for m in masks]
    results = interpolate_volumes(shipped_model, [sparsify(m, s) for m, s in zip(masks, slices, strict=True)], slices,
                                  SamplerSettings(steps=10, eta=1.0, repeats=8, seed=0))
    share: dict[int, list[float]] = {1: [], 2: []}
    for (_, variance), kept in zip(results, slices, strict=True):
        for block in split_blocks(kept):
            if block.gap < 3:
                continue
            per_slice = {z: float(variance[..., z].sum()) for z in block.missing}
            total = sum(per_slice.values())
            for z, v in per_slice.items():  # share of the block's variance, 1 = uniform
                share[min(2, z - block.start, block.stop - z)].append(v / total * block.gap)
    assert len(share[1]) >= 10 and len(share[2]) >= 5
    assert np.mean(share[2]) > np.mean(share[1])


def test_shipped_model_does_not_bridge_to_an_empty_slice(shipped_model, tmp_path):
    """Object ending inside a gap: annotate 2 slices before a lesion's last slice and the first empty slice 2
    after it. The slice next to the empty bound must hold less than half the lower slice's area (SDF: 0)."""
    datalist = build_dataset("phantom", tmp_path, n_pos=12, n_neg=3, seed=123).datalist
    volumes, slices, lower_areas = [], [], []
    for _, mask in load_masks_for_evaluation(datalist, ["training", "validation", "test"]):
        last = int(np.nonzero(mask.any(axis=(0, 1)))[0][-1])
        if last + 2 >= mask.shape[-1] or not mask[..., last - 2].any():
            continue
        kept = [last - 2, last + 2]
        volumes.append(sparsify(mask, kept))
        slices.append(kept)
        lower_areas.append(mask[..., last - 2].sum())
    assert len(volumes) >= 5
    results = interpolate_volumes(shipped_model, volumes, slices, SamplerSettings(steps=10, repeats=8, seed=0))
    ratios = [(mean[..., kept[1] - 1] > 0.5).sum() / area
              for (mean, _), kept, area in zip(results, slices, lower_areas, strict=True)]
    assert np.mean(ratios) < 0.5
