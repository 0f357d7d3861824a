"""Uncertainty metrics against references, and the evaluation (library and CLI) on tiny masks with untrained
networks: the numbers exist, are in range, and the cheap baselines behave as defined."""

import json

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from due_ext.cli import main
from due_ext.data.nifti import write_nifti
from due_ext.interp.diffusion.model import SliceInterpolationUNet
from due_ext.interp.diffusion.sampling import SamplerSettings
from due_ext.metrics.uncertainty import classical_disagreement, edge_proximity, spearman
from due_ext.uncertainty.evaluate import (
    SCORES,
    block_scores,
    evaluate_uncertainty,
    markdown_table,
    network_from_bundle,
    summarise,
)
from due_ext.uncertainty.model import NeuralProcessUncertainty


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, 200).astype(float)
    b = a + rng.normal(0, 2, 200)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(b, np.exp(b)) == pytest.approx(1.0)
    assert spearman(b, -b) == pytest.approx(-1.0)
    assert np.isnan(spearman(np.zeros(5), b[:5]))
    with pytest.raises(ValueError, match="differ in size"):
        spearman(a, b[:10])


def test_edge_proximity_hand_made():
    slices = np.zeros((2, 9, 9))
    slices[0, 2:7, 2:7] = 1.0  # a 5x5 square, one slice from an annotation
    fallback = np.zeros((9, 9), bool)
    fallback[4, 4] = True
    scores = edge_proximity(slices, [1, 2], fallback=fallback)
    assert scores[0, 2, 2] == pytest.approx(np.exp(-1.0 / 2.0))  # inside, 1 voxel deep
    assert scores[0, 1, 4] == pytest.approx(np.exp(-1.0 / 2.0))  # outside, 1 voxel away
    assert scores[0, 4, 4] < scores[0, 3, 4] < scores[0, 2, 4]  # deeper inside: more certain
    assert scores[1, 4, 4] == pytest.approx(1.0) and scores[1, 4, 6] == pytest.approx(np.exp(-2.0 / 3.0))
    assert np.all(edge_proximity(np.zeros((1, 4, 4)), [1]) == 0.0)  # no boundary, no fallback


def test_classical_disagreement_is_the_variance_of_the_three():
    assert classical_disagreement(np.ones(3), np.ones(3), np.ones(3)).tolist() == [0.0, 0.0, 0.0]
    assert classical_disagreement([1.0], [0.5], [0.0])[0] == pytest.approx(np.var([1.0, 0.5, 0.0]))


def test_block_scores_edge_proximity_of_the_sdf_fill_and_np_margin():
    lower = np.zeros((9, 9), np.float32)
    lower[2:7, 2:7] = 1  # 5x5
    upper = np.zeros((9, 9), np.float32)
    upper[3:6, 3:6] = 1  # 3x3, same centre
    truth = np.zeros((1, 9, 9), np.float32)
    truth[0, 2:7, 2:7] = 1
    wrong = np.zeros((1, 9, 9), np.float32)  # a diffusion mean that drew nothing
    block = {"lower": lower, "upper": upper, "truth": truth, "gap": 1}
    scores = block_scores(block, wrong, np.zeros_like(wrong), np.zeros_like(wrong))
    # SDF fill of the gap slice at t = 0.5: the rim of the 5x5 (-1 below, +1 above) ties and is kept, its corners
    # (+sqrt 2 above) are not: the 5x5 square less its 4 corners
    sdf_fill = np.zeros((1, 9, 9), np.float32)
    sdf_fill[0, 2:7, 2:7] = 1
    sdf_fill[0, [2, 2, 6, 6], [2, 6, 2, 6]] = 0
    np.testing.assert_allclose(scores["edge_proximity_sdf"], edge_proximity(sdf_fill, [1]))
    # centre: the nearest background voxel is a cut corner, sqrt(8) away; one slice from an annotation: 1 + 1
    assert scores["edge_proximity_sdf"][0, 4, 4] == pytest.approx(np.exp(-np.sqrt(8.0) / 2.0))
    # the empty diffusion mean has no boundary: its edge proximity falls back to the union of the two slices
    assert scores["edge_proximity"][0, 4, 4] == pytest.approx(1.0)
    assert scores["error"].sum() == 25
    # margin = NP AUROC minus the best other AUROC: a perfect NP score against the rest
    perfect = dict(scores, np_variance=truth.copy())
    summary = summarise([perfect])
    assert summary["auroc"]["np_variance"] == pytest.approx(1.0)
    others = [v for k, v in summary["auroc"].items() if k != "np_variance"]
    assert summary["np_margin"] == pytest.approx(1.0 - max(others))
    table = markdown_table({"every_k": [2], "per_k": {"2": summary}, "all": summary})
    assert "AUROC edge proximity (SDF)" in table and table.splitlines()[0].count("|") == len(SCORES) + 6
    assert table.splitlines()[2].endswith(f"| {summary['np_margin']:+.3f} |")


