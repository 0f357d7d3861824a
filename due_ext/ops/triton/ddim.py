"""Triton kernel of :func:`due_ext.ops.ddim_step` (formula: :mod:`due_ext.ops.ddim_reference`).

One program handles ``BLOCK`` elements of one chain: it forms that chain's coefficients once, in float64, then
streams ``x_t``, ``eps`` (and ``noise``) to ``x_prev`` in ``COMPUTE_DTYPE`` (float32, or float64 for float64
data). Runs on a GPU, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from due_ext._backends import triton_interpreting


@triton.jit
def ddim_step_kernel(x_ptr, eps_ptr, noise_ptr, alpha_t_ptr, alpha_prev_ptr, out_ptr, per_chain, blocks_per_chain,
                     eta, clip, CLIP: tl.constexpr, NOISE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    chain = pid // blocks_per_chain
    block = pid % blocks_per_chain
    alpha_t = tl.load(alpha_t_ptr + chain)
    alpha_prev = tl.load(alpha_prev_ptr + chain)
    sqrt_alpha_t = tl.sqrt(alpha_t)
    x_scale = 1.0 / sqrt_alpha_t
    eps_scale = -tl.sqrt(1.0 - alpha_t) / sqrt_alpha_t
    prev_scale = tl.sqrt(alpha_prev)
    if NOISE:
        sigma = eta * tl.sqrt((1.0 - alpha_prev) / (1.0 - alpha_t)) * tl.sqrt(1.0 - alpha_t / alpha_prev)
    else:
        sigma = alpha_t * 0.0  # exactly 0 when eta == 0 (the formula is 0 * inf when alpha_t == 1)
    direction = tl.sqrt(tl.maximum(1.0 - alpha_prev - sigma * sigma, 0.0))

    in_chain = block * BLOCK + tl.arange(0, BLOCK)
    mask = in_chain < per_chain
    offsets = chain.to(tl.int64) * per_chain + in_chain
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    e = tl.load(eps_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
    x0 = x_scale.to(COMPUTE_DTYPE) * x + eps_scale.to(COMPUTE_DTYPE) * e
    if CLIP:
        # where() rather than minimum/maximum keeps NaN like torch.clamp
        x0 = tl.where(x0 < -clip, -clip, tl.where(x0 > clip, clip, x0))
    y = prev_scale.to(COMPUTE_DTYPE) * x0 + direction.to(COMPUTE_DTYPE) * e
    if NOISE:
        n = tl.load(noise_ptr + offsets, mask=mask, other=0.0).to(COMPUTE_DTYPE)
        y += sigma.to(COMPUTE_DTYPE) * n
    tl.store(out_ptr + offsets, y.to(out_ptr.dtype.element_ty), mask=mask)


def block_size(per_chain: int) -> int:
    """Elements per program: 1024 on a GPU; under the interpreter one program per chain when it fits, since
    each interpreted program costs milliseconds whatever its size."""
    limit = 1 << 16 if triton_interpreting() else 1024
    return max(16, min(triton.next_power_of_2(max(per_chain, 1)), limit))


def ddim_step_triton(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, alpha_prev: torch.Tensor,
                     eta: float, noise: torch.Tensor | None, clip_x0: float | None) -> torch.Tensor:
    """Launch :func:`ddim_step_kernel`. Arguments as validated by :func:`due_ext.ops.ddim_step`: alphas are
    float64 ``(B,)`` on the tensors' device, ``noise`` is given iff ``eta > 0``."""
    x = x_t.contiguous()
    e = eps.contiguous()
    use_noise = eta > 0
    n = noise.contiguous() if use_noise else x  # unused pointer when NOISE is off
    out = torch.empty_like(x)
    batch = x.shape[0]
    if out.numel() == 0:
        return out
    per_chain = x.numel() // batch
    block = block_size(per_chain)
    blocks_per_chain = triton.cdiv(per_chain, block)
    compute = tl.float64 if x.dtype == torch.float64 else tl.float32
    ddim_step_kernel[(batch * blocks_per_chain,)](
        x, e, n, alpha_t.to(torch.float64).contiguous(), alpha_prev.to(torch.float64).contiguous(), out,
        per_chain, blocks_per_chain, float(eta), float(clip_x0 or 0.0),
        CLIP=clip_x0 is not None, NOISE=use_noise, COMPUTE_DTYPE=compute, BLOCK=block)
    return out
