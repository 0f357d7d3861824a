"""Localisation metrics (pointing game, energy pointing game, mask AUROC, IoU at the best threshold) and the two
floors (centred Gaussian blob, Grad-CAM at initialisation) against hand-computed values on tiny maps.

Inputs are float64 and every expected value is a short rational or a power of two, so comparisons are exact up
to a few float64 roundings (rel 1e-12)."""

from __future__ import annotations

import math

import pytest
import torch

from due_ext.explain.gradcam import grad_cam
from due_ext.metrics.floors import gaussian_blob, initial_cam, mean_lesion_voxels
from due_ext.metrics.localisation import (
    LOCALISATION_THRESHOLDS,
    best_threshold_iou,
    energy_pointing_game,
    localisation_scores,
    mask_auroc,
    pointing_game,
)

NAN = float("nan")


def _batch(*rows: list[float]) -> torch.Tensor:
    """Rows of 4 voxels as a (B, 2, 2) batch: the metrics flatten every non-batch axis."""
    return torch.tensor(rows, dtype=torch.float64).view(len(rows), 2, 2)


def _same(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.dtype == torch.float64 and actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected, strict=True):
        assert (math.isnan(a) and math.isnan(e)) or a == pytest.approx(e, rel=1e-12, abs=1e-15)


