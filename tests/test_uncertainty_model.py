"""The neural-process VAE: shapes for any gap length, padding, determinism at inference, the loss and its gradient,
the target positions, and the cached targets round trip."""

import numpy as np
import pytest
import torch
from torch import nn

from due_ext.uncertainty.inference import predict_block_variance, predict_volume_variance
from due_ext.uncertainty.model import (
    ConvBlock,
    NeuralProcessOutput,
    NeuralProcessUncertainty,
    gaussian_kl,
    log_variance_target,
    neural_process_loss,
    target_positions,
)
from due_ext.uncertainty.targets import VarianceTargetDataset, VarianceTargets, phased_sparse_slices

CROP = 16


def tiny_model(seed: int = 0) -> NeuralProcessUncertainty:
    torch.manual_seed(seed)
    return NeuralProcessUncertainty(features=(8, 8), latent_dim=4, embed_dim=8, norm_groups=4, crop_size=CROP)


def crops(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(batch, 1, CROP, CROP, generator=g) > 0.5).float(),
            (torch.rand(batch, 1, CROP, CROP, generator=g) > 0.5).float())


def test_target_positions_lie_strictly_between_the_conditions():
    positions, valid, span = target_positions([1, 3, 6])
    assert positions.shape == (3, 6) and valid.sum(dim=1).tolist() == [1, 3, 6]
    assert torch.allclose(positions[0, :1], torch.tensor([0.5]))
    assert torch.allclose(positions[1, :3], torch.tensor([0.25, 0.5, 0.75]))
    assert torch.all(positions[valid] > 0) and torch.all(positions[valid] < 1)
    assert torch.all(positions[~valid] == 0) and span.tolist() == [2.0, 4.0, 7.0]
    with pytest.raises(ValueError, match="gap"):
        target_positions([0, 2])


@pytest.mark.parametrize("gaps", [[1], [4], [1, 7, 3], [12, 2]])
def test_output_shapes_for_any_gap_length(gaps):
    model = tiny_model().eval()
    lower, upper = crops(len(gaps))
    out = model(lower, upper, gaps)
    assert out.log_var.shape == (len(gaps), max(gaps), CROP, CROP)
    variance = model.predict_variance(lower, upper, gaps)
    assert variance.shape == out.log_var.shape and variance.min() >= 0 and variance.max() <= 0.25
    for b, gap in enumerate(gaps):
        assert torch.all(variance[b, gap:] == 0)  # padded slices carry nothing


def test_inference_is_deterministic_and_independent_of_batching():
    model = tiny_model()
    lower, upper = crops(3)
    gaps = [2, 5, 1]
    first = model.predict_variance(lower, upper, gaps)
    assert torch.equal(first, model.predict_variance(lower, upper, gaps))
    alone = model.predict_variance(lower[1:2], upper[1:2], [5])
    torch.testing.assert_close(alone[0], first[1], rtol=1e-5, atol=1e-7)
    # the numpy helper sorts and chunks blocks: same values
    split = predict_block_variance(model, lower[:, 0].numpy(), upper[:, 0].numpy(), gaps, batch_size=1)
    for b, gap in enumerate(gaps):
        np.testing.assert_allclose(split[b], first[b, :gap].numpy(), rtol=1e-5, atol=1e-7)


def test_targets_change_training_output_only_through_the_latent():
    model = tiny_model().train()
    lower, upper = crops(2)
    target = torch.randn(2, 3, CROP, CROP) - 6
    out = model(lower, upper, [3, 2], target)
    assert out.posterior is not None and out.posterior[0].shape == (2, 4)
    prior_only = model.eval()(lower, upper, [3, 2], target)  # eval: prior mean even when targets are given
    assert torch.equal(prior_only.log_var, model(lower, upper, [3, 2]).log_var)


def test_loss_reconstruction_kl_and_gradients():
    model = tiny_model().train()
    lower, upper = crops(2)
    gaps = [3, 1]
    target = log_variance_target(torch.rand(2, 3, CROP, CROP) * 0.1)
    out = model(lower, upper, gaps, target)
    losses = neural_process_loss(out, target)
    manual = ((out.log_var[0] - target[0]).abs().mean() + (out.log_var[1, :1] - target[1, :1]).abs().mean()) / 2
    torch.testing.assert_close(losses["reconstruction"], manual)
    assert losses["kl"] >= 0
    losses["loss"].backward()
    assert model.encoder.levels[0][0].weight.grad.abs().sum() > 0
    assert model.posterior_head[0].weight.grad.abs().sum() > 0


def test_gaussian_kl_reference_values():
    zero = (torch.zeros(1, 3), torch.zeros(1, 3))
    assert gaussian_kl(zero, zero).item() == 0.0
    shifted = (torch.ones(1, 3), torch.zeros(1, 3))
    assert gaussian_kl(shifted, zero).item() == pytest.approx(1.5)  # 0.5 * sum(mu^2)


