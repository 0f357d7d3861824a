"""Explanation supervision objectives: one forward pass per batch, cross-entropy on every item, the
explanation loss on annotated positives, all methods behind one config key.

``L = mean_B CE(f(x), y) + lambda * mean_{annotated positives} L_exp``

The batch is a dictionary of channel-first tensors (see :mod:`due_ext.data.transforms`): ``image``,
``label``, ``annotation`` (drawn slices only), ``annotated_mask`` (1 on drawn slices), ``has_annotation``,
and per method ``interpolation`` and ``weights`` (``due``) or ``nearest_fill`` (``baseline_plus``).

Methods and what each supervises (the peers are 2D methods in their papers; here they run in 3D on the
slices a person drew, which is the information they would have had):

- ``baseline``: cross-entropy only.
- ``baseline_plus``: the DUE loss with ``w = 1`` and ``I`` = the nearest-slice fill of the annotation.
- ``due``: the DUE loss, ``I`` = interpolation, ``w`` = uncertainty weights.
- ``gradia``: L1 between CAM and annotation on the drawn slices.
- ``haics``: BCE between CAM and annotation on the drawn slices.
- ``res_g``: RES-G robust loss (slack 0.001, Gaussian imputation), robust term on the drawn slices.
- ``exbl``: eXBL triplet loss between embeddings of ``x * S`` and of one good and one bad exemplar
  (:mod:`due_ext.explain.exemplars`; an :class:`~due_ext.explain.exemplars.ExemplarSelector` must set them).
- ``rrr``: right for the right reasons: ``sum((1 - M) * (d sum_k log p_k / dx)^2)`` over voxels outside the
  nearest-filled mask ``M`` (input gradients, double backward); no Grad-CAM.

Grad-CAM uses the true label's class during training (:func:`due_ext.explain.gradcam.gradcam_features`);
the loss is the fused op :func:`due_ext.ops.explanation_loss`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from due_ext.data import schema
from due_ext.data.transforms import ANNOTATED_MASK, HAS_ANNOTATION
from due_ext.interp.transforms import NEAREST_FILL

METHODS = ("baseline", "baseline_plus", "due", "gradia", "haics", "res_g", "rrr", "exbl")
#: Methods whose explanation loss is the fused CAM op.
CAM_METHODS = ("baseline_plus", "due", "gradia", "haics", "res_g")


@dataclass
class SupervisionOutput:
    """What one objective evaluation produced (all on the batch's device)."""

    logits: torch.Tensor  # (B, K)
    prediction_loss: torch.Tensor  # scalar
    explanation_loss: torch.Tensor  # (B,): per-sample loss, 0 where not supervised
    supervised: torch.Tensor  # (B,) bool: items that got an explanation loss
    loss: torch.Tensor  # scalar total


def _volume(batch: Mapping[str, torch.Tensor], key: str, method: str) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"method {method!r} needs the batch key {key!r}; add it to the datalist or the transforms")
    value = torch.as_tensor(batch[key])
    return value[:, 0] if value.dim() == 5 else value


