"""The fused explanation loss: Grad-CAM combine -> trilinear upsample -> min-max -> per-sample loss, with its
backward, without materialising any full-resolution tensor.

Public entry: :func:`explanation_loss`. Under it sit two ``torch.library`` operators with the same schema::

    explanation_loss_fwd(Tensor features, Tensor alpha, Tensor target, Tensor? soft_target, Tensor? weights,
                         str method, bool need_grad, bool write_cam) -> (Tensor loss, Tensor grad_pre, Tensor cam)

- ``due_ext::explanation_loss_fwd``: C++ CPU kernel (``csrc/cpu/explanation_loss_cpu.cpp``) and CUDA kernel
  (``csrc/cuda/explanation_loss_cuda.cu``), schema defined in C++;
- ``due_ext::explanation_loss_fwd_triton``: the Triton kernels (:mod:`due_ext.ops.triton.explanation_loss`),
  defined here with :func:`torch.library.custom_op`.

The forward kernels also return ``grad_pre`` = dloss_b/d(pre-relu CAM) ``(B, d, h, w)`` when ``need_grad``: it is
the only thing saved for backward besides the inputs, and backward is then two small contractions
(:func:`_backward`). Both operators have a fake (meta) implementation, so ``torch.compile`` traces them and
``torch.library.opcheck`` passes.

Precision: ``features``/``alpha`` may be float16, bfloat16, float32 or float64. Half-precision inputs (what a
network under ``torch.autocast`` produces) are computed in float32: the kernels convert them on entry, return
``loss`` and ``cam`` in the input dtype and ``grad_pre`` in float32, and backward computes in float32 and
returns gradients in the input dtype. The volumes (``target``, ``soft_target``, ``weights``) are passed in that
compute dtype (float32 for half inputs), so soft targets and weights are never rounded to 8 bits.

Fused methods: ``due``, ``baseline_plus``, ``gradia``, ``haics``. ``res_g`` (a relu of one term and a Gaussian
imputation) runs as the reference composition from :mod:`due_ext.ops.explanation_loss_reference`.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from due_ext._backends import load_extension
from due_ext.ops._dispatch import select_backend
from due_ext.ops.explanation_loss_reference import METHODS, explanation_loss_reference

__all__ = ["FUSED_METHODS", "explanation_loss"]

logger = logging.getLogger("due_ext.ops")

#: Methods computed by the fused kernels; the others run as the reference composition.
FUSED_METHODS = ("due", "baseline_plus", "gradia", "haics")
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
#: Dtypes of ``features``/``alpha`` the op accepts.
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the kernels compute in for ``features`` of ``dtype``: float32 for float16/bfloat16 (as
    ``explanation_compute_dtype`` in ``csrc/explanation_loss_inputs.h``), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast disabled for the op's own torch calls (the reference path, the Triton host code, backward), so
    they run in the compute dtype whether or not the caller is inside ``torch.autocast``."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _fake_forward(features, alpha, target, soft_target, weights, method, need_grad, write_cam):
    batch, _, d, h, w = features.shape
    cam = features.new_empty(tuple(target.shape)) if write_cam else features.new_empty((0,))
    grad_pre = features.new_empty((batch, d, h, w), dtype=compute_dtype(features.dtype))
    return features.new_empty((batch,)), grad_pre, cam


def _setup_context(ctx, inputs, output) -> None:
    features, alpha = inputs[0], inputs[1]
    ctx.need_grad = bool(inputs[6])
    ctx.save_for_backward(features, alpha, output[1])


def _backward(ctx, grad_loss, _grad_grad_pre, _grad_cam):
    """Chain rule from the per-sample loss to ``features`` and ``alpha`` through ``relu(sum_c alpha A)``:
    ``dA = g_b alpha_bc G_b``, ``dalpha = g_b sum(A_bc G_b)`` with ``G`` the kernel's low-res ``grad_pre``.
    Computed in ``grad_pre``'s dtype (float32 for half inputs), returned in the inputs' dtypes."""
    features, alpha, grad_pre = ctx.saved_tensors
    if not ctx.need_grad:
        raise RuntimeError("due_ext::explanation_loss_fwd was called with need_grad=False, so it computed no "
                           "gradient; call due_ext.ops.explanation_loss instead of the raw operator")
    if grad_loss is None:
        return None, None, None, None, None, None, None, None
    compute = grad_pre.dtype
    with _autocast_off(grad_pre.device):
        # loss.sum() hands a stride-0 gradient: make it a plain (B, 1, 1, 1) tensor first.
        scaled = grad_pre * grad_loss.contiguous().reshape(-1, 1, 1, 1).to(compute)
        grad_features = grad_alpha = None
        if ctx.needs_input_grad[0]:
            grad_features = (alpha.to(compute)[:, :, None, None, None] * scaled[:, None]).to(features.dtype)
        if ctx.needs_input_grad[1]:
            grad_alpha = torch.einsum("bcdhw,bdhw->bc", features.to(compute), scaled).to(alpha.dtype)
    return grad_features, grad_alpha, None, None, None, None, None, None


def _register_compiled_op() -> bool:
    """Attach fake impl and autograd to the C++ operator, if the extension is built."""
    loaded, reason = load_extension()
    if not loaded:
        logger.debug("due_ext.ops.explanation_loss: %s", reason)
        return False
    torch.library.register_fake("due_ext::explanation_loss_fwd")(_fake_forward)
    torch.library.register_autograd("due_ext::explanation_loss_fwd", _backward, setup_context=_setup_context)
    return True


_COMPILED_OP = _register_compiled_op()


@torch.library.custom_op("due_ext::explanation_loss_fwd_triton", mutates_args=())
def explanation_loss_fwd_triton(features: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor,
                                soft_target: torch.Tensor | None, weights: torch.Tensor | None, method: str,
                                need_grad: bool, write_cam: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton kernels of the fused loss (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``)."""
    from due_ext.ops.triton.explanation_loss import explanation_loss_forward

    with _autocast_off(features.device):
        return explanation_loss_forward(features, alpha, target, soft_target, weights, method, need_grad,
                                        write_cam)