def test_bad_inputs_raise():
    model = tiny_model()
    lower, upper = crops(2)
    with pytest.raises(ValueError, match="gaps for 2 blocks"):
        model(lower, upper, [1])
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(lower[:, 0], upper[:, 0], [1, 2])
    with pytest.raises(ValueError, match="divisible"):
        NeuralProcessUncertainty(features=(8, 8, 8), crop_size=18)


def test_volume_prediction_pastes_into_the_gaps_only():
    model = tiny_model()
    with torch.no_grad():
        model.head.bias.fill_(-3.0)  # an untrained head predicts exactly "no variance"; make it visible
    annotation = np.zeros((20, 20, 10), np.float32)
    annotation[5:12, 6:13, [1, 4, 8]] = 1.0
    annotation[7:9, 7:9, 6] = 1.0  # not annotated: must be ignored
    (variance,) = predict_volume_variance(model, [annotation], [[1, 4, 8]])
    assert variance.shape == annotation.shape
    assert np.all(variance[..., [0, 1, 4, 8, 9]] == 0.0)
    assert np.all(variance[..., [2, 3, 5, 6, 7]].max(axis=(0, 1)) > 0.0)


def test_phased_sparse_slices_and_cache_round_trip(tmp_path):
    mask = np.zeros((4, 4, 12), np.uint8)
    mask[1:3, 1:3, 2:11] = 1
    assert phased_sparse_slices(mask, 3, 0) == [2, 5, 8, 10]
    assert phased_sparse_slices(mask, 3, 1) == [2, 3, 6, 9, 10]
    targets = VarianceTargets(lower=np.ones((2, 8, 8), np.uint8), upper=np.zeros((2, 8, 8), np.uint8),
                              gaps=np.array([1, 2]), variance=np.random.default_rng(0).random((2, 2, 8, 8), np.float32),
                              mean=np.zeros((2, 2, 8, 8), np.float32), truth=np.zeros((2, 2, 8, 8), np.uint8),
                              has_truth=np.array([False, False]), source=np.zeros((2, 5), np.int64),
                              meta={"format": 1, "note": "test"})
    loaded = VarianceTargets.load(targets.save(tmp_path / "t.npz"))
    assert loaded.meta == targets.meta and np.array_equal(loaded.variance, targets.variance)
    item = VarianceTargetDataset(loaded, augment=True, seed=3)[1]
    assert item["gap"] == 2 and item["lower"].shape == (1, 8, 8)
    torch.testing.assert_close(item["log_variance"], torch.log(item["variance"] + 1e-4))
    (tmp_path / "bad.npz").write_bytes(b"not a cache")
    with pytest.raises(ValueError, match="bad.npz"):
        VarianceTargets.load(tmp_path / "bad.npz")


def test_conv_block_computes_what_its_layers_do_in_sequence():
    block = ConvBlock(3, 8, norm_groups=4).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(block(x), nn.Sequential.forward(block, x), rtol=0, atol=0)


def test_gaussian_reconstruction_is_half_the_itakura_saito_divergence():
    model = tiny_model().train()
    lower, upper = crops(2)
    target = log_variance_target(torch.rand(2, 3, CROP, CROP) * 0.5)
    out = model(lower, upper, [3, 1], target)
    losses = neural_process_loss(out, target, likelihood="gaussian")
    ratio = torch.exp(target - out.log_var)  # v / s
    divergence = 0.5 * (ratio - torch.log(ratio) - 1.0)
    manual = (divergence[0].mean() + divergence[1, :1].mean()) / 2
    torch.testing.assert_close(losses["reconstruction"], manual)
    # 0 exactly where the prediction equals the target
    perfect = neural_process_loss(NeuralProcessOutput(target.clone(), out.valid, out.prior, None), target,
                                  likelihood="gaussian")
    assert perfect["reconstruction"].item() == 0.0
    with pytest.raises(ValueError, match="likelihood"):
        neural_process_loss(out, target, likelihood="poisson")


def test_gaussian_loss_is_minimised_by_the_mean_of_the_targets():
    # one voxel seen with target variances 0.01 (3 times) and 0.61 (once): the minimiser of the mean divergence is
    # their mean 0.16 (+ eps) for "gaussian"; "laplace" (L1 on the log) picks the median, 0.01 (+ eps)
    values = torch.tensor([0.01, 0.01, 0.01, 0.61])
    targets = log_variance_target(values)[:, None, None, None]  # (4, 1, 1, 1): four blocks, one voxel each
    valid = torch.ones(4, 1, dtype=torch.bool)
    prior = (torch.zeros(4, 1), torch.zeros(4, 1))
    grid = torch.linspace(-6.0, 0.0, 6001)

    def best(likelihood: str) -> float:
        outputs = (NeuralProcessOutput(torch.full((4, 1, 1, 1), float(g)), valid, prior, None) for g in grid)
        losses = [neural_process_loss(o, targets, likelihood=likelihood)["loss"].item() for o in outputs]
        return float(torch.exp(grid[int(np.argmin(losses))]) - 1e-4)

    assert best("gaussian") == pytest.approx(0.16, abs=2e-3)  # grid step 1e-3 in log: 0.1 % of the value
    assert best("laplace") == pytest.approx(0.01, abs=1e-4)


