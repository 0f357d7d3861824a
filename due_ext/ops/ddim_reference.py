"""The DDIM update (Song et al. 2021, Eq. 12 and 16) written as plain PyTorch ops: the oracle every kernel of
:func:`due_ext.ops.ddim_step` is tested against.

For cumulative alphas ``a_t`` (current step) and ``a_prev`` (the step the update goes to), per chain:

    x0     = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)          then, optionally, clamp to [-clip_x0, clip_x0]
    sigma  = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    x_prev = sqrt(a_prev) * x0 + sqrt(max(0, 1 - a_prev - sigma^2)) * eps + sigma * noise

This is ``monai.networks.schedulers.DDIMScheduler.step`` for ``prediction_type="epsilon"``: the clamp acts on
``x0`` only and ``eps`` is not recomputed from the clamped ``x0`` (MONAI and the DDIM paper do the same).
Differences from MONAI, on purpose: the noise is an argument (MONAI draws it inside ``step``), the clip range
is symmetric (MONAI's default ``[-1, 1]`` is ``clip_x0=1``), alphas may differ per chain, ``sigma = 0`` exactly
when ``eta == 0`` (MONAI computes ``0 * sqrt(...)``, NaN when ``a_t == 1``), and ``1 - a_prev - sigma^2`` is
floored at 0 (MONAI takes the root of a negative number and returns NaN when ``eta > 1``).
"""

from __future__ import annotations

import torch

#: Types a cumulative alpha may be given as: one number for every chain, or a ``(B,)`` tensor (one per chain).
Alpha = float | torch.Tensor


def _per_chain(alpha: Alpha, batch: int, device: torch.device) -> torch.Tensor:
    """``alpha`` as a float64 ``(B,)`` tensor (coefficients are formed in double precision, then cast)."""
    if isinstance(alpha, torch.Tensor):
        alpha = alpha.to(device=device, dtype=torch.float64)
        if alpha.dim() == 0:
            return alpha.expand(batch)
        if alpha.shape != (batch,):
            raise ValueError(f"ddim_step_reference: a per-chain alpha must have shape ({batch},), got "
                             f"{tuple(alpha.shape)}")
        return alpha
    return torch.full((batch,), float(alpha), dtype=torch.float64, device=device)


def ddim_sigma(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """Standard deviation of the DDIM noise term, ``eta * sqrt((1-a_prev)/(1-a_t)) * sqrt(1 - a_t/a_prev)``."""
    if eta == 0:
        return torch.zeros_like(alpha_t)
    return eta * torch.sqrt((1 - alpha_prev) / (1 - alpha_t)) * torch.sqrt(1 - alpha_t / alpha_prev)


def ddim_step_reference(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: Alpha, alpha_prev: Alpha, eta: float = 0.0,
                        noise: torch.Tensor | None = None, clip_x0: float | None = None) -> torch.Tensor:
    """One DDIM step for ``B`` independent chains, ``x_t``, ``eps``, ``noise`` of shape ``(B, ...)``.

    Args:
        x_t: current samples.
        eps: predicted noise (the model's epsilon output).
        alpha_t: cumulative alpha of the current step, a number or a ``(B,)`` tensor.
        alpha_prev: cumulative alpha of the step the update goes to, a number or a ``(B,)`` tensor.
        eta: 0 for the deterministic DDIM update, 1 for DDPM-like variance.
        noise: standard normal noise like ``x_t``; needed when ``eta > 0``.
        clip_x0: clamp the predicted ``x0`` to ``[-clip_x0, clip_x0]``; ``None`` for no clamp.

    Returns:
        ``x_prev``, same shape and dtype as ``x_t``. Half-precision inputs are computed in float32.
    """
    if eta > 0 and noise is None:
        raise ValueError("ddim_step_reference: eta > 0 needs noise")
    batch = x_t.shape[0]
    compute = torch.promote_types(x_t.dtype, torch.float32)
    shape = (batch,) + (1,) * (x_t.dim() - 1)
    a_t = _per_chain(alpha_t, batch, x_t.device)
    a_prev = _per_chain(alpha_prev, batch, x_t.device)
    sigma = ddim_sigma(a_t, a_prev, eta)

    def coef(value: torch.Tensor) -> torch.Tensor:
        return value.to(compute).view(shape)

    x = x_t.to(compute)
    e = eps.to(compute)
    x0 = (x - coef(torch.sqrt(1 - a_t)) * e) / coef(torch.sqrt(a_t))
    if clip_x0 is not None:
        x0 = torch.clamp(x0, -clip_x0, clip_x0)
    direction = torch.sqrt(torch.clamp(1 - a_prev - sigma**2, min=0))
    x_prev = coef(torch.sqrt(a_prev)) * x0 + coef(direction) * e
    if eta > 0:
        x_prev = x_prev + coef(sigma) * noise.to(compute)
    return x_prev.to(x_t.dtype)