def test_pointing_game_hit_miss_ties_flat_and_empty_mask():
    saliency = _batch([0.1, 0.9, 0.3, 0.2], [0.1, 0.9, 0.3, 0.2], [1.0, 1.0, 0.0, 0.0], [0, 0, 0, 0],
                      [0.1, 0.9, 0.3, 0.2])
    mask = _batch([0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    # hit; miss; two tied maxima, one inside: 1/2; flat map, every voxel ties: |M|/N = 1/4; empty mask: nan
    _same(pointing_game(saliency, mask), [1.0, 0.0, 0.5, 0.25, NAN])


def test_energy_pointing_game_is_the_mass_share_inside_the_mask():
    saliency = _batch([0.1, 0.9, 0.3, 0.2], [0.5, 0.5, 0.5, 0.5], [0, 0, 0, 0], [0.1, 0.9, 0.3, 0.2])
    mask = _batch([0, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0])
    # (0.9 + 0.3) / 1.5; flat non-zero map: |M|/N; all-zero map: no mass, 0; empty mask: nan
    _same(energy_pointing_game(saliency, mask), [1.2 / 1.5, 0.25, 0.0, NAN])


def test_mask_auroc_counts_ties_half():
    saliency = _batch([0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2], [0.9, 0.5, 0.5, 0.1], [0.9, 0.5, 0.5, 0.1],
                      [0.1, 0.2, 0.3, 0.4])
    mask = _batch([1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0])
    # pairs (in, out): 0.9>0.5, 0.9>0.1, 0.5=0.5 (1/2), 0.5>0.1 -> 3.5/4; flat: all ties 0.5; full and empty
    # masks: nothing to rank against, nan; the lowest voxel in the mask ranks below all three others: 0
    _same(mask_auroc(saliency, mask), [3.5 / 4, 0.5, NAN, NAN, 0.0])


def test_best_threshold_iou_takes_the_best_grid_level_lowest_on_ties():
    saliency = _batch([0.9, 0.6, 0.3, 0.0], [0.9, 0.6, 0.3, 0.0], [0, 0, 0, 0])
    mask = _batch([1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0])
    best = best_threshold_iou(saliency, mask)
    # t <= 0.3: {0.9, 0.6, 0.3} -> 2/3; 0.3 < t <= 0.6: exactly the mask -> 1, first reached at t = 0.35;
    # empty mask: nan; all-zero map: {S >= t} is empty for every t > 0 -> 0 at the lowest threshold 0.05
    _same(best["iou"], [1.0, NAN, 0.0])
    _same(best["threshold"], [0.35, NAN, 0.05])
    # an unsorted grid is sorted: t = 0.2 -> 2/3 beats t = 0.7 -> {0.9} -> 1/2
    other = best_threshold_iou(saliency[:1], mask[:1], thresholds=(0.7, 0.2))
    _same(other["iou"], [2 / 3])
    _same(other["threshold"], [0.2])
    assert LOCALISATION_THRESHOLDS[0] == 0.05 and LOCALISATION_THRESHOLDS[-1] == 0.95
    assert len(LOCALISATION_THRESHOLDS) == 19
    with pytest.raises(ValueError, match="empty"):
        best_threshold_iou(saliency, mask, thresholds=())


def test_localisation_scores_bundle_the_four_metrics_and_reject_bad_shapes():
    saliency, mask = _batch([0.9, 0.6, 0.3, 0.0]), _batch([1, 1, 0, 0])
    scores = localisation_scores(saliency, mask)
    assert set(scores) == {"pointing_game", "energy_pointing_game", "mask_auroc", "iou_best_threshold",
                           "best_threshold"}
    _same(scores["pointing_game"], [1.0])
    _same(scores["energy_pointing_game"], [1.5 / 1.8])
    _same(scores["mask_auroc"], [1.0])
    _same(scores["iou_best_threshold"], [1.0])
    with pytest.raises(ValueError, match="differ in shape"):
        pointing_game(saliency, mask[:, :1])


def test_metrics_survive_a_coarse_map_that_iou_at_half_punishes():
    """A blurred map peaking on the lesion: IoU at 0.5 is small, the resolution-robust metrics are not."""
    mask = torch.zeros(1, 9, 9, 9, dtype=torch.float64)
    mask[0, 4, 4, 4] = 1
    coords = torch.arange(9, dtype=torch.float64) - 4
    d2 = coords.view(9, 1, 1) ** 2 + coords.view(1, 9, 1) ** 2 + coords.view(1, 1, 9) ** 2
    saliency = torch.exp(-d2 / 8).unsqueeze(0)  # wide: {S >= 0.5} is |d|^2 <= 8 ln 2 = 5.5,
    # i.e. 1 + 6 + 12 + 8 + 6 + 24 = 57 voxels (|d|^2 = 0, 1, 2, 3, 4, 5)
    from due_ext.metrics.explanation import explanation_scores

    assert explanation_scores(saliency, mask)["iou"].item() == pytest.approx(1 / 57, rel=1e-12)
    _same(pointing_game(saliency, mask), [1.0])
    _same(mask_auroc(saliency, mask), [1.0])
    # the grid's top level 0.95 keeps the peak only (the next voxels have exp(-1/8) = 0.8825)
    _same(best_threshold_iou(saliency, mask)["iou"], [1.0])


def test_mean_lesion_voxels_skips_empty_masks():
    masks = _batch([1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1])
    assert mean_lesion_voxels(masks) == 3.0
    assert mean_lesion_voxels([torch.ones(2, 2), torch.zeros(3), torch.ones(1, 2, 3)]) == 5.0  # any shapes
    with pytest.raises(ValueError, match="every mask is empty"):
        mean_lesion_voxels(torch.zeros(2, 3, 3))


def test_gaussian_blob_has_its_half_level_at_the_equivalent_radius():
    # 3D, radius 2: V = 4/3 pi 2^3; value 1 at the centre (2, 2, 2), 1/2 two voxels away along any axis
    blob = gaussian_blob((5, 5, 5), 4 / 3 * math.pi * 8)
    assert blob.shape == (5, 5, 5) and blob.dtype == torch.float64
    assert blob[2, 2, 2].item() == pytest.approx(1.0, rel=1e-12)
    for point in ((4, 2, 2), (2, 0, 2), (2, 2, 4)):
        assert blob[point].item() == pytest.approx(0.5, rel=1e-12)
    # 1D, V = 2 r with r = 1, even size: centre 1.5 between voxels; value 2^(-(d/r)^2)
    line = gaussian_blob((4,), 2.0)
    expected = [2 ** -2.25, 2 ** -0.25, 2 ** -0.25, 2 ** -2.25]
    assert line.tolist() == pytest.approx(expected, rel=1e-12)


def test_gaussian_blob_is_round_in_millimetres_with_spacing():
    # spacing (1, 1, 4): geometric mean g = 4^(1/3); semi-axes r g / s_i. With r = 4 / g they are 4, 4, 1 voxels
    g = 4 ** (1 / 3)
    radius = 4 / g
    blob = gaussian_blob((9, 9, 3), 4 / 3 * math.pi * radius ** 3, spacing=(1.0, 1.0, 4.0))
    assert blob[4, 4, 1].item() == pytest.approx(1.0, rel=1e-12)
    assert blob[8, 4, 1].item() == pytest.approx(0.5, rel=1e-12)  # 4 voxels = 4 mm along X
    assert blob[4, 0, 1].item() == pytest.approx(0.5, rel=1e-12)
    assert blob[4, 4, 2].item() == pytest.approx(0.5, rel=1e-12)  # 1 voxel = 4 mm along Z
    with pytest.raises(ValueError, match="lesion_voxels"):
        gaussian_blob((4, 4, 4), 0.0)
    with pytest.raises(ValueError, match="spacing"):
        gaussian_blob((4, 4, 4), 8.0, spacing=(1.0, 1.0))


def _tiny_resnet():
    from monai.networks.nets import ResNet

    return ResNet(block="basic", layers=[1, 1, 1, 1], block_inplanes=[4, 4, 8, 8], spatial_dims=3,
                  n_input_channels=1, num_classes=2)


def test_initial_cam_is_the_gradcam_of_the_seeded_network_and_keeps_the_global_rng():
    images = torch.rand(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    cam = initial_cam(_tiny_resnet, images, seed=7, target_layer="layer3")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    assert cam.shape == (2, 16, 16, 16) and not cam.requires_grad
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0

    torch.manual_seed(7)
    reference = _tiny_resnet().eval()
    expected = grad_cam(reference, images, target_layer="layer3")[:, 0]
    assert torch.equal(cam, expected.detach())
    assert torch.equal(initial_cam(_tiny_resnet, images, seed=7, target_layer="layer3"), cam)
    assert not torch.equal(initial_cam(_tiny_resnet, images, seed=8, target_layer="layer3"), cam)


def test_explanation_sweep_counts_values_on_a_threshold_as_inside_in_any_grid_order():
    """The one-pass sweep that best_threshold_iou relies on: ``S >= t`` exactly, thresholds in the given order."""
    from due_ext.metrics.explanation import explanation_sweep

    saliency, mask = _batch([0.5, 0.5, 0.25, 0.75]), _batch([1, 0, 0, 1])
    sweep = explanation_sweep(saliency, mask, (0.75, 0.5, 0.25, 1.0))
    assert list(sweep) == [0.75, 0.5, 0.25, 1.0]
    # t = 0.75: {0.75} -> 1/2; t = 0.5: {0.5, 0.5, 0.75} -> 2/3; t = 0.25: every voxel -> 2/4; t = 1: empty -> 0
    _same(torch.stack([sweep[t]["iou"][0] for t in sweep]), [0.5, 2 / 3, 0.5, 0.0])
    _same(torch.stack([sweep[t]["precision"][0] for t in sweep]), [1.0, 2 / 3, 0.5, 0.0])
    _same(torch.stack([sweep[t]["recall"][0] for t in sweep]), [0.5, 1.0, 1.0, 0.0])
