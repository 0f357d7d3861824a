"""The imputed uncertainty predictor: a neural-process VAE that predicts the diffusion variance of a gap in one pass.

Neural process (Garnelo et al. 2018; the paper's Section 4.3, Figure 2) over the slice axis of one block:

- **context** = the block's two annotated slices at relative positions 0 and 1 (binary ``(H, W)`` crops), each
  encoded by the same small 2D CNN into a feature pyramid ``r_0, r_1`` (full, 1/2, 1/4, ... resolution).
- **targets** = the missing slices at their continuous relative positions ``t = i / span`` in ``(0, 1)``
  (``span = gap + 1``, the distance in slices between the two annotated ones), with the gap length as an input:
  the target embedding sees ``t``, ``1 / span``, ``log span`` and the distance in slices to the nearer annotated
  slice ``span * min(t, 1 - t)``. The original code placed targets at ``linspace(2, 6, gap)``, after both
  conditions and squeezed to one range whatever the gap; here a slice two slices away from an annotation is
  told so, in any gap.
- **deterministic path**: per target and pyramid level, ``[r_0, r_1, (1 - t) r_0 + t r_1]`` (a position-aware
  cross-attention over two context points, written out), decoded UNet-style with FiLM conditioning on the
  target embedding and the latent.
- **latent path** (the VAE): a global latent ``z`` (``latent_dim``). Prior ``p(z | context)`` from the pooled
  context features and the span; posterior ``q(z | context, targets)`` additionally sees the target variance
  maps (training only). Training samples ``z`` from the posterior (reparameterised); inference uses the *prior
  mean*, so a forward pass is deterministic.
- **output**: per-voxel ``log(var + eps)`` of every missing slice at once, ``(B, G, H, W)``. ``var`` is what the
  training targets hold (:class:`due_ext.uncertainty.targets.VarianceTargetDataset`): the diffusion variance,
  or the expected squared error of a diffusion sample against the truth (variance plus squared bias, up to 1;
  ``max_variance`` clamps :meth:`NeuralProcessUncertainty.predict_variance` accordingly). Either way it is the
  variance that :mod:`due_ext.uncertainty.weights` turns into weights.

Loss (:func:`neural_process_loss`), per block and then averaged over the batch: the negative ELBO per target
voxel = Laplace negative log-likelihood of ``log(var + eps)`` with unit scale (the mean absolute error, up to a
constant) over the valid target voxels + ``beta * KL(q(z | C, T) || p(z | C)) / (number of target voxels)``.
L1 on log-variance because the targets span four decades (background ~0, boundaries up to 0.25) and their
ranking, not their absolute error, is what the weights use. ``likelihood="gaussian"`` instead reads the predicted
variance ``s = exp(log_var)`` as that of a zero-mean Gaussian residual and the target ``v`` as the residual's
mean square (e.g. the squared error of a diffusion sample against the truth): the expected negative
log-likelihood is, up to a constant, half the Itakura-Saito divergence ``v / s - log(v / s) - 1``, minimised by
``s = E[v | context]``, the conditional *mean* (the L1 loss gives the conditional median, which ignores errors
that occur in fewer than half of similar voxels), on the same log scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Floor added to the variance before the log: variances below it are "certain" (1e-4 = a 1% standard deviation).
DEFAULT_EPS = 1e-4
#: Side of the square crops: the interpolator's lesion-centred windows (:mod:`due_ext.interp.diffusion.crops`).
DEFAULT_CROP_SIZE = 32
#: Likelihoods of the reconstruction term (:func:`neural_process_loss`).
LIKELIHOODS = ("laplace", "gaussian")


def target_positions(gaps: Sequence[int] | torch.Tensor,
                     max_gap: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relative positions of the missing slices of blocks with ``gaps`` missing slices each.

    Returns ``positions`` ``(B, G)`` (``i / (gap + 1)`` for ``i = 1..gap``, 0 where padded), ``valid`` ``(B, G)``
    bool and ``span`` ``(B,)`` float (``gap + 1``), with ``G = max_gap`` or the largest gap.
    """
    gaps = torch.as_tensor(gaps, dtype=torch.long).reshape(-1)
    if gaps.numel() == 0 or int(gaps.min()) < 1:
        raise ValueError(f"every gap must be >= 1, got {gaps.tolist()}")
    width = int(max_gap) if max_gap is not None else int(gaps.max())
    if width < int(gaps.max()):
        raise ValueError(f"max_gap {width} is smaller than the largest gap {int(gaps.max())}")
    index = torch.arange(1, width + 1, dtype=torch.float32)[None]
    valid = index <= gaps[:, None]
    span = (gaps + 1).float()
    positions = torch.where(valid, index / span[:, None], torch.zeros(()))
    return positions, valid, span