def test_predicted_variance_is_clamped_to_max_variance():
    model = NeuralProcessUncertainty(features=(4, 8), latent_dim=2, embed_dim=4, norm_groups=2, crop_size=CROP,
                                     max_variance=1.0)
    with torch.no_grad():
        model.head.bias.fill_(0.0)  # log(var + eps) = 0: var = 1 - eps, above the diffusion cap 0.25
    lower, upper = crops(1)
    assert model.predict_variance(lower, upper, [1]).max().item() == pytest.approx(1.0 - 1e-4)
    model.max_variance = 0.25
    assert model.predict_variance(lower, upper, [1]).max().item() == 0.25
    with pytest.raises(ValueError, match="max_variance"):
        NeuralProcessUncertainty(features=(4, 8), crop_size=CROP, max_variance=0.0)


def test_squared_error_target_adds_the_squared_bias_where_the_truth_is_known():
    variance = np.full((2, 2, 4, 4), 0.01, np.float32)
    mean = np.zeros((2, 2, 4, 4), np.float32)
    mean[:, 0, 0, 0] = 0.7  # filled, truth empty: wrong (squared error 0.01 + 0.49)
    mean[:, 0, 1, 1] = 0.3  # empty, truth empty: right (0.01 + 0.09)
    truth = np.zeros((2, 2, 4, 4), np.uint8)
    truth[:, 0, 2, 2] = 1  # missed: wrong (0.01 + 1)
    variance[:, 1], mean[:, 1] = 0.0, 0.0  # block 0 has gap 2, block 1 gap 1: its slot 1 is padding
    targets = VarianceTargets(lower=np.zeros((2, 4, 4), np.uint8), upper=np.zeros((2, 4, 4), np.uint8),
                              gaps=np.array([2, 1]), variance=variance, mean=mean, truth=truth,
                              has_truth=np.array([True, False]), source=np.zeros((2, 5), np.int64),
                              meta={"format": 1})
    known = VarianceTargetDataset(targets, target="squared_error")[0]
    expected = np.full((2, 4, 4), 0.01, np.float32)
    expected[1] = 0.0
    expected[0, 0, 0], expected[0, 1, 1], expected[0, 2, 2] = 0.5, 0.1, 1.01
    np.testing.assert_allclose(known["variance"].numpy(), expected, rtol=1e-6)  # float32 sums of 2 terms
    assert known["has_truth"] and known["error"].sum().item() == 2.0
    assert known["error"][0, 0, 0] == 1 and known["error"][0, 2, 2] == 1 and known["error"][0, 1, 1] == 0
    unknown = VarianceTargetDataset(targets, target="squared_error")[1]  # no truth: the variance, no errors
    np.testing.assert_array_equal(unknown["variance"].numpy(), variance[1])
    assert not unknown["has_truth"] and unknown["error"].sum().item() == 0.0
    plain = VarianceTargetDataset(targets)[0]
    np.testing.assert_array_equal(plain["variance"].numpy(), variance[0])
    with pytest.raises(ValueError, match="target"):
        VarianceTargetDataset(targets, target="bias")


def test_extra_full_masks_add_blocks_with_truth_after_the_datalist(tmp_path):
    from due_ext.data.datalist import write_json_atomic
    from due_ext.data.nifti import write_nifti
    from due_ext.uncertainty.targets import collect_blocks

    item_mask = np.zeros((20, 20, 8), np.uint8)
    item_mask[5:12, 5:12, 1:6] = 1  # lesion on slices 1-5
    write_nifti(tmp_path / "m.nii.gz", item_mask)
    write_json_atomic(tmp_path / "d.json", {"training": [{"mask": "m.nii.gz", "label": 1}]})
    shape = np.zeros((20, 20, 8), np.uint8)
    shape[3:9, 3:9, 2:7] = 1  # slices 2-6
    from_datalist = collect_blocks(tmp_path / "d.json", ["training"], every_k=[2], crop_size=CROP)
    both = collect_blocks(tmp_path / "d.json", ["training"], every_k=[2], crop_size=CROP,
                          masks=[shape, np.zeros_like(shape)])
    # k = 2 over lesion slices 1-5: phase 0 keeps 1, 3, 5; phase 1 keeps 1, 2, 4, 5 (blocks need a gap)
    assert [b["source"][2:4] for b in from_datalist] == [(1, 3), (3, 5), (2, 4)]
    extra = both[len(from_datalist):]
    assert [b["source"][:4] for b in extra] == [(1, 0, 2, 4), (1, 0, 4, 6), (1, 0, 3, 5)]  # section 1: after
    # "training"; the empty mask adds nothing
    assert all(b["truth"] is not None and b["truth"].shape == (b["gap"], CROP, CROP) for b in extra)
    assert extra[0]["truth"][0].sum() == 36  # block (2, 4): its missing slice 3 is the shape's 6x6 square
