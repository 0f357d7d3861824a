"""Batched autoregressive gap filling with repeats: the sampling half of the interpolator (paper Alg. 1).

A *job* is one block's crops: the lower and upper annotated slices and the number ``gap`` of missing slices.
Each job is sampled ``repeats`` times (a *chain* is one job x one repeat). Filling is autoregressive: in round
``r`` every chain with ``gap > r`` draws its slice ``r + 1``, conditioned on its previous slice (the lower
annotated slice in round 0, afterwards the chain's own previous sample, binarised) and the upper annotated
slice, with ``position = 1 / span`` and ``span = gap + 1 - r``. A network with prior channels
(``prior_channels > 0``) also gets the classical fills of slice ``r + 1`` from the block's two annotated slices
(:func:`.prior.classical_prior`). Within a round, *all* active chains of all jobs advance together through the
denoising steps: one model batch per step (split into chunks of at most ``max_batch`` crops to bound memory)
and one fused :func:`due_ext.ops.ddim_step` for the whole batch.

Solver: DDIM (Song et al. 2021) on ``steps`` "trailing" timesteps (the first step starts at ``T - 1``, pure
noise; the last lands on ``alpha = 1``), ``eta`` in [0, 1] (``eta = 1`` with many steps is the DDPM-like
stochastic sampler). Determinism: every chain owns a ``torch.Generator`` seeded from ``(seed, job key,
repeat)``, so a chain's noise does not depend on which other chains share its batch or on ``max_batch``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from due_ext.interp.diffusion.model import epsilon_from_output
from due_ext.interp.diffusion.prior import PRIOR_METHODS, classical_prior
from due_ext.ops import ddim_step


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample.

    Attributes:
        steps: denoising steps per slice.
        eta: DDIM stochasticity (0 deterministic given the initial noise, 1 DDPM-like).
        repeats: ``T`` samples per block (mean -> interpolation, variance -> variance).
        seed: base seed; equal seeds give equal results.
        max_batch: most crops per model call (memory budget).
        bf16: run the network under CPU/GPU bfloat16 autocast (the DDIM update stays float32). Off by default:
            on our 2-core CPU it was slower than float32 (benchmarks/README.md).
        clip_x0: clamp of the predicted clean slice (masks live in [-1, 1]).
    """

    steps: int = 10
    eta: float = 1.0
    repeats: int = 8
    seed: int = 0
    max_batch: int = 64
    bf16: bool = False
    clip_x0: float = 1.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.repeats < 1 or self.max_batch < 1:
            raise ValueError(f"steps, repeats and max_batch must be >= 1, got {self.steps}, {self.repeats}, "
                             f"{self.max_batch}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")


@dataclass(frozen=True)
class GapJob:
    """One block to fill: binary ``(H, W)`` crops of its lower and upper annotated slices, ``gap`` >= 1 missing
    slices, and ``key`` (ints) that seeds its chains."""

    lower: np.ndarray
    upper: np.ndarray
    gap: int
    key: tuple[int, ...]


def ddim_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """``steps`` descending integer timesteps from ``T - 1``, evenly spaced ("trailing" spacing)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    points = np.round(np.linspace(num_train_timesteps, 0, steps, endpoint=False)).astype(int) - 1
    return [int(t) for t in points]


def chain_seed(seed: int, key: Sequence[int], repeat: int) -> int:
    """A 63-bit seed for one chain, mixed from the base seed, the job key and the repeat index."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(int(k) & 0xFFFFFFFF for k in key), int(repeat)])
    return int(state.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], np.uint64))


