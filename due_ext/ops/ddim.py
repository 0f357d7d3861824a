"""The fused DDIM step: ``x_prev = ddim_step(x_t, eps, alpha_t, alpha_prev, eta, noise, clip_x0)``.

One pass over memory for a whole batch of independent chains (every block of every volume and every repeat of
the interpolator advances together). Formula and oracle: :mod:`due_ext.ops.ddim_reference`.

Operators (``torch.ops.due_ext``):

- ``ddim_step``: schema and kernels in C++ (``csrc/cpu/ddim_step_cpu.cpp``, ``csrc/cuda/ddim_step_cuda.cu``);
  autograd and the fake (meta) implementation are registered here.
- ``ddim_step_triton``: the Triton kernel (:mod:`due_ext.ops.triton.ddim`) as a Python custom op, same autograd.

:func:`ddim_step` validates its arguments, then runs the backend :func:`~due_ext.ops._dispatch.select_backend`
picks (``DUE_EXT_BACKEND`` forces one). Gradients flow to ``x_t``, ``eps`` and ``noise``; the alphas are
schedule constants. The backward is a handful of elementwise PyTorch ops (itself differentiable).
"""

from __future__ import annotations

import math

import torch

from due_ext._backends import build_hint, load_extension
from due_ext.ops._dispatch import select_backend
from due_ext.ops.ddim_reference import Alpha, ddim_sigma, ddim_step_reference

__all__ = ["ddim_step"]

_EXTENSION_LOADED, _ = load_extension()
# A due_ext._C built before this op existed loads fine but lacks it: say so when it would be used.
_COMPILED_OP = _EXTENSION_LOADED and hasattr(torch.ops.due_ext, "ddim_step")


