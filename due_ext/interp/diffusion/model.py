"""The conditional denoiser of the diffusion interpolator (DUE paper Eq. 3, MCVD-style conditioning).

Input to the network, channel-concatenated: ``[x_t, m_p * A_prev, m_f * A_next]``, all 2D mask crops scaled to
``[-1, 1]`` (``-1`` = background, ``+1`` = lesion). A dropped condition (``m = 0``) is therefore all zeros,
which differs from an *empty* slice (all ``-1``): the network can tell "unknown" from "the object has ended".

Gap conditioning (ours; MCVD has no notion of a variable gap): the target's relative position between its two
conditions ``position = offset / span`` (in ``(0, 1)``) and the distance between the conditions ``span`` (in
slices, ``>= 2``; the gap holds ``span - 1`` missing slices). Both go through a small MLP (features
``position``, ``1 / span``, ``log span``) whose output is *added to the timestep embedding*, the way MONAI's
``DiffusionModelUNet`` adds a class embedding: we install our MLP in the slot of its ``class_embedding``.
Output parameterisation (``prediction_type``): ``"v_prediction"`` (default; Salimans & Ho 2022,
``v = sqrt(a) eps - sqrt(1 - a) x0``) or ``"epsilon"`` (the noise, as in DDPM/MCVD). Whatever the network
predicts, the sampler turns it into ``eps`` (:func:`epsilon_from_output`) for the DDIM update. Why ``v``: with
epsilon prediction the MSE weighs the error of the implied clean slice by the signal-to-noise ratio ``a / (1 - a)``,
about 1e-3 at the noise levels (``t`` > 930 of 1000) where a 24x24 binary mask is decided; there the conditions
are all the network has, and an epsilon model trained on the uniform-``t`` loss learned to ignore them (it drew
an object of 38 voxels where the truth had 11, next to an empty annotated slice; measured on validation triples).
The ``v`` loss weighs the clean-slice error by ``1 + SNR`` >= 1 at every noise level.

Classical prior (optional, ``prior_channels > 0``): extra input channels holding classical fills of the target
slice from the block's two annotated slices (:mod:`.prior`), in ``[-1, 1]`` like the other channels. The
heuristic is then the network's starting point and the network learns the correction; ``prior_channels = 0`` is
the original three-channel network (the older checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDPMScheduler
from torch import nn

#: Side of the square lesion-centred crops the network sees (see :mod:`.crops`).
DEFAULT_CROP_SIZE = 24
#: Number of diffusion steps the network is trained with.
DEFAULT_TRAIN_TIMESTEPS = 1000
#: Beta schedule of the forward process; cosine keeps small binary images informative at mid steps.
DEFAULT_SCHEDULE = "cosine"
#: What the network outputs (MONAI's ``prediction_type`` names).
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEFAULT_PREDICTION_TYPE = "v_prediction"


class GapEmbedding(nn.Module):
    """Embeds ``(position, span)`` pairs ``(B, 2)`` into the UNet's timestep-embedding space ``(B, dim)``."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, gap: torch.Tensor) -> torch.Tensor:
        if gap.dim() != 2 or gap.shape[-1] != 2:
            raise ValueError(f"GapEmbedding expects (B, 2) = (position, span) pairs, got shape {tuple(gap.shape)}")
        gap = gap.float()
        position, span = gap[:, 0], gap[:, 1].clamp(min=1.0)
        features = torch.stack([position, 1.0 / span, torch.log(span)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class SliceInterpolationUNet(nn.Module):
    """Predicts the noise of a target slice from its noisy version and the two conditioning slices.

    Args:
        channels: feature channels per UNet level (MONAI ``DiffusionModelUNet``); a few hundred thousand to a
            few million parameters is the CPU-friendly range.
        num_res_blocks: residual blocks per level.
        norm_num_groups: group-norm groups (must divide every entry of ``channels``).
        num_head_channels: channels per attention head of the middle block.
        crop_size: side of the square crops (documentation and a shape check; the UNet itself is size-free
            as long as the size is divisible by ``2 ** (len(channels) - 1)``).
        prediction_type: ``"v_prediction"`` or ``"epsilon"``: what :meth:`forward` returns (see the module
            docstring); it must match the weights, which were trained for one of them.
        prior_channels: number of classical-fill channels (:func:`.prior.classical_prior`); 0 for none. Part
            of the architecture: it must match the weights.

    Call ``model(x_t, timesteps, prev, next, position, span, prior)`` with ``x_t``, ``prev``, ``next`` of shape
    ``(B, 1, H, W)`` in ``[-1, 1]`` (conditions already multiplied by their masks), ``timesteps`` ``(B,)``
    integers, ``position`` and ``span`` ``(B,)`` floats, and ``prior`` ``(B, prior_channels, H, W)`` (only when
    ``prior_channels > 0``); returns the prediction ``(B, 1, H, W)`` (``v`` or the noise, per
    ``prediction_type``).
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64), num_res_blocks: int = 1, norm_num_groups: int = 8,
                 num_head_channels: int = 16, crop_size: int = DEFAULT_CROP_SIZE,
                 prediction_type: str = DEFAULT_PREDICTION_TYPE, prior_channels: int = 0) -> None:
        super().__init__()
        if prior_channels < 0:
            raise ValueError(f"prior_channels must be >= 0, got {prior_channels}")
        self.prior_channels = int(prior_channels)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        self.prediction_type = prediction_type
        channels = tuple(int(c) for c in channels)
        if crop_size % (2 ** (len(channels) - 1)):
            raise ValueError(f"crop_size {crop_size} must be divisible by 2**{len(channels) - 1} for a UNet with "
                             f"{len(channels)} levels")
        self.crop_size = int(crop_size)
        self.unet = DiffusionModelUNet(
            spatial_dims=2, in_channels=3 + self.prior_channels, out_channels=1, channels=channels,
            attention_levels=(False,) * len(channels), num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups, num_head_channels=num_head_channels, num_class_embeds=1)
        # MONAI adds class_embedding(class_labels) to the timestep embedding; our continuous gap embedding
        # takes that slot, so the gap conditions every residual block exactly as the timestep does.
        self.unet.class_embedding = GapEmbedding(self.unet.time_embed[-1].out_features)

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor, prev: torch.Tensor, next: torch.Tensor,
                position: torch.Tensor, span: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        if not (x_t.shape == prev.shape == next.shape) or x_t.dim() != 4 or x_t.shape[1] != 1:
            raise ValueError(f"x_t, prev and next must all be (B, 1, H, W); got {tuple(x_t.shape)}, "
                             f"{tuple(prev.shape)}, {tuple(next.shape)}")
        batch = x_t.shape[0]
        if position.shape != (batch,) or span.shape != (batch,) or timesteps.shape != (batch,):
            raise ValueError(f"timesteps, position and span must be ({batch},); got {tuple(timesteps.shape)}, "
                             f"{tuple(position.shape)}, {tuple(span.shape)}")
        inputs = [x_t, prev, next]
        if self.prior_channels:
            if prior is None or prior.shape != (batch, self.prior_channels, *x_t.shape[2:]):
                raise ValueError(f"prior must be ({batch}, {self.prior_channels}, {x_t.shape[2]}, {x_t.shape[3]}) for "
                                 f"a network with {self.prior_channels} prior channels; got "
                                 f"{None if prior is None else tuple(prior.shape)}")
            inputs.append(prior.to(x_t.dtype))
        elif prior is not None:
            raise ValueError("this network has no prior channels (prior_channels=0) but a prior was given")
        gap = torch.stack([position.float(), span.float()], dim=-1)
        return self.unet(torch.cat(inputs, dim=1), timesteps, class_labels=gap)


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor | float,
                      prediction_type: str) -> torch.Tensor:
    """What a network of ``prediction_type`` must output for ``x_t = sqrt(a) x0 + sqrt(1 - a) noise``:
    ``noise`` (epsilon) or ``v = sqrt(a) noise - sqrt(1 - a) x0``. ``alpha`` broadcasts against ``x0``."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        alpha = torch.as_tensor(alpha, dtype=x0.dtype, device=x0.device)
        return alpha.sqrt() * noise - (1 - alpha).sqrt() * x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def epsilon_from_output(output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor | float,
                        prediction_type: str) -> torch.Tensor:
    """The noise implied by a network ``output`` at ``x_t``: the output itself (epsilon) or, from ``v``,
    ``sqrt(1 - a) x_t + sqrt(a) v``. Inverse of :func:`prediction_target` given ``x_t``."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        alpha = torch.as_tensor(alpha, dtype=x_t.dtype, device=x_t.device)
        return (1 - alpha).sqrt() * x_t + alpha.sqrt() * output
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def drop_conditions(prev: torch.Tensor, next: torch.Tensor, p_drop: float = 0.5,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Eq. 3: multiply each condition by an independent whole-slice mask ``m ~ Bernoulli(1 - p_drop)``.

    ``p_drop = 0.5`` is the paper's ``p_mask``. Returns the masked ``(prev, next)``; a dropped condition is all
    zeros (the middle of the ``[-1, 1]`` mask range, distinct from an empty slice).
    """
    if not 0.0 <= p_drop <= 1.0:
        raise ValueError(f"p_drop must be in [0, 1], got {p_drop}")
    shape = (prev.shape[0],) + (1,) * (prev.dim() - 1)
    keep_prev = (torch.rand(shape, generator=generator, device=prev.device) >= p_drop).to(prev.dtype)
    keep_next = (torch.rand(shape, generator=generator, device=next.device) >= p_drop).to(next.dtype)
    return prev * keep_prev, next * keep_next


def noise_schedule(num_train_timesteps: int = DEFAULT_TRAIN_TIMESTEPS, schedule: str = DEFAULT_SCHEDULE,
                   **kwargs) -> torch.Tensor:
    """Cumulative alphas ``(T,)`` float64 of MONAI's ``DDPMScheduler`` (the forward process of training)."""
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, schedule=schedule, **kwargs)
    return scheduler.alphas_cumprod.to(torch.float64)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
