"""Training the uncertainty predictor with ignite (MONAI engines), on cached diffusion-variance targets.

- :func:`load_interpolator` and :func:`target_datasets`: the trained interpolator and the cached targets
  (:mod:`due_ext.uncertainty.targets`) for the training and validation sections of a datalist.
- :class:`NeuralProcessTrainer`: MONAI ``SupervisedTrainer`` whose iteration is the neural-process loss
  (:func:`~due_ext.uncertainty.model.neural_process_loss`: L1 on ``log(var + eps)`` + KL, latent drawn from
  the posterior). ``engine.state.output``: ``loss``, ``reconstruction``, ``kl``.
- :class:`NeuralProcessValidator`: MONAI ``SupervisedEvaluator`` predicting deterministically (prior mean, no
  target seen); metrics :class:`SpearmanMetric` (``val_spearman``, the key metric, higher is better: rank
  agreement with the learned target over the validation blocks' voxels) and ``val_l1`` (mean absolute
  error of ``log(var + eps)``); :class:`ErrorAUROCMetric` (``val_error_auroc``: how well the prediction ranks
  the voxels where the interpolation is wrong, the evaluation's question) can be the key metric instead.
Checkpointing (resume, best model) uses :mod:`due_ext.engines.checkpoints`; wiring is in the bundle config.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from ignite.metrics import Average, Metric
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

from due_ext.interp.diffusion.inference import load_interpolator_weights
from due_ext.interp.diffusion.sampling import SamplerSettings
from due_ext.metrics.prediction import roc_auc
from due_ext.metrics.uncertainty import spearman
from due_ext.uncertainty.model import neural_process_loss
from due_ext.uncertainty.targets import (
    ERROR,
    GAP,
    HAS_TRUTH,
    LOG_VARIANCE,
    LOWER,
    UPPER,
    VARIANCE,
    VarianceTargetDataset,
    cached_variance_targets,
)

logger = logging.getLogger("due_ext.uncertainty")

#: Most voxels the Spearman metric keeps (a fixed, evenly spaced subset beyond that), to bound memory.
SPEARMAN_MAX_VOXELS = 2_000_000


def load_interpolator(network: nn.Module, weights: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The interpolator whose variance the predictor learns: ``network`` with ``weights`` loaded (fails loudly
    when the file is missing), in eval mode on ``device``."""
    return load_interpolator_weights(network, weights).to(device).eval()


def target_datasets(interpolator: nn.Module, interpolator_weights: str | os.PathLike, datalist: str | os.PathLike,
                    cache_dir: str | os.PathLike, every_k: Sequence[int] = (2, 3, 4, 5),
                    settings: SamplerSettings | dict | None = None, training_sections: Sequence[str] = ("training",),
                    validation_sections: Sequence[str] = ("validation",), augment: bool = True, seed: int = 0,
                    eps: float = 1e-4, device: str | torch.device = "cpu", target: str = "variance",
                    training_masks: Sequence[np.ndarray] = (), validation_masks: Sequence[np.ndarray] = ()
                    ) -> dict[str, VarianceTargetDataset]:
    """``{"training": ..., "validation": ...}`` datasets of cached target blocks (computed on first use into
    ``cache_dir/targets_<section>.npz``) learning ``target`` (:class:`VarianceTargetDataset`). Training blocks
    are augmented; validation blocks are not. ``training_masks`` and ``validation_masks`` (full masks, e.g.
    procedural shapes) add their blocks to the training or the validation set."""
    out = {}
    for name, sections in (("training", training_sections), ("validation", validation_sections)):
        extra = training_masks if name == "training" else validation_masks
        targets = cached_variance_targets(Path(cache_dir) / f"targets_{name}.npz", interpolator, datalist, sections,
                                          every_k, settings, interpolator_weights=interpolator_weights, device=device,
                                          masks=extra)
        out[name] = VarianceTargetDataset(targets, augment=augment and name == "training", seed=seed, eps=eps,
                                          target=target)
        logger.info("%s: %d target blocks (gaps %s)", name, len(targets), sorted(set(targets.gaps.tolist())))
    return out


def _batch(batchdata: dict[str, Any], device: torch.device) -> tuple[torch.Tensor, ...]:
    if batchdata is None:
        raise ValueError("Must provide batch data for current iteration.")
    gaps = torch.as_tensor(batchdata[GAP]).reshape(-1)
    return (batchdata[LOWER].to(device), batchdata[UPPER].to(device), gaps, batchdata[LOG_VARIANCE].to(device),
            batchdata[VARIANCE].to(device))