def _randn(generators: Sequence[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)


def _autocast(enabled: bool, device: torch.device):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def denoise(model: nn.Module, alphas_cumprod: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
            position: torch.Tensor, span: torch.Tensor, generators: Sequence[torch.Generator],
            settings: SamplerSettings, prior: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one slice per chain: ``(B, 1, H, W)`` in ``[-1, 1]`` from conditions ``prev``, ``next`` (same
    shape, in ``[-1, 1]``) and per-chain ``position``, ``span`` ``(B,)``; one generator per chain. ``prior``
    ``(B, C, H, W)`` goes to networks with prior channels (``None`` for the others)."""
    device = prev.device
    prediction_type = getattr(model, "prediction_type", "epsilon")
    timesteps = ddim_timesteps(len(alphas_cumprod), settings.steps)
    x = _randn(generators, tuple(prev.shape[1:]), device)
    batch = x.shape[0]
    for i, t in enumerate(timesteps):
        alpha_t = float(alphas_cumprod[t])
        alpha_prev = float(alphas_cumprod[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
        t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
        output = torch.empty_like(x)
        with _autocast(settings.bf16, device):
            for lo in range(0, batch, settings.max_batch):
                hi = min(lo + settings.max_batch, batch)
                extra = () if prior is None else (prior[lo:hi],)
                output[lo:hi] = model(x[lo:hi], t_batch[lo:hi], prev[lo:hi], next[lo:hi], position[lo:hi],
                                      span[lo:hi], *extra).float()
        eps = epsilon_from_output(output, x, alpha_t, prediction_type)
        noise = _randn(generators, tuple(x.shape[1:]), device) if settings.eta > 0 else None
        x = ddim_step(x, eps, alpha_t, alpha_prev, settings.eta, noise, settings.clip_x0)
    return x


def to_signed(mask: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Binary mask in {0, 1} (thresholded at 0.5) -> float32 tensor in {-1, +1}."""
    return torch.as_tensor(np.asarray(mask) > 0.5, dtype=torch.float32) * 2.0 - 1.0


@torch.no_grad()
def sample_gaps(model: nn.Module, alphas_cumprod: torch.Tensor, jobs: Sequence[GapJob], settings: SamplerSettings,
                device: torch.device | str = "cpu", progress: bool = False) -> list[torch.Tensor]:
    """Fill every job's gap ``settings.repeats`` times.

    Returns, per job, a float32 ``(repeats, gap, H, W)`` tensor of samples in ``[0, 1]`` (continuous; the
    network's final clean-slice estimate mapped from ``[-1, 1]``).
    """
    device = torch.device(device)
    model = model.eval()
    if not jobs:
        return []
    shape = np.shape(jobs[0].lower)
    for j, job in enumerate(jobs):
        if np.shape(job.lower) != shape or np.shape(job.upper) != shape:
            raise ValueError(f"job {j}: crops must all be {shape}, got {np.shape(job.lower)}, {np.shape(job.upper)}")
        if job.gap < 1:
            raise ValueError(f"job {j}: gap must be >= 1, got {job.gap}")
    repeats = settings.repeats
    chain_job = [j for j in range(len(jobs)) for _ in range(repeats)]
    chain_gap = torch.tensor([jobs[j].gap for j in chain_job])
    generators = [torch.Generator().manual_seed(chain_seed(settings.seed, jobs[j].key, r))
                  for j in range(len(jobs)) for r in range(repeats)]
    lower = torch.stack([to_signed(job.lower) for job in jobs])[:, None]
    upper = torch.stack([to_signed(job.upper) for job in jobs])[:, None]
    prev = lower.repeat_interleave(repeats, dim=0).to(device)
    upper = upper.repeat_interleave(repeats, dim=0).to(device)
    outputs = [torch.zeros((repeats, job.gap, *shape), dtype=torch.float32) for job in jobs]
    priors = None
    if getattr(model, "prior_channels", 0):  # (chain, round, C, H, W), zero past a chain's gap
        if model.prior_channels != len(PRIOR_METHODS):
            raise ValueError(f"the network has {model.prior_channels} prior channels; the sampler provides "
                             f"{len(PRIOR_METHODS)} ({', '.join(PRIOR_METHODS)})")
        rounds_max = max(job.gap for job in jobs)
        job_priors = torch.zeros((len(jobs), rounds_max, model.prior_channels, *shape), dtype=torch.float32)
        for j, job in enumerate(jobs):
            job_priors[j, : job.gap] = torch.from_numpy(classical_prior(job.lower, job.upper, job.gap))
        priors = job_priors.repeat_interleave(repeats, dim=0)
    rounds = int(chain_gap.max())
    iterator = range(rounds)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="interpolating slices", unit="round")
    for r in iterator:
        active = torch.nonzero(chain_gap > r).flatten()
        span = (chain_gap[active] + 1 - r).to(torch.float32).to(device)
        position = 1.0 / span
        prior = None if priors is None else priors[active, r].to(device)
        sample = denoise(model, alphas_cumprod, prev[active.to(device)], upper[active.to(device)], position, span,
                         [generators[int(c)] for c in active], settings, prior)
        values = ((sample.float().cpu() + 1.0) / 2.0).clamp(0.0, 1.0)
        for row, c in enumerate(active.tolist()):
            outputs[chain_job[c]][c % repeats, r] = values[row, 0]
        # The next round is conditioned on this slice, binarised like a drawn annotation.
        prev[active.to(device)] = torch.where(sample > 0, 1.0, -1.0).to(prev.dtype)
    return outputs
