"""The evaluation report carries the localisation metrics and the two floors: recorded per positive by the
recorder, summarised nan-aware into metrics.json and metrics.csv."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from monai.networks.nets import ResNet

from due_ext.data import schema
from due_ext.engines import ExplanationEvaluator
from due_ext.metrics.explanation import explanation_scores
from due_ext.metrics.floors import gaussian_blob, initial_cam
from due_ext.metrics.localisation import mask_auroc, pointing_game
from due_ext.report import EvaluationRecorder, summarize_evaluation

SIZE = (16, 16, 8)


def _architecture() -> ResNet:
    """A narrow ResNet whose layer4 map (2x2x1 on SIZE) is not a constant; built unseeded: the caller seeds."""
    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 8, 8, 8], spatial_dims=3,
                  n_input_channels=1, num_classes=2, conv1_t_stride=1, no_max_pool=True, shortcut_type="B",
                  bias_downsample=False)


def tiny_resnet() -> ResNet:
    torch.manual_seed(0)
    return _architecture()


def tiny_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two positives with a bright 6x6x4 cube as their mask, two negatives."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros((4, 1, *SIZE))
    mask[:2, :, 4:10, 5:11, 2:6] = 1.0
    return {schema.IMAGE: torch.rand((4, 1, *SIZE), generator=g) * 0.2 + mask,
            schema.LABEL: torch.tensor([1, 1, 0, 0]), schema.MASK: mask}


def test_summary_means_skip_nan_and_floors_get_their_own_section():
    arrays = {"label": np.array([1, 1, 1, 0]), "prob": np.array([[0.2, 0.8], [0.4, 0.6], [0.7, 0.3], [0.9, 0.1]]),
              "thresholds": np.array([0.5]),
              **{f"pos/{name}@0.5": np.array([0.2, 0.4, 0.6]) for name in ("iou", "precision", "recall", "f1")},
              "pos/pointing_game": np.array([1.0, np.nan, 0.0]),
              "floor/gaussian_blob/mask_auroc": np.array([0.75, 0.25, np.nan]),
              "floor/gaussian_blob/lesion_voxels": np.array([12.5])}
    summary = summarize_evaluation(arrays)
    # the nan (an empty mask) is left out: mean of {1, 0}, population std 0.5, n = 2
    assert summary["explanation"]["pointing_game"] == {"mean": 0.5, "std": 0.5, "n": 2}
    assert summary["explanation"]["iou"] == {"mean": pytest.approx(0.4), "std": pytest.approx(np.std([0.2, 0.4, 0.6])),
                                             "n": 3}
    assert summary["floors"] == {"gaussian_blob": {"lesion_voxels": 12.5,
                                                   "mask_auroc": {"mean": 0.5, "std": 0.25, "n": 2}}}


def test_recorder_writes_localisation_scores_and_both_floors(tmp_path):
    network = tiny_resnet()
    batches = [tiny_batch(0), tiny_batch(1)]
    evaluator = ExplanationEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network)
    EvaluationRecorder(tmp_path, n_figures=1, faithfulness=False, initial_network=_architecture,
                       initial_seed=3).attach(evaluator)
    evaluator.run()
    metrics = json.loads((tmp_path / "metrics.json").read_text())

    explanation = metrics["explanation"]
    for key in ("pointing_game", "energy_pointing_game", "mask_auroc", "iou_best_threshold", "best_threshold"):
        assert explanation[key]["n"] == 4, key
    assert explanation["iou_best_threshold"]["mean"] >= explanation["iou"]["mean"] - 1e-12  # 0.5 is on the grid

    positives = [(b["image"][:2], b["mask"][:2, 0]) for b in batches]  # tiny_batch: items 0, 1 are positives
    masks = torch.cat([m for _, m in positives])
    floors = metrics["floors"]
    assert set(floors) == {"gaussian_blob", "initial_cam"}
    assert floors["gaussian_blob"]["lesion_voxels"] == 6 * 6 * 4  # the cube [4:10, 5:11, 2:6]
    blob = gaussian_blob(masks.shape[1:], 144).expand(masks.shape)
    assert floors["gaussian_blob"]["iou"]["mean"] == pytest.approx(
        float(explanation_scores(blob, masks)["iou"].mean()), rel=1e-12)
    assert floors["gaussian_blob"]["pointing_game"]["mean"] == pytest.approx(
        float(pointing_game(blob, masks).mean()), rel=1e-12)
    # the initial network: built with seed 3, explained at the evaluator's layer (layer4), predicted class
    cams = torch.cat([initial_cam(_architecture, image, seed=3, target_layer="layer4") for image, _ in positives])
    assert floors["initial_cam"]["mask_auroc"]["mean"] == pytest.approx(float(mask_auroc(cams, masks).mean()),
                                                                        rel=1e-12)
    assert floors["initial_cam"]["mask_auroc"]["n"] == 4

    with open(tmp_path / "metrics.csv") as handle:
        rows = {(r["group"], r["metric"]): float(r["value"]) for r in csv.DictReader(handle)}
    assert rows[("floor_gaussian_blob", "lesion_voxels")] == 144
    assert rows[("floor_initial_cam", "mask_auroc_mean")] == pytest.approx(floors["initial_cam"]["mask_auroc"]["mean"])
    energy = explanation["energy_pointing_game"]["mean"]
    assert rows[("explanation", "energy_pointing_game_mean")] == pytest.approx(energy)


def test_recorder_without_floors_records_none(tmp_path):
    evaluator = ExplanationEvaluator(device=torch.device("cpu"), val_data_loader=[tiny_batch(0)],
                                     network=tiny_resnet())
    EvaluationRecorder(tmp_path, n_figures=0, faithfulness=False, blob_floor=False).attach(evaluator)
    evaluator.run()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["floors"] == {} and metrics["explanation"]["pointing_game"]["n"] == 2