def _chain_coefficients(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> dict[str, torch.Tensor]:
    """Per-chain float64 factors: ``x0 = x_scale*x_t + eps_scale*eps``, ``x_prev = prev_scale*x0 + direction*eps
    + sigma*noise`` (the same as the kernels form)."""
    a_t = alpha_t.to(torch.float64)
    a_prev = alpha_prev.to(torch.float64)
    sigma = ddim_sigma(a_t, a_prev, eta)
    sqrt_a_t = torch.sqrt(a_t)
    return {
        "x_scale": 1 / sqrt_a_t,
        "eps_scale": -torch.sqrt(1 - a_t) / sqrt_a_t,
        "prev_scale": torch.sqrt(a_prev),
        "direction": torch.sqrt(torch.clamp(1 - a_prev - sigma**2, min=0)),
        "sigma": sigma,
    }


def _setup_context(ctx, inputs, output) -> None:
    x_t, eps, alpha_t, alpha_prev, eta, noise, clip_x0 = inputs
    # x_t and eps are needed only to know where the clamp was active.
    ctx.save_for_backward(alpha_t, alpha_prev, *((x_t, eps) if clip_x0 is not None else ()))
    ctx.eta = eta
    ctx.clip_x0 = clip_x0
    ctx.has_noise = noise is not None


def _backward(ctx, grad: torch.Tensor):
    alpha_t, alpha_prev, *clip_inputs = ctx.saved_tensors
    c = _chain_coefficients(alpha_t, alpha_prev, ctx.eta)
    compute = torch.promote_types(grad.dtype, torch.float32)
    shape = (grad.shape[0],) + (1,) * (grad.dim() - 1)
    coef = {name: value.to(compute).view(shape) for name, value in c.items()}
    g = grad.to(compute)
    grad_x0 = g * coef["prev_scale"]
    if ctx.clip_x0 is not None:
        x_t, eps = clip_inputs
        x0 = coef["x_scale"] * x_t.to(compute) + coef["eps_scale"] * eps.to(compute)
        # torch.clamp passes the gradient where -clip <= x0 <= clip (bounds included); so do we.
        grad_x0 = grad_x0 * ((x0 >= -ctx.clip_x0) & (x0 <= ctx.clip_x0))
    needs = ctx.needs_input_grad
    grad_x = (grad_x0 * coef["x_scale"]).to(grad.dtype) if needs[0] else None
    grad_eps = (grad_x0 * coef["eps_scale"] + g * coef["direction"]).to(grad.dtype) if needs[1] else None
    grad_noise = (g * coef["sigma"]).to(grad.dtype) if ctx.has_noise and needs[5] else None
    return grad_x, grad_eps, None, None, None, grad_noise, None


def _fake(x_t, eps, alpha_t, alpha_prev, eta, noise, clip_x0):
    # The kernels return a fresh contiguous tensor like x_t.
    return x_t.new_empty(x_t.shape)


if _COMPILED_OP:
    torch.library.register_fake("due_ext::ddim_step", _fake)
    torch.library.register_autograd("due_ext::ddim_step", _backward, setup_context=_setup_context)


@torch.library.custom_op("due_ext::ddim_step_triton", mutates_args=())
def _ddim_step_triton(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor,
                      eta: float, noise: torch.Tensor | None, clip_x0: float | None) -> torch.Tensor:
    from due_ext.ops.triton.ddim import ddim_step_triton  # imports triton only when this backend runs

    return ddim_step_triton(x_t, eps, alpha_t, alpha_prev, eta, noise, clip_x0)


_ddim_step_triton.register_fake(_fake)
_ddim_step_triton.register_autograd(_backward, setup_context=_setup_context)


def _check_alpha(alpha: Alpha, name: str, batch: int,
                 device: torch.device) -> tuple[torch.Tensor, float | torch.Tensor | None]:
    """``alpha`` as a float64 ``(B,)`` tensor on ``device``, and its host value (a number, a CPU tensor, or
    ``None`` for a GPU tensor: values are checked only on the host, so sampling never waits for a read-back)."""
    if isinstance(alpha, torch.Tensor):
        if not alpha.is_floating_point():
            raise TypeError(f"ddim_step: {name} must be a floating tensor, got {alpha.dtype}")
        if alpha.requires_grad:
            raise ValueError(f"ddim_step: {name} requires grad, but the alphas are schedule constants and "
                             "ddim_step does not differentiate with respect to them; pass alpha.detach()")
        if alpha.dim() == 0:
            alpha = alpha.reshape(1).expand(batch)
        if alpha.shape != (batch,):
            raise ValueError(f"ddim_step: {name} must be a number or a (B,) = ({batch},) tensor, got shape "
                             f"{tuple(alpha.shape)}")
        values = alpha.to(device=device, dtype=torch.float64).contiguous()
        host = alpha.to(torch.float64) if alpha.device.type == "cpu" else None
        if host is not None and batch > 0:
            low, high = (float(v) for v in torch.aminmax(host))
            if not (low > 0 and high <= 1):
                raise ValueError(f"ddim_step: {name} is a cumulative alpha and must lie in (0, 1], got values in "
                                 f"[{low}, {high}]")
        return values, host
    if isinstance(alpha, int | float) and not isinstance(alpha, bool):
        host = float(alpha)
        if not (0 < host <= 1):
            raise ValueError(f"ddim_step: {name} is a cumulative alpha and must lie in (0, 1], got {host}")
        return torch.full((batch,), host, dtype=torch.float64, device=device), host
    raise TypeError(f"ddim_step: {name} must be a float or a (B,) tensor, got {type(alpha).__name__}")


def _sigma_is_defined(alpha_t: float | torch.Tensor | None, alpha_prev: float | torch.Tensor | None) -> bool:
    """Whether ``alpha_t < 1`` and ``alpha_prev >= alpha_t`` for every chain (unknown host values pass)."""
    if alpha_t is None or alpha_prev is None:
        return True
    if isinstance(alpha_t, float) and isinstance(alpha_prev, float):
        return alpha_t < 1 and alpha_prev >= alpha_t
    a_t = torch.as_tensor(alpha_t, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_prev, dtype=torch.float64)
    return bool(((a_t < 1) & (a_prev >= a_t)).all())


def _check_sample(name: str, tensor: torch.Tensor | None, like: torch.Tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"ddim_step: {name} must be a tensor, got {type(tensor).__name__}")
    if tensor.shape != like.shape or tensor.dtype != like.dtype or tensor.device != like.device:
        raise ValueError(f"ddim_step: {name} ({tuple(tensor.shape)}, {tensor.dtype}, {tensor.device}) must match "
                         f"x_t ({tuple(like.shape)}, {like.dtype}, {like.device})")


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: Alpha, alpha_prev: Alpha, eta: float = 0.0,
              noise: torch.Tensor | None = None, clip_x0: float | None = None) -> torch.Tensor:
    """One DDIM update (Song et al. 2021) for ``B`` independent chains, fused into one kernel.

    Matches ``monai.networks.schedulers.DDIMScheduler.step(eps, t, x_t, eta)[0]`` (epsilon prediction) given
    the same noise; see :mod:`due_ext.ops.ddim_reference` for the formula and the documented differences.

    Args:
        x_t: current samples ``(B, ...)``, floating point (float32/float64; half types compute in float32).
        eps: predicted noise, like ``x_t``.
        alpha_t: cumulative alpha (alpha-bar) of the current step: a number, or ``(B,)`` per chain.
        alpha_prev: cumulative alpha of the step the update goes to: a number, or ``(B,)`` per chain.
        eta: >= 0; 0 is the deterministic DDIM update.
        noise: standard normal noise like ``x_t``; required when ``eta > 0`` (ignored when ``eta == 0``).
        clip_x0: clamp the predicted ``x0`` to ``[-clip_x0, clip_x0]`` (MONAI's ``clip_sample``); ``None``: no clamp.

    Returns:
        ``x_prev`` like ``x_t`` (contiguous). Differentiable with respect to ``x_t``, ``eps`` and ``noise``
        (the gradient through a clamped ``x0`` is zero where the clamp is active).

    Raises:
        TypeError, ValueError: on mismatched shapes/dtypes/devices, alphas outside (0, 1] (checked for numbers
            and CPU tensors; GPU tensors are not read back, to keep sampling free of device syncs), a negative
            ``eta``, ``eta > 0`` without noise, or ``clip_x0 <= 0``.
    """
    if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point() or x_t.dim() < 1:
        raise TypeError("ddim_step: x_t must be a floating tensor of shape (B, ...), got "
                        f"{getattr(x_t, 'dtype', type(x_t).__name__)} {tuple(getattr(x_t, 'shape', ()))}")
    _check_sample("eps", eps, x_t)
    eta = float(eta)
    if not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"ddim_step: eta must be a finite number >= 0, got {eta}")
    if eta > 0:
        if noise is None:
            raise ValueError(f"ddim_step: eta = {eta} > 0 needs noise (a standard normal tensor like x_t)")
        _check_sample("noise", noise, x_t)
    if clip_x0 is not None:
        clip_x0 = float(clip_x0)
        if not clip_x0 > 0:
            raise ValueError(f"ddim_step: clip_x0 must be > 0 or None, got {clip_x0}")
    batch = x_t.shape[0]
    a_t, host_t = _check_alpha(alpha_t, "alpha_t", batch, x_t.device)
    a_prev, host_prev = _check_alpha(alpha_prev, "alpha_prev", batch, x_t.device)
    if eta > 0 and batch > 0 and not _sigma_is_defined(host_t, host_prev):
        raise ValueError("ddim_step: eta > 0 needs alpha_t < 1 and alpha_prev >= alpha_t for every chain (sigma "
                         "is undefined otherwise)")
    noise = noise if eta > 0 else None

    backend = select_backend("ddim_step", x_t.device)
    if backend == "reference":
        return ddim_step_reference(x_t, eps, a_t, a_prev, eta, noise, clip_x0)
    if backend == "triton":
        return torch.ops.due_ext.ddim_step_triton(x_t, eps, a_t, a_prev, eta, noise, clip_x0)
    if not _COMPILED_OP:
        raise RuntimeError(f"ddim_step: due_ext._C has no ddim_step kernel (built from older sources); {build_hint()}")
    return torch.ops.due_ext.ddim_step(x_t, eps, a_t, a_prev, eta, noise, clip_x0)