torch.library.register_fake("due_ext::explanation_loss_fwd_triton")(_fake_forward)
torch.library.register_autograd("due_ext::explanation_loss_fwd_triton", _backward, setup_context=_setup_context)


def _check_volume(name: str, volume: torch.Tensor, shape: torch.Size, features: torch.Tensor) -> None:
    if not isinstance(volume, torch.Tensor):
        raise TypeError(f"explanation_loss: {name} must be a tensor, got {type(volume).__name__}")
    if volume.shape != shape:
        raise ValueError(f"explanation_loss: {name} has shape {tuple(volume.shape)}, expected {tuple(shape)} "
                         "(the target's (B, X, Y, Z))")
    if volume.device != features.device:
        raise ValueError(f"explanation_loss: {name} is on {volume.device}, the features on {features.device}")


def _as_kernel_dtype(name: str, volume: torch.Tensor, dtype: torch.dtype, masks_allowed: bool) -> torch.Tensor:
    if volume.is_floating_point():
        return volume.to(dtype)
    if masks_allowed and volume.dtype in _MASK_DTYPES:
        return volume.to(dtype)
    kinds = "floating point, bool or integer" if masks_allowed else "floating point"
    raise TypeError(f"explanation_loss: {name} must be {kinds}, got {volume.dtype}")


