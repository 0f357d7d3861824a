"""The explanation-supervised trainer: MONAI's ``SupervisedTrainer`` whose iteration runs one
:class:`~due_ext.explain.supervision.ExplanationSupervision` objective (one forward pass for the whole batch,
cross-entropy on all items, the fused explanation loss on annotated positives, one backward)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from due_ext.data import schema
from due_ext.explain.supervision import ExplanationSupervision


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; raised before the optimizer step so the weights stay the last good ones."""


def batch_to_device(batch: Mapping[str, Any], device: torch.device | str, non_blocking: bool = False) -> dict:
    """Tensors of a collated dictionary batch moved to ``device``; other values kept as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


class ExplanationTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` driven by an explanation-supervision objective.

    Args:
        supervision: the objective (method, lambda, Grad-CAM layer); also accepted as ``loss_function``.
        Every other argument is ``monai.engines.SupervisedTrainer``'s (``loss_function`` is not needed).

    ``engine.state.output`` holds ``image``, ``label``, ``pred`` (logits, detached), ``loss`` (total),
    ``prediction_loss`` and ``explanation_loss`` (batch means over their items), as floats for the loss terms.
    """

    def __init__(self, *args: Any, supervision: ExplanationSupervision | None = None, **kwargs: Any) -> None:
        supervision = supervision if supervision is not None else kwargs.pop("loss_function", None)
        if not isinstance(supervision, ExplanationSupervision):
            raise TypeError("ExplanationTrainer needs supervision=ExplanationSupervision(...)")
        kwargs.setdefault("decollate", False)
        super().__init__(*args, loss_function=supervision, **kwargs)
        self.supervision = supervision

    def _iteration(self, engine: ExplanationTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = batch_to_device(batchdata, engine.state.device, engine.non_blocking)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        result = engine.supervision(engine.network, batch)
        engine.state.output = {Keys.IMAGE: batch[schema.IMAGE], Keys.LABEL: batch[schema.LABEL],
                               Keys.PRED: result.logits}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        if not torch.isfinite(result.loss):
            raise NonFiniteLossError(
                f"non-finite loss {result.loss.item()} (prediction {result.prediction_loss.item()}, explanation "
                f"{result.explanation_loss.sum().item()}) at epoch {engine.state.epoch}, iteration "
                f"{engine.state.iteration}; training stopped before the optimizer step, the last saved checkpoint "
                "is the last good one")
        engine.state.output[Keys.LOSS] = result.loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        result.loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        n_supervised = int(result.supervised.sum())
        engine.state.output.update({
            Keys.PRED: result.logits.detach(),
            Keys.LOSS: result.loss.detach(),
            "prediction_loss": float(result.prediction_loss.detach()),
            "explanation_loss": float(result.explanation_loss.detach().sum()) / max(1, n_supervised),
            "supervised": n_supervised,
        })
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
