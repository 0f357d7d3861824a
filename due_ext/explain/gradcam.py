"""Differentiable 3D Grad-CAM for explanation supervision.

Unlike ``monai.visualize.GradCAM`` (a visualiser: it detaches, forces eval mode, calls ``backward`` and zeroes
the model's gradients), this keeps the graph through the target layer's output ``A`` so an explanation loss on
the map trains the backbone, and leaves the model's mode and its parameters' ``.grad`` alone.

    score_b = logits[b, class_b]                (class = given label, else the predicted class)
    alpha   = mean over space of dscore/dA       (B, C)
    cam     = normalized_cam(A, alpha, input size)   -- due_ext.explain.cam: relu(sum_c alpha_c A_c),
                                                        trilinear upsample, per-sample min-max

``alpha`` comes from one of two exact paths:

- *shortcut*: when the target layer feeds a global-average-pooling + linear head (MONAI's ResNet: ``layer4``
  -> ``avgpool`` -> flatten -> ``fc``), ``dscore/dA[c, s] = fc.weight[class, c] / (d*h*w)`` at every voxel, so
  ``alpha = fc.weight[class] / (d*h*w)`` without any backward pass. See :func:`find_gap_linear_head`.
- *autograd*: otherwise ``alpha = mean(torch.autograd.grad(sum_b score_b, A))``, which touches no ``.grad``.

With ``create_graph=False`` (default, as the original DUE code) ``alpha`` is a constant and gradients of a loss
on the map flow through ``A`` only; ``create_graph=True`` keeps ``alpha``'s own graph for second-order training.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from due_ext.explain.cam import normalized_cam

__all__ = ["GradCAMFeatures", "find_gap_linear_head", "grad_cam", "gradcam_features"]

_GLOBAL_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


class GradCAMFeatures(NamedTuple):
    """What Grad-CAM needs from one forward pass.

    Attributes:
        logits: model output ``(B, K)``.
        features: target layer output ``A`` ``(B, C, d, h, w)``, attached to the model's graph.
        alpha: channel weights ``(B, C)`` (constant unless ``create_graph=True``).
        class_index: the explained class per sample ``(B,)`` (long).
    """

    logits: torch.Tensor
    features: torch.Tensor
    alpha: torch.Tensor
    class_index: torch.Tensor


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """The wrapped module of ``DistributedDataParallel`` / ``DataParallel`` (layer names refer to it), else
    ``model``; the forward pass still goes through the wrapper so gradients are synchronised."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _submodule(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children())
        raise ValueError(f"gradcam: {type(model).__name__} has no layer {name!r} (its top-level layers: "
                         f"{children})") from None


def find_gap_linear_head(model: nn.Module, target_layer: str) -> tuple[nn.Module, nn.Linear] | None:
    """The ``(pool, linear)`` head after ``target_layer`` when it is global average pooling + a linear layer.

    Structural test: ``target_layer`` is a direct child of ``model`` and the children registered after it
    (``None`` entries skipped) are exactly an ``AdaptiveAvgPool{1,2,3}d`` with output size 1 and an
    ``nn.Linear``, which is how MONAI's ResNet declares ``layer4, avgpool, fc``. Registration order is not
    proof of call order, so :func:`gradcam_features` also confirms at run time, with hooks, that the pool
    consumed ``A`` itself, the linear layer consumed the pool's output and produced the logits; if not, it
    falls back to autograd. Returns ``None`` when the structure does not match.
    """
    children = list(model.named_children())  # registration order; None entries are skipped
    names = [name for name, _ in children]
    if target_layer not in names:
        return None
    after = [module for _, module in children[names.index(target_layer) + 1:]]
    if len(after) != 2:
        return None
    pool, linear = after
    if not isinstance(pool, _GLOBAL_AVG_POOLS) or not isinstance(linear, nn.Linear):
        return None
    size = pool.output_size if isinstance(pool.output_size, Sequence) else (pool.output_size,)
    return (pool, linear) if all(s == 1 for s in size) else None


class _HeadRecord:
    """Inputs/outputs seen by the pool and linear layers of a candidate shortcut head during one forward."""

    def __init__(self) -> None:
        self.pool_calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.linear_calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def confirms(self, features: torch.Tensor, logits: torch.Tensor) -> bool:
        if len(self.pool_calls) != 1 or len(self.linear_calls) != 1:
            return False
        (pool_in, pool_out), (linear_in, linear_out) = self.pool_calls[0], self.linear_calls[0]
        # The linear input must be the pooled tensor reshaped (same storage and size), nothing else in between.
        return (pool_in is features and linear_out is logits and linear_in.numel() == pool_out.numel()
                and linear_in.data_ptr() == pool_out.data_ptr())


