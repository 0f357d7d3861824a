"""ignite metrics over an epoch, each one a thin accumulator around :mod:`due_ext.metrics` (where every
definition lives). They read the evaluator's batched ``state.output`` (see
:class:`~due_ext.engines.evaluator.ExplanationEvaluator`).

Under ``torch.distributed`` (the validation set sharded over the processes by a ``DistributedSampler``) each
metric gathers its per-item values from every process before computing, so every process gets the metric of
the whole set: the same number a single process computes on the same items, and the same best epoch on every
rank. Every process must therefore compute every metric, including a process whose shard has no positive.
"""

from __future__ import annotations

from typing import Any

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced
from monai.utils import convert_to_tensor, evenly_divisible_all_gather

from due_ext.metrics.explanation import explanation_scores
from due_ext.metrics.prediction import classification_scores

CLASSIFICATION_NAMES = ("accuracy", "precision", "recall", "specificity", "f1", "roc_auc", "pr_auc",
                        "average_precision")
EXPLANATION_NAMES = ("iou", "precision", "recall", "f1")


def _identity(output: Any) -> Any:
    return output


def gather_items(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    """The per-item values of every process in rank order (each process's ``parts`` concatenated, ``empty`` when
    it has none): the values of the whole set under ``torch.distributed``, this process's own otherwise. A
    collective: every process calls it, with or without items.

    Why not MONAI's ``Cumulative`` (which gathers with the same ``evenly_divisible_all_gather``): a process
    whose buffer never received an item skips the gather there, and the other processes wait for it forever.
    """
    local = torch.cat(parts) if parts else empty
    # plain tensors: slicing the gathered batch of MetaTensors would trip on their per-item metadata
    return evenly_divisible_all_gather(convert_to_tensor(local.detach().cpu(), track_meta=False), concat=True)


class _OutputDictMetric(Metric):
    """A metric whose ``update`` takes the evaluator's whole output dictionary (ignite expects a
    ``(y_pred, y)`` pair by default)."""

    @torch.no_grad()
    def iteration_completed(self, engine: Any) -> None:
        self.update(self._output_transform(engine.state.output))


class ClassificationMetric(_OutputDictMetric):
    """One of :data:`CLASSIFICATION_NAMES` over all items of the epoch (probability of class 1 vs label), on
    every process's items under ``torch.distributed``."""

    def __init__(self, name: str = "pr_auc", threshold: float = 0.5, output_transform=_identity,
                 device: str | torch.device = "cpu") -> None:
        if name not in CLASSIFICATION_NAMES:
            raise ValueError(f"{name!r} is not one of {CLASSIFICATION_NAMES}")
        self.name, self.threshold = name, threshold
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    @reinit__is_reduced
    def update(self, output: dict[str, torch.Tensor]) -> None:
        self._scores.append(output["pred"][:, 1].detach().float().cpu())
        self._labels.append(output["label"].reshape(-1).detach().long().cpu())

    def compute(self) -> float:
        scores = gather_items(self._scores, torch.zeros(0, dtype=torch.float32))
        labels = gather_items(self._labels, torch.zeros(0, dtype=torch.long))
        if labels.numel() == 0:
            raise RuntimeError(f"ClassificationMetric({self.name}) computed before any update")
        # every score is a threshold of the curves (rank-based areas): the gathering order does not matter
        return classification_scores(labels.numpy(), scores.numpy(), self.threshold)[self.name]


class ExplanationMetric(_OutputDictMetric):
    """Mean over positives with a mask of one of :data:`EXPLANATION_NAMES` at ``threshold``, over every
    process's positives under ``torch.distributed``; ``nan`` when there is none."""

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
        self._values.append(scores[self.name].detach().float().cpu())

    def compute(self) -> float:
        values = gather_items(self._values, torch.zeros(0, dtype=torch.float32))
        if values.numel() == 0:
            return float("nan")
        # float64: the mean does not depend on the order the processes' values were gathered in (float32
        # summation in another order would move it by up to n * 2^-24)
        return float(values.double().mean())