def _truth_voxels(batchdata: dict[str, Any], valid: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Error labels ``(B, width, H, W)`` and the mask of valid voxels of blocks with a true mask."""
    error = batchdata[ERROR][:, :width]
    has_truth = torch.as_tensor(batchdata[HAS_TRUTH]).reshape(-1, 1).to(valid.device)
    return error, (valid & has_truth)[..., None, None].expand(error.shape).cpu()


class NeuralProcessTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` with the neural-process iteration. Extra arguments: ``beta`` (weight of the KL term)
    and ``likelihood`` (of the reconstruction term, :func:`~due_ext.uncertainty.model.neural_process_loss`).
    A dataset with ``set_epoch`` gets the epoch number at each epoch start (its augmentation stream)."""

    def __init__(self, *args: Any, beta: float = 1.0, likelihood: str = "laplace", **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("loss_function", neural_process_loss)
        super().__init__(*args, **kwargs)
        self.beta, self.likelihood = float(beta), likelihood
        dataset = getattr(self.data_loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            self.add_event_handler(Events.EPOCH_STARTED, lambda engine: dataset.set_epoch(engine.state.epoch))

    def _iteration(self, engine: NeuralProcessTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        lower, upper, gaps, target, _ = _batch(batchdata, engine.state.device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        output = engine.network(lower, upper, gaps, target)
        losses = neural_process_loss(output, target, beta=engine.beta, likelihood=engine.likelihood)
        engine.state.output = {k: v.detach() for k, v in losses.items()}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(losses["loss"]):
            raise FloatingPointError(f"non-finite neural-process loss {losses['loss'].item()} at epoch "
                                     f"{engine.state.epoch}, iteration {engine.state.iteration}")
        losses["loss"].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class NeuralProcessValidator(SupervisedEvaluator):
    """Deterministic prediction (prior mean) on validation blocks. ``engine.state.output``: ``l1`` (per-batch
    mean absolute error of ``log(var + eps)``), ``pred`` and ``target`` (variances of the valid voxels, 1-D),
    ``error_pred`` and ``error`` (the predicted variance and the error labels of the valid voxels of blocks with
    a true mask, 1-D). Default metrics: key ``val_spearman`` (higher is better) and ``val_l1``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("key_val_metric", {"val_spearman": SpearmanMetric()})
        kwargs.setdefault("additional_metrics", {"val_l1": Average(output_transform=lambda output: output["l1"])})
        super().__init__(*args, **kwargs)

    def _iteration(self, engine: NeuralProcessValidator, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        lower, upper, gaps, target, variance = _batch(batchdata, engine.state.device)
        engine.network.eval()
        with torch.no_grad():
            output = engine.network(lower, upper, gaps)
        width = output.log_var.shape[1]
        valid = output.valid
        l1 = ((output.log_var - target[:, :width]).abs().mean(dim=(-2, -1)) * valid).sum() / valid.sum()
        voxels = valid[..., None, None].expand_as(output.log_var)
        predicted = (torch.exp(output.log_var) - engine.network.eps).clamp(min=0.0)
        error, known = _truth_voxels(batchdata, valid, width)
        predicted = predicted.cpu()
        engine.state.output = {"l1": l1, "pred": predicted[voxels.cpu()], "target": variance[:, :width][voxels].cpu(),
                               "error_pred": predicted[known], "error": error[known]}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        return engine.state.output


class SpearmanMetric(Metric):
    """Spearman correlation between ``output["pred"]`` and ``output["target"]`` over all voxels of an epoch
    (evenly subsampled to at most :data:`SPEARMAN_MAX_VOXELS`)."""

    def __init__(self, output_transform=lambda output: (output["pred"], output["target"]), device: str = "cpu"):
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self._pred: list[np.ndarray] = []
        self._target: list[np.ndarray] = []

    def update(self, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        pred, target = output
        self._pred.append(pred.detach().float().cpu().numpy().ravel())
        self._target.append(target.detach().float().cpu().numpy().ravel())

    def _epoch_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's predictions and targets, evenly subsampled to at most ``SPEARMAN_MAX_VOXELS`` voxels."""
        if not self._pred:
            raise RuntimeError(f"{type(self).__name__}: no validation output was seen")
        pred, target = np.concatenate(self._pred), np.concatenate(self._target)
        if pred.size > SPEARMAN_MAX_VOXELS:
            keep = np.linspace(0, pred.size - 1, SPEARMAN_MAX_VOXELS).astype(np.int64)
            pred, target = pred[keep], target[keep]
        return pred, target

    def compute(self) -> float:
        value = spearman(*self._epoch_arrays())
        return -1.0 if np.isnan(value) else value  # a constant prediction ranks nothing: worst, not a crash


class ErrorAUROCMetric(SpearmanMetric):
    """AUROC of ``output["error_pred"]`` for ``output["error"]`` (the voxels where the interpolation is wrong)
    over all voxels of an epoch (:func:`~due_ext.metrics.prediction.roc_auc`; subsampled like
    :class:`SpearmanMetric`); 0.5 (chance) when the epoch saw no error or only errors."""

    def __init__(self, output_transform=lambda output: (output["error_pred"], output["error"]), device: str = "cpu"):
        super().__init__(output_transform=output_transform, device=device)

    def compute(self) -> float:
        pred, error = self._epoch_arrays()
        value = roc_auc(error, pred)
        return 0.5 if np.isnan(value) else value


class LossProgressBar:
    """ignite's tqdm progress bar over iterations showing the loss terms; ``attach(engine)`` like MONAI handlers."""

    def __init__(self, persist: bool = False) -> None:
        from ignite.handlers import ProgressBar

        self.bar = ProgressBar(persist=persist)

    def attach(self, engine: SupervisedTrainer) -> None:
        self.bar.attach(engine, output_transform=lambda output: {k: float(v) for k, v in output.items()})