def _class_index(class_index: torch.Tensor | int | None, logits: torch.Tensor) -> torch.Tensor:
    batch, classes = logits.shape
    if class_index is None:
        return logits.detach().argmax(dim=1)
    index = torch.as_tensor(class_index, device=logits.device)
    if index.dim() == 0:
        index = index.expand(batch)
    if index.shape != (batch,) or index.is_floating_point() or index.is_complex():
        raise ValueError(f"gradcam: class_index must be an int or an integer tensor of shape ({batch},), got "
                         f"{index.dtype} {tuple(index.shape)}")
    index = index.long()
    if batch and (int(index.min()) < 0 or int(index.max()) >= classes):
        raise ValueError(f"gradcam: class_index values must lie in [0, {classes}), got {index.tolist()}")
    return index


def gradcam_features(model: nn.Module, x: torch.Tensor, class_index: torch.Tensor | int | None = None,
                     target_layer: str = "layer4", create_graph: bool = False,
                     force_autograd: bool = False) -> GradCAMFeatures:
    """One forward pass of the whole batch, capturing the target layer output and its Grad-CAM weights.

    Args:
        model: a classifier returning logits ``(B, K)``; its train/eval mode is used as it is.
        x: input batch ``(B, C_in, X, Y, Z)``.
        class_index: class to explain per sample, ``(B,)`` (the trainer passes the true labels) or one int;
            ``None``: the predicted class (argmax of the logits).
        target_layer: dotted name of the layer whose output is ``A`` (``model.get_submodule`` syntax).
        create_graph: keep ``alpha``'s graph (second-order training); default: ``alpha`` is a constant.
        force_autograd: compute ``alpha`` by autograd even when the GAP + linear shortcut applies.

    Returns:
        :class:`GradCAMFeatures` ``(logits, features, alpha, class_index)``.

    Raises:
        ValueError: unknown layer, bad ``class_index``, or a target layer that does not return one 5D tensor
            exactly once per forward.
        RuntimeError: ``alpha`` needs autograd but ``A`` has no graph (e.g. called under ``torch.no_grad()``
            for a model without the GAP + linear head).
    """
    inner = unwrap_parallel(model)
    layer = _submodule(inner, target_layer)
    head = None if force_autograd else find_gap_linear_head(inner, target_layer)
    captured: list[torch.Tensor] = []
    record = _HeadRecord()

    def keep_features(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        captured.append(output)

    handles = [layer.register_forward_hook(keep_features)]
    if head is not None:
        pool, linear = head
        handles.append(pool.register_forward_hook(lambda _m, inputs, out: record.pool_calls.append((inputs[0], out))))
        handles.append(linear.register_forward_hook(
            lambda _m, inputs, out: record.linear_calls.append((inputs[0], out))))
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()

    if len(captured) != 1:
        raise ValueError(f"gradcam: target layer {target_layer!r} ran {len(captured)} times in one forward pass; "
                         "Grad-CAM needs a layer that runs exactly once")
    features = captured[0]
    if not isinstance(features, torch.Tensor) or features.dim() != 5:
        raise ValueError(f"gradcam: target layer {target_layer!r} must output one (B, C, d, h, w) tensor, got "
                         f"{type(features).__name__} {tuple(getattr(features, 'shape', ()))}")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != features.shape[0]:
        raise ValueError(f"gradcam: the model must return logits (B, K); got {tuple(getattr(logits, 'shape', ()))}")
    index = _class_index(class_index, logits)

    if head is not None and record.confirms(features, logits):
        weight = head[1].weight if create_graph else head[1].weight.detach()
        alpha = weight[index] / features[0, 0].numel()
    else:
        if not features.requires_grad:
            raise RuntimeError(f"gradcam: the output of {target_layer!r} carries no graph (grad mode off, or "
                               "nothing before it requires grad), so dScore/dA cannot be computed by autograd")
        score = logits.gather(1, index[:, None]).sum()
        # autograd.grad, not backward(): parameters' .grad stay untouched; the graph is kept for the caller's loss.
        (grad,) = torch.autograd.grad(score, features, retain_graph=True, create_graph=create_graph)
        alpha = grad.flatten(2).mean(dim=2)
    return GradCAMFeatures(logits=logits, features=features, alpha=alpha.to(features.dtype), class_index=index)


def grad_cam(model: nn.Module, x: torch.Tensor, class_index: torch.Tensor | int | None = None,
             target_layer: str = "layer4", create_graph: bool = False, force_autograd: bool = False) -> torch.Tensor:
    """Normalised 3D Grad-CAM at the input size, ``(B, 1, X, Y, Z)`` in [0, 1], differentiable through ``A``.

    Arguments as :func:`gradcam_features`; the map is :func:`due_ext.explain.cam.normalized_cam`.
    """
    features = gradcam_features(model, x, class_index=class_index, target_layer=target_layer,
                                create_graph=create_graph, force_autograd=force_autograd)
    return normalized_cam(features.features, features.alpha, x.shape[2:]).unsqueeze(1)
