"""eXBL (Mohammed et al. 2023, "Learning from Exemplary Explanations"): one good and one bad exemplar
explanation, chosen by activation recall, and a triplet loss that pulls the model's explanation towards the
good one and away from the bad one.

As in the paper, an exemplar is the product of an input and its Grad-CAM (``x * S``), and distances are taken
between the network's embeddings of such products (the pooled features before the classifier head):

    L = relu(||e(x S) - e(x_good S_good)||^2 - ||e(x S) - e(x_bad S_bad)||^2 + margin)

The good exemplar is the annotated positive with the highest activation recall ``sum(S M) / sum(M)``, the bad
one the lowest (M = nearest-slice fill of the annotation); :class:`ExemplarSelector` re-selects them with the
current model at the start of every epoch (the paper selects once from a model trained with cross-entropy
first; selecting each epoch lets one run do both).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events

from due_ext.data import schema
from due_ext.explain.cam import normalized_cam
from due_ext.metrics.explanation import activation_recall

#: Default triplet margin (squared-distance units of the normalised embeddings).
EXBL_MARGIN = 1.0


def embed(network: torch.nn.Module, x: torch.Tensor, embedding_layer: str = "avgpool") -> torch.Tensor:
    """L2-normalised output of ``embedding_layer`` (flattened) for input ``x``: ``(B, D)``."""
    captured: list[torch.Tensor] = []
    from due_ext.explain.gradcam import unwrap_parallel

    layer = unwrap_parallel(network).get_submodule(embedding_layer)
    handle = layer.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        network(x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(f"eXBL: embedding layer {embedding_layer!r} ran {len(captured)} times in one forward pass")
    return F.normalize(captured[0].flatten(1), dim=1)


def triplet_explanation_loss(network: torch.nn.Module, explained_inputs: torch.Tensor, exemplars: torch.Tensor,
                             margin: float = EXBL_MARGIN, embedding_layer: str = "avgpool") -> torch.Tensor:
    """Per-sample eXBL loss ``(B,)``; ``explained_inputs`` = ``x * S`` (B, C, X, Y, Z), ``exemplars`` = the
    good and bad products stacked ``(2, C, X, Y, Z)``. One forward pass for anchors and exemplars together."""
    embeddings = embed(network, torch.cat([explained_inputs, exemplars.to(explained_inputs)]), embedding_layer)
    anchor, good, bad = embeddings[:-2], embeddings[-2:-1], embeddings[-1:]
    return torch.relu((anchor - good).pow(2).sum(1) - (anchor - bad).pow(2).sum(1) + margin)


@torch.no_grad()
def select_exemplars(network: torch.nn.Module, batches: Iterable[dict[str, Any]], device: torch.device | str,
                     reference_key: str = "nearest_fill", target_layer: str = "layer4") -> torch.Tensor:
    """Scan annotated positives; return ``x * S`` of the highest- and lowest-activation-recall ones ``(2, ...)``."""
    from due_ext.explain.gradcam import gradcam_features

    best: tuple[float, torch.Tensor] | None = None
    worst: tuple[float, torch.Tensor] | None = None
    was_training = network.training
    network.eval()
    try:
        for batch in batches:
            image = torch.as_tensor(batch[schema.IMAGE]).to(device)
            labels = torch.as_tensor(batch[schema.LABEL]).reshape(-1).to(device)
            has = torch.as_tensor(batch.get("has_annotation", torch.ones_like(labels))).reshape(-1).to(device)
            keep = (labels == 1) & (has > 0.5)
            if not keep.any():
                continue
            with torch.enable_grad():
                found = gradcam_features(network, image[keep], class_index=labels[keep], target_layer=target_layer)
            cam = normalized_cam(found.features.detach(), found.alpha.detach(), image.shape[2:])
            reference = torch.as_tensor(batch[reference_key]).to(device)[keep]
            recall = activation_recall(cam, reference[:, 0] if reference.dim() == 5 else reference)
            products = image[keep] * cam.unsqueeze(1)
            hi, lo = int(recall.argmax()), int(recall.argmin())
            if best is None or recall[hi] > best[0]:
                best = (float(recall[hi]), products[hi].cpu())
            if worst is None or recall[lo] < worst[0]:
                worst = (float(recall[lo]), products[lo].cpu())
    finally:
        network.train(was_training)
    if best is None or worst is None:
        raise ValueError("eXBL: no annotated positive found to choose exemplars from")
    return torch.stack([best[1], worst[1]])


class ExemplarSelector:
    """ignite handler: before every epoch, choose the exemplars with the current network and give them to the
    trainer's :class:`~due_ext.explain.supervision.ExplanationSupervision` (method ``exbl``)."""

    def __init__(self, data_loader: Iterable[dict[str, Any]], reference_key: str = "nearest_fill") -> None:
        self.data_loader = data_loader
        self.reference_key = reference_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        supervision = engine.supervision
        supervision.exemplars = select_exemplars(engine.network, self.data_loader, engine.state.device,
                                                 self.reference_key, supervision.target_layer)
