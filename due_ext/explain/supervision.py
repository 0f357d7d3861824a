"""Explanation supervision objectives: one forward pass per batch, cross-entropy on every item, the
explanation loss on annotated positives, all methods behind one config key.

``L = mean_B CE(f(x), y) + lambda * mean_{annotated positives} L_exp``

The batch is a dictionary of channel-first tensors (see :mod:`due_ext.data.transforms`): ``image``,
``label``, ``annotation`` (drawn slices only), ``annotated_mask`` (1 on drawn slices), ``has_annotation``,
and per method its soft target and weights (:data:`CAM_TARGETS`).

Methods and what each supervises (the peers are 2D methods in their papers; here they run in 3D on the
slices a person drew, which is the information they would have had):

- ``baseline``: cross-entropy only.
- ``baseline_plus``: the DUE loss with ``w = 1`` and ``I`` = the nearest-slice fill of the annotation.
- ``due``: the DUE loss, ``I`` = interpolation, ``w`` = uncertainty weights.
- Ablations of DUE (issue 15), same loss, one component changed at a time: ``sdf_fill`` (``w = 1``, ``I`` = the
  signed-distance fill), ``diffusion_fill`` (``w = 1``, ``I`` = the diffusion interpolation) and
  ``due_diffusion_variance`` (``I`` = the diffusion interpolation, ``w`` = the interpolator's own variance mapped
  to weights as DUE maps the neural process's, :mod:`due_ext.uncertainty.weights`).
- ``gradia``: L1 between CAM and annotation on the drawn slices.
- ``haics``: BCE between CAM and annotation on the drawn slices.
- ``res_g``: RES-G robust loss (slack 0.001, Gaussian imputation), robust term on the drawn slices.
- ``exbl``: eXBL triplet loss between embeddings of ``x * S`` and of one good and one bad exemplar
  (:mod:`due_ext.explain.exemplars`; an :class:`~due_ext.explain.exemplars.ExemplarSelector` must set them).
- ``rrr``: right for the right reasons: ``sum((1 - M) * (d sum_k log p_k / dx)^2)`` over voxels outside the
  nearest-filled mask ``M`` (input gradients, double backward); no Grad-CAM.

Grad-CAM uses the true label's class during training (:func:`due_ext.explain.gradcam.gradcam_features`);
the loss is the fused op :func:`due_ext.ops.explanation_loss`.

How the weights enter, ``loss_reading`` (methods with weights, ``due`` and ``due_diffusion_variance``):

- ``"weighted_l1"`` (default): the released code's loss, ``w`` multiplies the per-voxel error:
  ``sum(w 1[m!=0] |tanh(5(S-0.5)) - m|) / max(1, sum 1[m!=0]) + mean(w |S - I|)``.
- ``"paper_eq2"``: the paper's Eq. 2 as written, ``L_Exp(S, G_imp(m) * g_interp(m))``: the weights multiply the
  imputed target and the loss itself is unweighted,
  ``sum(1[m!=0] |tanh(5(S-0.5)) - m|) / max(1, sum 1[m!=0]) + mean(|S - w I|)``. That is the ``baseline_plus``
  formula with the target ``w I``, so it runs as that formula of the fused op (one implementation per formula).

Why ``weighted_l1`` is the default: it is what produced the paper's numbers (the released code), it is what the
text says the weights are for ("adjusting the influence of annotations on the explanation loss"), and it lets an
uncertain voxel count less, whereas Eq. 2 read literally turns it into a confident "no lesion" target (``w I``
goes to 0 where ``w`` does: the per-gap min-max gives 0 to the most uncertain voxels of every gap, on the
lesion's edge where the interpolator's samples disagree), so the CAM is pushed off the edge of the lesion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from due_ext.data import schema
from due_ext.data.transforms import ANNOTATED_MASK, HAS_ANNOTATION
from due_ext.interp.transforms import NEAREST_FILL, SDF_FILL


@dataclass(frozen=True)
class CamTarget:
    """What a CAM method supervises with: a formula of :func:`due_ext.ops.explanation_loss` and the batch keys
    of its soft target ``I`` and weights ``w`` (``None``: not used)."""

    formula: str
    soft_target: str | None = None
    weights: str | None = None


#: The CAM methods by name. DUE's ablations share its formula and differ only in ``I`` and ``w``.
CAM_TARGETS: dict[str, CamTarget] = {
    "baseline_plus": CamTarget("baseline_plus", NEAREST_FILL),
    "due": CamTarget("due", schema.INTERPOLATION, schema.WEIGHTS),
    "gradia": CamTarget("gradia", weights=ANNOTATED_MASK),
    "haics": CamTarget("haics", weights=ANNOTATED_MASK),
    "res_g": CamTarget("res_g", weights=ANNOTATED_MASK),
    "sdf_fill": CamTarget("baseline_plus", SDF_FILL),
    "diffusion_fill": CamTarget("baseline_plus", schema.INTERPOLATION),
    "due_diffusion_variance": CamTarget("due", schema.INTERPOLATION, schema.DIFFUSION_WEIGHTS),
}
#: Methods whose explanation loss is the fused CAM op.
CAM_METHODS = tuple(CAM_TARGETS)
METHODS = ("baseline", "baseline_plus", "due", "gradia", "haics", "res_g", "rrr", "exbl", "sdf_fill", "diffusion_fill",
           "due_diffusion_variance")
#: How uncertainty weights enter the DUE loss (module docstring).
LOSS_READINGS = ("weighted_l1", "paper_eq2")


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
        loss_reading: ``"weighted_l1"`` (default, the released code) or ``"paper_eq2"`` (module docstring);
            only methods with weights are affected.
    """

    def __init__(self, method: str = "due", lam: float = 1.0, target_layer: str = "layer4",
                 create_graph: bool = False, loss_reading: str = "weighted_l1") -> None:
        if method not in METHODS:
            raise ValueError(f"method {method!r} is unknown; choose one of {', '.join(METHODS)}")
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        if loss_reading not in LOSS_READINGS:
            raise ValueError(f"loss_reading {loss_reading!r} is unknown; choose one of {', '.join(LOSS_READINGS)}")
        self.method = method
        self.loss_reading = loss_reading
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

    def _cam_targets(self, batch: Mapping[str, torch.Tensor], index: torch.Tensor, device: torch.device
                     ) -> tuple[str, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(formula, m, I, w)`` of the supervised items ``index``, as the loss reading asks."""
        spec = CAM_TARGETS[self.method]
        target, soft, weights = (None if key is None else _volume(batch, key, self.method)[index].to(device)
                                 for key in (schema.ANNOTATION, spec.soft_target, spec.weights))
        if spec.formula == "due" and self.loss_reading == "paper_eq2":
            # Eq. 2: the weights scale the imputed target; the loss is then the unweighted DUE loss
            return "baseline_plus", target, weights * soft, None
        return spec.formula, target, soft, weights

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
                formula, target, soft, weights = self._cam_targets(batch, index, image.device)
                loss_rows = explanation_loss(found.features[index], found.alpha[index], target, soft, weights,
                                             method=formula)
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
