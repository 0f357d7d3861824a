"""Metric definitions on hand-computed cases (empty masks, all-zero maps, ties)."""

import math

import numpy as np
import pytest
import torch

from due_ext.metrics import (
    activation_recall,
    annotation_coverage,
    average_precision,
    classification_scores,
    comprehensiveness,
    explanation_scores,
    explanation_sweep,
    pr_auc_trapezoid,
    precision_recall_curve,
    remove_region,
    roc_auc,
    saliency_precision,
    sufficiency,
)

LABELS = [0, 0, 1, 1]
SCORES = [0.1, 0.4, 0.35, 0.8]


def test_roc_auc_hand_computed_and_ties():
    assert roc_auc(LABELS, SCORES) == pytest.approx(0.75)
    # a tie between a positive and a negative counts one half
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([0, 0, 1], [0.2, 0.7, 0.7]) == pytest.approx(0.75)
    assert math.isnan(roc_auc([1, 1], [0.2, 0.3]))


def test_precision_recall_curve_and_areas():
    precision, recall = precision_recall_curve(LABELS, SCORES)
    np.testing.assert_allclose(precision, [0.5, 2 / 3, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(recall, [1.0, 1.0, 0.5, 0.5, 0.0])
    assert average_precision(LABELS, SCORES) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    # trapezoid over recall: 0.5 * 1 (0 -> 0.5) + 0.5 * (0.5 + 2/3) / 2 (0.5 -> 1)
    assert pr_auc_trapezoid(LABELS, SCORES) == pytest.approx(0.5 + 0.25 * (0.5 + 2 / 3))
    assert math.isnan(average_precision([0, 0], [0.1, 0.2]))


def test_classification_scores_threshold_metrics():
    scores = classification_scores([0, 0, 1, 1, 1], [0.6, 0.2, 0.9, 0.5, 0.1])
    # predicted positive: 0.6 (FP), 0.9 (TP), 0.5 (TP, >= threshold); 0.2 TN; 0.1 FN
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)
    assert scores["specificity"] == pytest.approx(1 / 2)
    assert scores["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert math.isnan(classification_scores([0, 0], [0.1, 0.2])["precision"])


def test_prediction_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="differ in length"):
        roc_auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])


def _pair():
    saliency = torch.tensor([[0.9, 0.6, 0.4, 0.0, 0.7, 0.5]])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    return saliency, mask


def test_explanation_scores_hand_computed():
    saliency, mask = _pair()
    s = explanation_scores(saliency, mask, 0.5)
    # P = {0, 1, 4, 5} (>= 0.5), M = {0, 1, 2}: inter 2, union 5
    assert s["iou"].item() == pytest.approx(2 / 5)
    assert s["precision"].item() == pytest.approx(2 / 4)
    assert s["recall"].item() == pytest.approx(2 / 3)
    assert s["f1"].item() == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    sweep = explanation_sweep(saliency, mask, (0.0, 0.8))
    assert sweep[0.0]["recall"].item() == pytest.approx(1.0)  # every voxel >= 0
    assert sweep[0.8]["iou"].item() == pytest.approx(1 / 3)


def test_explanation_scores_empty_cases():
    zero_map = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    s = explanation_scores(zero_map, mask, 0.5)
    # sample 0: nothing predicted, mask non-empty; sample 1: empty union
    assert s["iou"].tolist() == [0.0, 1.0]
    assert s["precision"].tolist() == [0.0, 1.0]
    assert s["recall"].tolist() == [0.0, 1.0]
    assert s["f1"].tolist() == [0.0, 1.0]
    assert saliency_precision(zero_map, mask).tolist() == [0.0, 0.0]


def test_soft_explanation_metrics():
    saliency, mask = _pair()
    assert activation_recall(saliency, mask).item() == pytest.approx((0.9 + 0.6 + 0.4) / 3)
    assert saliency_precision(saliency, mask).item() == pytest.approx(1.9 / 3.1)
    assert annotation_coverage(saliency, mask, 0.5).item() == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="differ in shape"):
        activation_recall(saliency, mask[:, :3])


class _MeanIntensityModel(torch.nn.Module):
    """Logit of class 1 = 10 * mean of the first half of the volume along X: only that region matters."""

    def forward(self, x):
        score = 10 * x[:, :, : x.shape[2] // 2].mean(dim=(1, 2, 3, 4))
        return torch.stack([torch.zeros_like(score), score], dim=1)


def test_faithfulness_on_a_model_that_looks_at_one_half():
    model = _MeanIntensityModel()
    image = torch.ones(1, 1, 4, 2, 2)
    relevant = torch.zeros(1, 4, 2, 2)
    relevant[:, :2] = 1.0
    target = torch.tensor([1])
    p_full = torch.softmax(model(image), 1)[0, 1]
    # removing the relevant half drops the probability to 0.5; keeping only it changes nothing
    assert comprehensiveness(model, image, relevant, target).item() == pytest.approx(p_full.item() - 0.5)
    assert sufficiency(model, image, relevant, target).item() == pytest.approx(0.0, abs=1e-6)
    blurred = remove_region(image, relevant > 0, fill="blur", sigma=1.0)
    assert blurred.shape == image.shape and torch.allclose(blurred[:, :, 2:], image[:, :, 2:])
    with pytest.raises(ValueError, match="fill"):
        remove_region(image, relevant > 0, fill="noise")


def test_oracle_cam_at_full_resolution_reproduces_the_mask():
    from due_ext.metrics.cam_ceiling import oracle_cam_iou

    mask = torch.zeros(1, 16, 16, 8)
    mask[0, 5:9, 6:10, 2:5] = 1
    assert torch.allclose(oracle_cam_iou(mask, (16, 16, 8)), torch.ones(1, dtype=torch.float64))


def test_oracle_cam_iou_falls_with_the_grid_for_a_small_lesion():
    from due_ext.metrics.cam_ceiling import oracle_cam_iou

    mask = torch.zeros(1, 64, 64, 32)
    mask[0, 30:35, 29:34, 14:17] = 1  # 75 voxels, 0.2 % of the volume: a small nodule
    ious = [float(oracle_cam_iou(mask, (64 // f, 64 // f, 32 // f))[0]) for f in (1, 4, 8, 16)]
    assert ious[0] == 1.0
    assert ious[1] > ious[2] > ious[3]
    assert ious[3] < 0.05  # a 4x4x2 map cannot outline it


def test_oracle_cam_rejects_bad_shapes():
    from due_ext.metrics.cam_ceiling import oracle_cam

    with pytest.raises(ValueError, match="mask must be"):
        oracle_cam(torch.zeros(8, 8, 8), (2, 2, 2))
    with pytest.raises(ValueError, match="grid must be"):
        oracle_cam(torch.zeros(1, 8, 8, 8), (2, 2))
