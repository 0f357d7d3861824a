"""ignite metrics over an epoch, each one a thin accumulator around :mod:`due_ext.metrics` (where every
definition lives). They read the evaluator's batched ``state.output`` (see
:class:`~due_ext.engines.evaluator.ExplanationEvaluator`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from due_ext.metrics.explanation import explanation_scores
from due_ext.metrics.prediction import classification_scores

CLASSIFICATION_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
                        "average_precision")
EXPLANATION_NAMES = ("iou", "precision", "recall", "f1")


def _identity(output: Any) -> Any:
    return output


class _OutputDictMetric(Metric):
    """A metric whose ``update`` takes the evaluator's whole output dictionary (ignite expects a
    ``(y_pred, y)`` pair by default)."""

    @torch.no_grad()
    def iteration_completed(self, engine: Any) -> None:
        self.update(self._output_transform(engine.state.output))


class ClassificationMetric(_OutputDictMetric):
    """One of :data:`CLASSIFICATION_NAMES` over all items of the epoch (probability of class 1 vs label)."""

    def __init__(self, name: str = "pr_auc", threshold: float = 0.5, output_transform=_identity,
                 device: str | torch.device = "cpu") -> None:
        if name not in CLASSIFICATION_NAMES:
            raise ValueError(f"{name!r} is not one of {CLASSIFICATION_NAMES}")
        self.name, self.threshold = name, threshold
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    @reinit__is_reduced
    def update(self, output: dict[str, torch.Tensor]) -> None:
        self._scores.append(output["pred"][:, 1].detach().float().cpu().numpy())
        self._labels.append(output["label"].reshape(-1).detach().cpu().numpy())

    def compute(self) -> float:
        if not self._labels:
            raise RuntimeError(f"ClassificationMetric({self.name}) computed before any update")
        return classification_scores(np.concatenate(self._labels), np.concatenate(self._scores),
                                     self.threshold)[self.name]


class ExplanationMetric(_OutputDictMetric):
    """Mean over positives with a mask of one of :data:`EXPLANATION_NAMES` at ``threshold``."""

    def __init__(self, name: str = "iou", threshold: float = 0.5, output_transform=_identity,
                 device: str | torch.device = "cpu") -> None:
        if name not in EXPLANATION_NAMES:
            raise ValueError(f"{name!r} is not one of {EXPLANATION_NAMES}")
        self.name, self.threshold = name, threshold
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._values: list[torch.Tensor] = []

    @reinit__is_reduced
    def update(self, output: dict[str, torch.Tensor]) -> None:
        keep = output["has_mask"] & (output["label"].reshape(-1) == 1)
        if output["mask"] is None or not keep.any():
            return
        scores = explanation_scores(output["cam"][keep], output["mask"][keep], self.threshold)
        self._values.append(scores[self.name].cpu())

    def compute(self) -> float:
        if not self._values:
            return float("nan")
        return float(torch.cat(self._values).mean())