def labels_of(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``label`` as a ``(B,)`` int64 tensor."""
    return torch.as_tensor(batch[schema.LABEL]).reshape(-1).long()


class ExplanationSupervision:
    """Callable ``(network, batch) -> SupervisionOutput`` for one method; JSON-configurable.

    Args:
        method: one of :data:`METHODS`.
        lam: weight of the explanation loss (the paper uses 1).
        target_layer: dotted name of the Grad-CAM layer.
        create_graph: also backpropagate through Grad-CAM's alpha (second order); the default follows the
            original (alpha constant, gradients flow through the features).
    """

    def __init__(self, method: str = "due", lam: float = 1.0, target_layer: str = "layer4",
                 create_graph: bool = False) -> None:
        if method not in METHODS:
            raise ValueError(f"method {method!r} is unknown; choose one of {', '.join(METHODS)}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.method = method
        self.lam = float(lam)
        self.target_layer = target_layer
        self.create_graph = create_graph
        #: eXBL exemplars ``(2, C, X, Y, Z)``: good then bad; set by ExemplarSelector.
        self.exemplars: torch.Tensor | None = None

    def supervised_items(self, batch: Mapping[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """Positives that carry an annotation: the only items with an explanation loss."""
        has = batch.get(HAS_ANNOTATION)
        annotated = torch.ones_like(labels, dtype=torch.bool) if has is None else \
            torch.as_tensor(has).reshape(-1).to(labels.device) > 0.5
        return (labels == 1) & annotated

    def _cam_targets(self, batch: Mapping[str, torch.Tensor]):
        annotation = _volume(batch, schema.ANNOTATION, self.method)
        if self.method == "due":
            return annotation, _volume(batch, schema.INTERPOLATION, self.method), \
                _volume(batch, schema.WEIGHTS, self.method)
        if self.method == "baseline_plus":
            return annotation, _volume(batch, NEAREST_FILL, self.method), None
        return annotation, None, _volume(batch, ANNOTATED_MASK, self.method)

    def __call__(self, network: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> SupervisionOutput:
        image = torch.as_tensor(batch[schema.IMAGE])
        labels = labels_of(batch).to(image.device)
        supervised = self.supervised_items(batch, labels)
        if self.method in CAM_METHODS:
            from due_ext.explain.gradcam import gradcam_features
            from due_ext.ops import explanation_loss

            found = gradcam_features(network, image, class_index=labels, target_layer=self.target_layer,
                                     create_graph=self.create_graph)
            logits = found.logits
            per_sample = torch.zeros(labels.shape[0], dtype=logits.dtype, device=logits.device)
            if supervised.any():
                index = supervised.nonzero().squeeze(1)
                target, soft, weights = (None if t is None else t[index].to(image.device)
                                         for t in self._cam_targets(batch))
                loss_rows = explanation_loss(found.features[index], found.alpha[index], target, soft, weights,
                                             method=self.method)
                per_sample = per_sample.index_put((index,), loss_rows.to(per_sample.dtype))
        elif self.method == "rrr":
            logits, per_sample = self._rrr(network, image, batch, supervised)
        elif self.method == "exbl":
            logits, per_sample = self._exbl(network, image, labels, supervised)
        else:
            logits = network(image)
            per_sample = torch.zeros(labels.shape[0], dtype=logits.dtype, device=logits.device)
        prediction = F.cross_entropy(logits, labels)
        explanation = per_sample.sum() / supervised.sum().clamp_min(1)
        return SupervisionOutput(logits, prediction, per_sample, supervised, prediction + self.lam * explanation)

    def _exbl(self, network, image, labels, supervised):
        from due_ext.explain.cam import normalized_cam
        from due_ext.explain.exemplars import triplet_explanation_loss
        from due_ext.explain.gradcam import gradcam_features

        if self.exemplars is None:
            raise RuntimeError("method 'exbl' needs exemplars: attach due_ext.explain.exemplars.ExemplarSelector "
                               "to the trainer (or set supervision.exemplars)")
        found = gradcam_features(network, image, class_index=labels, target_layer=self.target_layer,
                                 create_graph=self.create_graph)
        per_sample = torch.zeros(labels.shape[0], dtype=found.logits.dtype, device=found.logits.device)
        if supervised.any():
            index = supervised.nonzero().squeeze(1)
            cam = normalized_cam(found.features[index], found.alpha[index], image.shape[2:])
            rows = triplet_explanation_loss(network, image[index] * cam.unsqueeze(1), self.exemplars)
            per_sample = per_sample.index_put((index,), rows.to(per_sample.dtype))
        return found.logits, per_sample

    def _rrr(self, network, image, batch, supervised):
        image = image.detach().requires_grad_(True)
        logits = network(image)
        per_sample = torch.zeros(image.shape[0], dtype=logits.dtype, device=logits.device)
        if supervised.any():
            log_probs = F.log_softmax(logits, dim=1).sum()
            (grad,) = torch.autograd.grad(log_probs, image, create_graph=True)
            outside = 1.0 - _volume(batch, NEAREST_FILL, self.method).to(image.device).float()
            penalty = (outside.unsqueeze(1) * grad.pow(2)).flatten(1).sum(1)
            per_sample = torch.where(supervised, penalty, per_sample)
        return logits, per_sample
