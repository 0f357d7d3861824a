"""The evaluator: class probabilities and the Grad-CAM of the predicted class for every item, in one pass.

Its ``state.output`` (not decollated) holds ``label`` (B,), ``pred`` = probabilities (B, K), ``cam`` =
normalised Grad-CAM (B, X, Y, Z), ``mask`` = the reference mask for explanation metrics (per item, the full
ground-truth ``mask`` when it has one, else its sparse annotation: :func:`reference_mask`) and ``has_mask``
(B,) bool.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import ignite.distributed as idist
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch.utils.data import DistributedSampler

from due_ext.data import schema
from due_ext.engines.batches import batch_item_names, batch_to_device, describe_items
from due_ext.explain.cam import normalized_cam
from due_ext.explain.supervision import labels_of


class ReferenceMask(NamedTuple):
    """What explanations are scored against (see :func:`reference_mask`)."""

    mask: torch.Tensor | None  # (B, X, Y, Z)
    has_mask: torch.Tensor  # (B,) bool: items with a reference
    from_annotation: torch.Tensor  # (B,) bool: items whose reference is the sparse annotation


def _volume(batch: dict[str, Any], key: str) -> torch.Tensor | None:
    if key not in batch:
        return None
    value = torch.as_tensor(batch[key])
    return value[:, 0] if value.dim() == 5 else value


def _nonempty(volume: torch.Tensor | None, count: int, device: torch.device) -> torch.Tensor:
    if volume is None:
        return torch.zeros(count, dtype=torch.bool, device=device)
    return volume.flatten(1).amax(1) > 0.5


def reference_mask(batch: dict[str, Any]) -> ReferenceMask:
    """Per item, the full ``mask`` when it has a voxel; otherwise (no ``mask`` key, or the empty volume that
    :class:`~due_ext.data.transforms.FillMissingExplanationKeysd` puts in place of a missing one) the sparse
    ``annotation`` when it has one; otherwise nothing (the item is not scored)."""
    image = torch.as_tensor(batch[schema.IMAGE])
    full, annotation = _volume(batch, schema.MASK), _volume(batch, schema.ANNOTATION)
    has_full = _nonempty(full, image.shape[0], image.device)
    from_annotation = ~has_full & _nonempty(annotation, image.shape[0], image.device)
    if full is None or annotation is None:
        mask = full if annotation is None else annotation
    else:
        mask = torch.where(from_annotation.view(-1, *([1] * (full.dim() - 1))), annotation.to(full.dtype), full)
    return ReferenceMask(mask, has_full | from_annotation, from_annotation)


class ExplanationEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that also computes Grad-CAM (predicted class) for the explanation metrics.

    Its ``state_dict()`` carries the model selection (``best_metric``, ``best_metric_epoch``), so a training
    checkpoint that includes the validation evaluator resumes without forgetting its best epoch.

    When a positive case has no full ``mask`` and its explanation is scored against the sparse annotation
    instead, the evaluator warns once (at the end of the first epoch where it happened), naming those cases.

    Under ``torch.distributed`` with a sharded loader (a ``DistributedSampler``) every process evaluates its
    shard of rank 0's model (its buffers, such as batch-norm running statistics, are broadcast first: DDP keeps
    the parameters equal, not the statistics each process gathered from its own batches) and the metrics gather
    all shards (:mod:`due_ext.engines.metrics`). A process with an empty shard stops with an error, as MONAI
    would skip its run and leave the other processes waiting in the metrics' gather.

    Args:
        target_layer: Grad-CAM layer of the network.
        Every other argument is ``monai.engines.SupervisedEvaluator``'s.
    """

    def __init__(self, *args: Any, target_layer: str = "layer4", **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.target_layer = target_layer
        self.state_dict_user_keys.extend(["best_metric", "best_metric_epoch"])
        self._annotation_scored: list[str] = []
        self._fallback_warned = False
        self.add_event_handler(Events.EPOCH_COMPLETED, self._warn_annotation_fallback)
        self.add_event_handler(Events.STARTED, self._evaluate_rank0_buffers)

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        if self.state.epoch_length == 0 and idist.get_world_size() > 1:
            raise ValueError(
                f"process {idist.get_rank()} of {idist.get_world_size()} has no item to evaluate: the evaluation "
                "set is sharded over the processes and needs at least one item per process")
        super().run(global_epoch)

    def _sharded(self) -> bool:
        return idist.get_world_size() > 1 and isinstance(getattr(self.data_loader, "sampler", None),
                                                         DistributedSampler)

    @torch.no_grad()
    def _evaluate_rank0_buffers(self, _engine: ExplanationEvaluator) -> None:
        if self._sharded():
            for buffer in self.network.buffers():
                dist.broadcast(buffer, src=0)

    def _warn_annotation_fallback(self, _engine: ExplanationEvaluator) -> None:
        if self._annotation_scored and not self._fallback_warned:
            self._fallback_warned = True
            warnings.warn(
                f"{len(self._annotation_scored)} positive case(s) have no full 'mask'; their explanations are "
                f"scored against the sparse 'annotation' (the drawn slices only): "
                f"{describe_items(self._annotation_scored)}", UserWarning, stacklevel=2)
        self._annotation_scored = []

    def _iteration(self, engine: ExplanationEvaluator, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        from due_ext.explain.gradcam import gradcam_features

        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = batch_to_device(batchdata, engine.state.device, engine.non_blocking)
        image = batch[schema.IMAGE]
        with engine.mode(engine.network), torch.enable_grad():
            # enable_grad: a network whose head is not GAP + linear needs autograd for alpha
            found = gradcam_features(engine.network, image, class_index=None, target_layer=engine.target_layer)
            cam = normalized_cam(found.features.detach(), found.alpha.detach(), image.shape[2:])
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        # unlabelled inputs (inference) get label -1
        labels = labels_of(batch).to(image.device) if schema.LABEL in batch \
            else torch.full((image.shape[0],), -1, dtype=torch.long, device=image.device)
        reference = reference_mask(batch)
        fallback = (reference.from_annotation & (labels == 1)).tolist()
        if any(fallback):
            names = batch_item_names(batch)
            engine._annotation_scored += [n for n, f in zip(names, fallback, strict=True) if f]
        engine.state.output = {
            Keys.IMAGE: image,
            Keys.LABEL: labels,
            Keys.PRED: torch.softmax(found.logits.detach().float(), dim=1),
            "cam": cam,
            "mask": reference.mask,
            "has_mask": reference.has_mask,
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
