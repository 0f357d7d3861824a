"""The ignite pieces of the uncertainty predictor on synthetic cached targets: training lowers the loss, the
validator reports the Spearman key metric, and two runs with the same seed give identical weights."""

import numpy as np
import torch
from ignite.engine import Events
from monai.utils import set_determinism
from torch.utils.data import DataLoader

from due_ext.uncertainty.model import NeuralProcessUncertainty
from due_ext.uncertainty.targets import VarianceTargetDataset, VarianceTargets
from due_ext.uncertainty.training import (
    ErrorAUROCMetric,
    NeuralProcessTrainer,
    NeuralProcessValidator,
    SpearmanMetric,
)

CROP = 8


def synthetic_targets(n: int = 12, seed: int = 0) -> VarianceTargets:
    """Blocks whose variance is high where the two annotated slices disagree, peaking mid-gap: learnable."""
    rng = np.random.default_rng(seed)
    lower = (rng.random((n, CROP, CROP)) > 0.5).astype(np.uint8)
    upper = (rng.random((n, CROP, CROP)) > 0.5).astype(np.uint8)
    gaps = rng.integers(1, 4, n)
    variance = np.zeros((n, 3, CROP, CROP), np.float32)
    for j, gap in enumerate(gaps):
        for i in range(gap):
            t = (i + 1) / (gap + 1)
            variance[j, i] = 0.2 * t * (1 - t) * 4 * (lower[j] != upper[j]) + 1e-3
    return VarianceTargets(lower=lower, upper=upper, gaps=gaps, variance=variance, mean=np.zeros_like(variance),
                           truth=np.zeros(variance.shape, np.uint8), has_truth=np.zeros(n, bool),
                           source=np.zeros((n, 5), np.int64), meta={"format": 1})


def train_once(epochs: int = 3) -> tuple[NeuralProcessUncertainty, list[float], dict]:
    set_determinism(seed=0)
    network = NeuralProcessUncertainty(features=(4, 8), latent_dim=2, embed_dim=4, norm_groups=2, crop_size=CROP)
    loader = DataLoader(VarianceTargetDataset(synthetic_targets(), augment=True), batch_size=4, shuffle=True)
    validator = NeuralProcessValidator(device=torch.device("cpu"), val_data_loader=DataLoader(
        VarianceTargetDataset(synthetic_targets(6, seed=1)), batch_size=3), network=network)
    trainer = NeuralProcessTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=loader,
                                   network=network, optimizer=torch.optim.Adam(network.parameters(), 5e-2))
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["loss"])))
    trainer.run()
    validator.run()
    return network, losses, dict(validator.state.metrics)


def test_training_lowers_the_loss_and_validation_reports_spearman():
    _, losses, metrics = train_once(epochs=5)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert set(metrics) == {"val_spearman", "val_l1"}
    assert -1.0 <= metrics["val_spearman"] <= 1.0 and metrics["val_l1"] > 0


def test_training_is_deterministic():
    first, losses_a, _ = train_once(epochs=2)
    second, losses_b, _ = train_once(epochs=2)
    assert losses_a == losses_b
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_spearman_metric_constant_prediction_is_worst():
    metric = SpearmanMetric()
    metric.reset()
    metric.update((torch.zeros(10), torch.rand(10)))
    assert metric.compute() == -1.0
    metric.reset()
    metric.update((torch.arange(10.0), torch.arange(10.0) ** 2))
    assert metric.compute() == 1.0


def test_error_auroc_metric_against_hand_counts():
    metric = ErrorAUROCMetric()
    metric.reset()
    # errors at scores 0.9 and 0.4, correct voxels at 0.5, 0.1, 0.1: of the 6 (error, correct) pairs
    # only (0.4, 0.5) is ranked wrong
    metric.update((torch.tensor([0.9, 0.4, 0.5, 0.1, 0.1]), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])))
    assert metric.compute() == 5 / 6
    metric.reset()
    metric.update((torch.rand(4), torch.zeros(4)))
    assert metric.compute() == 0.5  # no error to rank: chance, not a crash


def test_validator_reports_error_auroc_on_blocks_with_truth():
    targets = synthetic_targets(6, seed=1)
    targets.has_truth[:] = True
    targets.truth[:, 0] = targets.lower != targets.upper  # the first missing slice is wrong where they disagree
    network = NeuralProcessUncertainty(features=(4, 8), latent_dim=2, embed_dim=4, norm_groups=2, crop_size=CROP)
    validator = NeuralProcessValidator(device=torch.device("cpu"), network=network,
                                       val_data_loader=DataLoader(VarianceTargetDataset(targets), batch_size=3),
                                       key_val_metric={"val_error_auroc": ErrorAUROCMetric()})
    validator.run()
    assert validator.state.key_metric_name == "val_error_auroc"
    assert 0.0 <= validator.state.metrics["val_error_auroc"] <= 1.0
    # the network is untrained: constant predictions rank nothing, all pairs tie
    assert validator.state.metrics["val_error_auroc"] == 0.5
