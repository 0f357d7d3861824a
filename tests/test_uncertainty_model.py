"""The neural-process VAE: shapes for any gap length, padding, determinism at inference, the loss and its gradient,
the target positions, and the cached targets round trip."""

import numpy as np
import pytest
import torch
from torch import nn

from due_ext.uncertainty.inference import predict_block_variance, predict_volume_variance
from due_ext.uncertainty.model import (
    ConvBlock,
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
