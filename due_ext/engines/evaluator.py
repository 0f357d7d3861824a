"""The evaluator: class probabilities and the Grad-CAM of the predicted class for every item, in one pass.

Its ``state.output`` (not decollated) holds ``label`` (B,), ``pred`` = probabilities (B, K), ``cam`` =
normalised Grad-CAM (B, X, Y, Z), ``mask`` = the reference mask for explanation metrics (the full ground
truth ``mask`` when the batch has one for the item, else the annotation) and ``has_mask`` (B,) bool.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

from due_ext.data import schema
from due_ext.engines.trainer import batch_to_device
from due_ext.explain.cam import normalized_cam
from due_ext.explain.supervision import labels_of


def reference_mask(batch: dict[str, Any]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The mask explanations are scored against, ``(B, X, Y, Z)``, and which items have one (B,) bool."""
    for key in (schema.MASK, schema.ANNOTATION):
        if key in batch:
            mask = torch.as_tensor(batch[key])
            mask = mask[:, 0] if mask.dim() == 5 else mask
            return mask, mask.flatten(1).amax(1) > 0.5
    image = torch.as_tensor(batch[schema.IMAGE])
    return None, torch.zeros(image.shape[0], dtype=torch.bool, device=image.device)


class ExplanationEvaluator(SupervisedEvaluator):
    """``SupervisedEvaluator`` that also computes Grad-CAM (predicted class) for the explanation metrics.

    Args:
        target_layer: Grad-CAM layer of the network.
        Every other argument is ``monai.engines.SupervisedEvaluator``'s.
    """

    def __init__(self, *args: Any, target_layer: str = "layer4", **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(*args, **kwargs)
        self.target_layer = target_layer

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
        mask, has_mask = reference_mask(batch)
        engine.state.output = {
            Keys.IMAGE: image,
            # unlabelled inputs (inference) get label -1
            Keys.LABEL: labels_of(batch).to(image.device) if schema.LABEL in batch
            else torch.full((image.shape[0],), -1, dtype=torch.long, device=image.device),
            Keys.PRED: torch.softmax(found.logits.detach().float(), dim=1),
            "cam": cam,
            "mask": mask,
            "has_mask": has_mask,
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