def tiny_masks() -> list[tuple[str, np.ndarray]]:
    masks = []
    for i, radius in enumerate((3.5, 5.0)):
        x, y, z = np.meshgrid(np.arange(20), np.arange(20), np.arange(12), indexing="ij")
        inside = ((x - 10) ** 2 + (y - 9) ** 2) / radius ** 2 + ((z - 6) / 4.5) ** 2 <= 1
        masks.append((f"m{i}", inside.astype(np.uint8)))
    return masks


def test_evaluate_uncertainty_library():
    torch.manual_seed(0)
    interpolator = SliceInterpolationUNet(channels=(8, 8), norm_num_groups=4, num_head_channels=8, crop_size=16)
    predictor = NeuralProcessUncertainty(features=(8, 8), latent_dim=4, embed_dim=8, norm_groups=4, crop_size=16)
    with torch.no_grad():
        predictor.head.weight.normal_(0, 0.5)  # untrained heads are constant; give the ranking something to rank
        # MONAI zero-initialises the UNet's output conv and residual branches' last convs: untrained, it predicts
        # 0 whatever the noise, so every repeat is the same fill and the diffusion variance is exactly 0 (its
        # Spearman with anything is nan); only float rounding of one build made it non-zero before
        for p in interpolator.parameters():
            if p.dim() > 1 and not p.any():
                torch.nn.init.normal_(p, std=0.1)
    results = evaluate_uncertainty(tiny_masks(), predictor, interpolator, every_k=(2, 3),
                                   settings=SamplerSettings(steps=1, repeats=2))
    assert set(results["per_k"]) == {"2", "3"}
    total = results["all"]
    assert total["n_blocks"] == sum(results["per_k"][k]["n_blocks"] for k in ("2", "3")) > 0
    assert -1.0 <= total["spearman"] <= 1.0 and 0.0 < total["error_rate"] < 1.0
    assert set(total["auroc"]) == set(SCORES) and all(0.0 <= v <= 1.0 for v in total["auroc"].values())
    predictor.crop_size = 24
    with pytest.raises(ValueError, match="same crops"):
        evaluate_uncertainty(tiny_masks(), predictor, interpolator, every_k=(2,))


def test_cli_evaluate_writes_results(tmp_path):
    from due_ext.bundles import bundle_root

    # the bundles' own network definitions, with random weights (the shipped ones may not exist yet)
    torch.manual_seed(0)
    interpolator = network_from_bundle(f"{bundle_root('interpolator')}/inference.json")
    predictor = network_from_bundle(f"{bundle_root('uncertainty')}/inference.json")
    torch.save(interpolator.state_dict(), tmp_path / "interp.pt")
    torch.save(predictor.state_dict(), tmp_path / "np.pt")
    for name, mask in tiny_masks():
        write_nifti(tmp_path / "masks" / f"{name}.nii.gz", np.moveaxis(mask, 2, 0))  # slices along axis 0
    out = tmp_path / "results.json"
    main(["uncertainty", "evaluate", "--masks", str(tmp_path / "masks"), "--every-k", "3", "--axis", "0",
          "--out", str(out), "--model-path", str(tmp_path / "np.pt"), "--interpolator-path",
          str(tmp_path / "interp.pt"), "--steps", "1", "--repeats", "2"])
    results = json.loads(out.read_text())
    assert results["axis"] == 0 and results["n_masks"] == 2 and results["per_k"]["3"]["n_blocks"] >= 2
    assert out.with_suffix(".md").read_text().startswith("| k |")


def test_cli_evaluate_fails_loudly_without_weights(tmp_path):
    for name, mask in tiny_masks():
        write_nifti(tmp_path / "masks" / f"{name}.nii.gz", mask)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        main(["uncertainty", "evaluate", "--masks", str(tmp_path / "masks"), "--model-path",
              str(tmp_path / "missing.pt"), "--interpolator-path", str(tmp_path / "missing.pt")])