def explanation_loss(features: torch.Tensor, alpha: torch.Tensor, target: torch.Tensor,
                     soft_target: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                     method: str = "due", return_cam: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-sample explanation loss of a Grad-CAM against a 3D annotation, fused with the CAM computation.

    With ``S = normalized_cam(features, alpha, target.shape[1:])`` (:mod:`due_ext.explain.cam`: relu of the
    alpha-weighted channel sum, trilinear upsample with ``align_corners=True``, per-sample min-max), ``m`` the
    mask, ``I`` the soft target and ``w`` the weights (ones when ``None``):

    - ``due``: ``sum(w 1[m!=0] |tanh(5(S - 0.5)) - m|) / max(1, sum 1[m!=0]) + mean(w |S - I|)``
    - ``baseline_plus``: ``due`` with ``w = 1`` (``weights`` ignored; ``I`` is then the nearest-filled mask)
    - ``gradia``: ``sum(w |S - m|) / max(1e-6, sum w)`` (``w`` selects the supervised voxels)
    - ``haics``: ``sum(w BCE(clamp(S, 1e-6, 1 - 1e-6), m)) / max(1e-6, sum w)``
    - ``res_g``: RES-G, see :func:`due_ext.ops.explanation_loss_reference.res_g_loss` (reference composition).

    ``soft_target`` is required by ``due``/``baseline_plus`` and ignored by the others. A flat map (range at most
    ``FLAT_RTOL`` of ``max |sum_c alpha A|``, see :mod:`due_ext.explain.cam`) is ``S = 0`` and gives no gradient;
    NaN in a sample's inputs gives that sample a NaN loss on every backend.

    Args:
        features: target-layer activations ``A`` ``(B, C, d, h, w)``: float16, bfloat16 (computed in float32,
            see the module docstring), float32 or float64.
        alpha: channel weights ``(B, C)``, same dtype and device.
        target: binary mask ``m`` ``(B, X, Y, Z)``: float, bool or integer.
        soft_target: interpolated soft mask ``I`` in [0, 1], ``(B, X, Y, Z)``.
        weights: per-voxel weights ``w`` in [0, 1], ``(B, X, Y, Z)``.
        method: one of ``due``, ``baseline_plus``, ``gradia``, ``haics``, ``res_g``.
        return_cam: also return ``S`` ``(B, X, Y, Z)``, detached (for metrics and figures; the loss carries the
            gradient). With ``res_g`` the returned map is the reference's and keeps its graph.

    Returns:
        ``loss`` ``(B,)`` (multiply by a per-sample mask and lambda, then reduce), or ``(loss, S)``, in the
        features' dtype. Gradients flow to ``features`` and ``alpha``, never to the targets.
    """
    if method not in METHODS:
        raise ValueError(f"explanation_loss: method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    if not isinstance(features, torch.Tensor) or features.dim() != 5:
        raise ValueError("explanation_loss: features must be a (B, C, d, h, w) tensor, got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
    if features.dtype not in FEATURE_DTYPES:
        raise TypeError(f"explanation_loss: features must be float16, bfloat16, float32 or float64, got "
                        f"{features.dtype}")
    if not isinstance(alpha, torch.Tensor) or alpha.shape != features.shape[:2]:
        raise ValueError(f"explanation_loss: alpha must be (B, C) = {tuple(features.shape[:2])}, got "
                         f"{tuple(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__}")
    if alpha.dtype != features.dtype or alpha.device != features.device:
        raise TypeError(f"explanation_loss: alpha is {alpha.dtype} on {alpha.device}, the features are "
                        f"{features.dtype} on {features.device}; they must match")
    if not isinstance(target, torch.Tensor) or target.dim() != 4 or target.shape[0] != features.shape[0]:
        raise ValueError(f"explanation_loss: target must be (B, X, Y, Z) with B = {features.shape[0]}, got "
                         f"{tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__}")
    if min(target.shape[1:]) < 1 or min(features.shape[1:]) < 1:
        raise ValueError(f"explanation_loss: empty dimensions in features {tuple(features.shape)} or target "
                         f"{tuple(target.shape)}")
    _check_volume("target", target, target.shape, features)
    dtype = compute_dtype(features.dtype)
    target = _as_kernel_dtype("target", target, dtype, masks_allowed=True)
    if method in ("due", "baseline_plus"):
        if soft_target is None:
            raise ValueError(f"explanation_loss: method {method!r} needs soft_target (the interpolated mask I)")
        _check_volume("soft_target", soft_target, target.shape, features)
        soft_target = _as_kernel_dtype("soft_target", soft_target, dtype, masks_allowed=True)
    else:
        soft_target = None
    if method == "baseline_plus":
        weights = None
    if weights is not None:
        _check_volume("weights", weights, target.shape, features)
        weights = _as_kernel_dtype("weights", weights, dtype, masks_allowed=False)

    backend = select_backend("explanation_loss", features.device)
    if method not in FUSED_METHODS or backend == "reference":
        # the formula in the compute dtype, as the kernels; autograd casts the gradients back
        with _autocast_off(features.device):
            result = explanation_loss_reference(features.to(dtype), alpha.to(dtype), target, soft_target, weights,
                                                method, return_cam)
        if return_cam:
            return result[0].to(features.dtype), result[1].to(features.dtype)
        return result.to(features.dtype)
    need_grad = torch.is_grad_enabled() and (features.requires_grad or alpha.requires_grad)
    if backend == "triton":
        op = torch.ops.due_ext.explanation_loss_fwd_triton
    else:
        op = torch.ops.due_ext.explanation_loss_fwd
    loss, _, cam = op(features, alpha, target, soft_target, weights, method, need_grad, return_cam)
    return (loss, cam) if return_cam else loss