def gap_features(positions: torch.Tensor, span: torch.Tensor) -> torch.Tensor:
    """``(N, 4)`` target features: ``t``, ``1 / span``, ``log span``, ``span * min(t, 1 - t)`` (slices to the
    nearer annotated slice, divided by 4 to keep it O(1))."""
    t, span = positions.float(), span.float().clamp(min=2.0)
    return torch.stack([t, 1.0 / span, torch.log(span), span * torch.minimum(t, 1.0 - t) / 4.0], dim=-1)


def _groups(channels: int, norm_groups: int) -> int:
    return math.gcd(channels, norm_groups)


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions with group norm and SiLU."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int = 8) -> None:
        groups = _groups(out_channels, norm_groups)
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(groups, out_channels),
                         nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1),
                         nn.GroupNorm(groups, out_channels), nn.SiLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Sequential's computation, called functionally: one pass of this small network is dominated by
        # per-call overhead, and six child-module calls per block were ~8 % of it (torch.group_norm, not
        # F.group_norm, for the same reason).
        conv1, norm1, _, conv2, norm2, _ = self
        for conv, norm in ((conv1, norm1), (conv2, norm2)):
            x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
            x = F.silu(torch.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps))
        return x


class SliceEncoder(nn.Module):
    """Feature pyramid of one binary slice ``(B, 1, H, W)``: a list of ``(B, f_l, H / 2^l, W / 2^l)``."""

    def __init__(self, features: Sequence[int], norm_groups: int = 8) -> None:
        super().__init__()
        channels = [1, *features]
        self.levels = nn.ModuleList(ConvBlock(channels[i], channels[i + 1], norm_groups) for i in range(len(features)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, level in enumerate(self.levels):
            x = level(x if i == 0 else F.avg_pool2d(x, 2))
            out.append(x)
        return out


class FiLM(nn.Module):
    """Feature-wise affine modulation ``x * (1 + scale) + shift`` from a conditioning vector."""

    def __init__(self, condition_dim: int, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(condition_dim, 2 * channels)
        nn.init.zeros_(self.linear.weight)  # start as the identity: conditioning is learned, not imposed
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(condition)[..., None, None].chunk(2, dim=1)
        return torch.addcmul(shift, x, 1.0 + scale)


@dataclass
class NeuralProcessOutput:
    """``log_var`` ``(B, G, H, W)`` = predicted ``log(var + eps)`` (0 at padded targets); ``valid`` ``(B, G)`` =
    which targets are real (not padding); ``prior`` and ``posterior`` = ``(mean, log_variance)`` of ``z``
    (``posterior`` is ``None`` without targets)."""

    log_var: torch.Tensor
    valid: torch.Tensor
    prior: tuple[torch.Tensor, torch.Tensor]
    posterior: tuple[torch.Tensor, torch.Tensor] | None


class NeuralProcessUncertainty(nn.Module):
    """Neural-process VAE predicting the per-voxel diffusion log-variance of every missing slice of a block.

    Args:
        features: channels per pyramid level (a level halves the resolution); ``crop_size`` must be divisible
            by ``2 ** (len(features) - 1)``.
        latent_dim: size of the global latent ``z``.
        embed_dim: size of the target embedding (position and gap length).
        norm_groups: group-norm groups (the gcd with each level's channels is used).
        crop_size: side of the square crops (checked; the network itself is size-free).
        eps: floor of the variance in ``log(var + eps)``.
        max_variance: upper clamp of :meth:`predict_variance`: 0.25 (the largest variance of values in [0, 1])
            for a predictor of the diffusion variance, 1.0 for one of a squared error against a binary truth.

    Call ``model(lower, upper, gaps)`` with binary crops ``lower``, ``upper`` ``(B, 1, H, W)`` (the annotated
    slices at positions 0 and 1) and ``gaps`` ``(B,)`` (missing slices per block); pass
    ``target_log_var`` ``(B, G, H, W)`` during training for the posterior. :meth:`predict_variance` returns
    variances.
    """

    def __init__(self, features: Sequence[int] = (16, 32, 64), latent_dim: int = 16, embed_dim: int = 32,
                 norm_groups: int = 8, crop_size: int = DEFAULT_CROP_SIZE, eps: float = DEFAULT_EPS,
                 max_variance: float = 0.25) -> None:
        super().__init__()
        features = tuple(int(f) for f in features)
        if crop_size % (2 ** (len(features) - 1)):
            raise ValueError(f"crop_size {crop_size} must be divisible by 2**{len(features) - 1} for "
                             f"{len(features)} pyramid levels")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not max_variance > 0:
            raise ValueError(f"max_variance must be > 0, got {max_variance}")
        self.max_variance = float(max_variance)
        self.features, self.latent_dim, self.crop_size, self.eps = features, int(latent_dim), int(crop_size), eps
        self.encoder = SliceEncoder(features, norm_groups)
        self.target_embedding = nn.Sequential(nn.Linear(4, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.span_embedding = nn.Sequential(nn.Linear(2, embed_dim), nn.SiLU())
        bottom = features[-1]
        # latent path: prior from pooled context, posterior adds pooled target-variance encodings
        self.prior_head = nn.Sequential(nn.Linear(2 * bottom + embed_dim, 2 * bottom), nn.SiLU(),
                                        nn.Linear(2 * bottom, 2 * latent_dim))
        self.target_encoder = nn.Sequential(ConvBlock(2, features[0], norm_groups), nn.AvgPool2d(2),
                                            ConvBlock(features[0], bottom, norm_groups), nn.AdaptiveAvgPool2d(1),
                                            nn.Flatten())
        self.posterior_head = nn.Sequential(nn.Linear(2 * bottom + embed_dim + bottom + embed_dim, 2 * bottom),
                                            nn.SiLU(), nn.Linear(2 * bottom, 2 * latent_dim))
        # decoder: bottom-up, each level sees [r0, r1, blend] (+ the upsampled coarser decoding)
        condition = embed_dim + latent_dim
        self.decoder = nn.ModuleList()
        self.films = nn.ModuleList()
        for level in reversed(range(len(features))):
            in_channels = 3 * features[level] + (features[level + 1] if level + 1 < len(features) else 0)
            self.decoder.append(ConvBlock(in_channels, features[level], norm_groups))
            self.films.append(FiLM(condition, features[level]))
        self.head = nn.Conv2d(features[0], 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, math.log(eps))  # start at "no variance"
        # NHWC: oneDNN runs these 8-32-channel convolutions ~30 % faster than in NCHW (measured on 32 px crops);
        # activations follow the weights' layout, and state dicts load into either.
        self.to(memory_format=torch.channels_last)

    def normalized_log_var(self, log_var: torch.Tensor) -> torch.Tensor:
        """``log(var + eps)`` mapped to about [0, 1] (0 = no variance) for the posterior encoder."""
        return (log_var - math.log(self.eps)) / -math.log(self.eps)

    def _context(self, lower: torch.Tensor, upper: torch.Tensor, span: torch.Tensor
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        both = self.encoder(torch.cat([lower, upper], dim=0))
        r0 = [f[: lower.shape[0]] for f in both]
        r1 = [f[lower.shape[0]:] for f in both]
        span_features = torch.stack([1.0 / span, torch.log(span)], dim=-1)
        pooled = torch.cat([r0[-1].mean(dim=(-2, -1)), r1[-1].mean(dim=(-2, -1)), self.span_embedding(span_features)],
                           dim=-1)
        return r0, r1, pooled

    def forward(self, lower: torch.Tensor, upper: torch.Tensor, gaps: torch.Tensor | Sequence[int],
                target_log_var: torch.Tensor | None = None) -> NeuralProcessOutput:
        if lower.dim() != 4 or lower.shape[1] != 1 or lower.shape != upper.shape:
            raise ValueError(f"lower and upper must both be (B, 1, H, W); got {tuple(lower.shape)} and "
                             f"{tuple(upper.shape)}")
        batch, height, width = lower.shape[0], lower.shape[-2], lower.shape[-1]
        factor = 2 ** (len(self.features) - 1)
        if height % factor or width % factor:
            raise ValueError(f"crop size {height}x{width} must be divisible by {factor}")
        gaps = torch.as_tensor(gaps, device=lower.device).reshape(-1)
        if gaps.numel() != batch:
            raise ValueError(f"{gaps.numel()} gaps for {batch} blocks")
        positions, valid, span = (x.to(lower.device) for x in target_positions(gaps.cpu()))
        if target_log_var is not None and target_log_var.shape[:2] != positions.shape:
            if target_log_var.shape[0] != batch or target_log_var.shape[1] < positions.shape[1]:
                raise ValueError(f"target_log_var {tuple(target_log_var.shape)} does not fit {batch} blocks with "
                                 f"up to {positions.shape[1]} missing slices")
            target_log_var = target_log_var[:, : positions.shape[1]]
        lower, upper = lower.float(), upper.float()
        r0, r1, pooled = self._context(lower, upper, span)
        prior_mean, prior_log_var = self.prior_head(pooled).chunk(2, dim=-1)

        block, slot = torch.nonzero(valid, as_tuple=True)  # one row per real target
        t = positions[block, slot]
        embedding = self.target_embedding(gap_features(t, span[block]))
        posterior = None
        if target_log_var is not None:
            blend = (1.0 - t)[:, None, None] * lower[block, 0] + t[:, None, None] * upper[block, 0]
            target_map = self.normalized_log_var(target_log_var[block, slot].float())
            encoded = self.target_encoder(torch.stack([target_map, blend], dim=1))
            summary = torch.cat([encoded, embedding], dim=-1)
            pooled_targets = torch.zeros(batch, summary.shape[-1], device=summary.device, dtype=summary.dtype)
            pooled_targets.index_add_(0, block, summary)
            pooled_targets = pooled_targets / valid.sum(dim=1, keepdim=True).clamp(min=1)
            posterior = tuple(self.posterior_head(torch.cat([pooled, pooled_targets], dim=-1)).chunk(2, dim=-1))
        if posterior is not None and self.training:
            mean, log_var = posterior
            z = mean + torch.randn_like(mean) * torch.exp(0.5 * log_var)
        else:
            z = prior_mean  # deterministic inference: the prior mean, never a random draw
        condition = torch.cat([embedding, z[block]], dim=-1)

        t4 = t[:, None, None, None]
        x = None
        for i, level in enumerate(reversed(range(len(self.features)))):
            a, b = r0[level][block], r1[level][block]
            parts = [a, b, torch.lerp(a, b, t4)]
            if x is not None:
                parts.append(F.interpolate(x, scale_factor=2, mode="nearest"))
            x = self.films[i](self.decoder[i](torch.cat(parts, dim=1)), condition)
        values = self.head(x)[:, 0]
        log_var = torch.zeros((batch, positions.shape[1], height, width), device=values.device, dtype=values.dtype)
        log_var = log_var.index_put((block, slot), values)
        return NeuralProcessOutput(log_var, valid, (prior_mean, prior_log_var), posterior)

    @torch.no_grad()
    def predict_variance(self, lower: torch.Tensor, upper: torch.Tensor,
                         gaps: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Deterministic variance ``(B, G, H, W)`` in ``[0, max_variance]`` (0 at padded targets), in eval mode."""
        was_training = self.training
        if was_training:  # train()/eval() walk every submodule: skip them when already in eval mode
            self.eval()
        try:
            out = self(lower, upper, gaps)
        finally:
            if was_training:
                self.train()
        variance = (torch.exp(out.log_var) - self.eps).clamp(0.0, self.max_variance)
        return variance * out.valid[..., None, None]


def gaussian_kl(posterior: tuple[torch.Tensor, torch.Tensor], prior: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``KL(N(m_q, e^{s_q}) || N(m_p, e^{s_p}))`` summed over the latent dimensions, per row ``(B,)``."""
    (mq, sq), (mp, sp) = posterior, prior
    return 0.5 * (sp - sq + (torch.exp(sq) + (mq - mp) ** 2) / torch.exp(sp) - 1.0).sum(dim=-1)


def log_variance_target(variance: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``log(max(var, 0) + eps)``: the regression target."""
    return torch.log(variance.float().clamp(min=0.0) + eps)


def neural_process_loss(output: NeuralProcessOutput, target_log_var: torch.Tensor,
                        beta: float = 1.0, likelihood: str = "laplace") -> dict[str, torch.Tensor]:
    """Negative ELBO per target voxel (see the module docstring) over the output's valid targets, averaged over
    blocks.

    Returns ``loss`` (to minimise), ``reconstruction`` (over valid voxels: ``"laplace"``, the mean absolute error
    of ``log(var + eps)``; ``"gaussian"``, the mean of ``(v / s - log(v / s) - 1) / 2`` with ``v``, ``s`` the
    target and predicted ``var + eps``, 0 at a perfect fit) and ``kl`` (per block, in nats), all batch means.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood {likelihood!r} is not one of {', '.join(LIKELIHOODS)}")
    valid = output.valid
    width = output.log_var.shape[1]
    target = target_log_var[:, :width].float()
    voxels_per_slice = output.log_var.shape[-2] * output.log_var.shape[-1]
    if likelihood == "laplace":
        per_voxel = (output.log_var - target).abs()
    else:
        log_ratio = target - output.log_var  # log(v / s)
        per_voxel = 0.5 * (torch.exp(log_ratio) - log_ratio - 1.0)
    error = per_voxel.mean(dim=(-2, -1)) * valid  # (B, G)
    n_slices = valid.sum(dim=1).clamp(min=1)
    reconstruction = error.sum(dim=1) / n_slices
    if output.posterior is not None:
        kl = gaussian_kl(output.posterior, output.prior)
    else:
        kl = torch.zeros_like(reconstruction)
    loss = reconstruction + beta * kl / (n_slices * voxels_per_slice)
    return {"loss": loss.mean(), "reconstruction": reconstruction.mean(), "kl": kl.mean()}


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
