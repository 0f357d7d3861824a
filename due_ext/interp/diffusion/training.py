"""Training the diffusion interpolator: slice triples from full 3D masks and the ignite pieces.

- :class:`SliceTripleDataset`: random ``(A_prev, A_target, A_next)`` triples of axial slices from full lesion
  masks (the demo datasets' ``mask`` volumes) at varied spacings: ``span`` (distance between the conditions)
  uniform in ``[min_span, max_span]``, the target at ``offset`` 1 (what autoregressive filling asks for) with
  probability ``p_first`` and uniform in ``[1, span - 1]`` otherwise. Windows may start before or end after the
  lesion, so one condition can be an empty slice: the model learns that the object ends inside the gap and
  must not be bridged. Triples with both conditions empty are redrawn (inference never asks for them).
  Augmentation: Z flip, in-plane rot90/flip, +-2 voxel crop jitter. Crops as at inference (:mod:`.crops`).
  The two conditions are the *block*'s bounds; with ``prior=True`` every item also carries the classical fills
  of the target from them (:mod:`.prior`), and with probability ``p_adjacent`` the previous condition is the
  slice just before the target instead of the lower bound (what the autoregressive sampler feeds: its own
  previous slice, with ``position = 1 / span`` counted from there). Sparse mode (``annotated_slices`` given,
  for fine-tuning on a user's own annotations): every slice of a triple is a drawn slice; the target is a
  drawn slice hidden between two others (coarser gaps than the annotator's).
- :class:`DiffusionTrainer`: MONAI ``SupervisedTrainer`` whose iteration is the denoising loss of paper Eq. 3
  (random timestep, forward noising, conditions dropped with probability ``condition_drop`` each).
- :class:`DiffusionValidator`: MONAI ``SupervisedEvaluator`` computing the same loss on fixed validation
  triples with fixed timesteps and noise (both conditions kept, as at inference), so epochs are comparable.
- :class:`SaveBestWeights`: writes the (EMA) network's plain state dict when the validation loss improves.
- :class:`LossProgressBar`: ignite's tqdm progress bar showing the running loss.
EMA of weights: ``ignite.handlers.EMAHandler`` (wired in the bundle config).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from ignite.metrics import Average
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn
from torch.utils.data import Dataset

from due_ext.data import schema
from due_ext.data.annotated_items import collect_annotated_items
from due_ext.data.atomic import atomic_destination
from due_ext.data.datalist import read_datalist
from due_ext.data.nifti import read_nifti
from due_ext.interp.diffusion.crops import crop_window, extract_crop
from due_ext.interp.diffusion.model import DEFAULT_CROP_SIZE, drop_conditions, noise_schedule, prediction_target
from due_ext.interp.diffusion.prior import classical_prior

logger = logging.getLogger("due_ext.interp")

TARGET, PREV, NEXT, POSITION, SPAN, PRIOR = "target", "prev", "next", "position", "span", "prior"


def load_masks(datalist: str | os.PathLike, sections: Sequence[str] = ("training",),
               key: str = schema.MASK) -> list[np.ndarray]:
    """Full 3D binary masks (uint8 ``(X, Y, Z)``) of the items of ``sections`` that have ``key``."""
    datalist = Path(datalist)
    payload = read_datalist(datalist)
    masks = []
    for section in sections:
        for item in payload.get(section, []):
            if key in item:
                path = Path(item[key])
                array, _ = read_nifti(path if path.is_absolute() else datalist.parent / path)
                if array.ndim != 3:
                    raise ValueError(f"{path}: a mask must be 3D (X, Y, Z), got shape {array.shape}")
                if (array > 0).any():
                    masks.append((array > 0).astype(np.uint8))
    if not masks:
        raise ValueError(f"{datalist}: no item of section(s) {', '.join(sections)} has a non-empty {key!r} volume "
                         "(the interpolator trains on full 3D lesion masks)")
    return masks


def load_sparse_annotations(datalist: str | os.PathLike, sections: Sequence[str] = ("training",)
                            ) -> tuple[list[np.ndarray], list[list[int]]]:
    """Sparse annotations and their drawn slices (``annotated_slices``, including any left empty on purpose: a
    drawn "the object ended here") of the annotated items of ``sections``, for fine-tuning on a user's own
    annotations (:class:`SliceTripleDataset` sparse mode). Items with fewer than 3 drawn slices are left out
    (nothing to hide between two)."""
    _, items = collect_annotated_items(datalist, sections)
    annotations, drawn = [], []
    for item in items:
        slices = sorted(set(item.slices))
        if len(slices) >= 3 and (item.annotation > 0).any():
            annotations.append((item.annotation > 0).astype(np.uint8))
            drawn.append(slices)
    if not annotations:
        raise ValueError(f"{datalist}: no annotated item of section(s) {', '.join(sections)} has 3 or more drawn "
                         "slices (fine-tuning hides a drawn slice between two others)")
    return annotations, drawn


class SliceTripleDataset(Dataset):
    """Random slice triples from full masks; see the module docstring.

    Args:
        masks: full binary ``(X, Y, Z)`` masks.
        length: triples per epoch.
        crop_size: network input side.
        min_span, max_span: range of the distance between the two conditions (``span - 1`` missing slices).
        p_first: probability that the target is the first missing slice (offset 1).
        augment: flips, rotations and crop jitter.
        seed: base seed; item ``i`` of epoch ``e`` is drawn from ``default_rng([seed, e, i])``.
        resample_each_epoch: draw new triples each epoch (training); ``False`` keeps them fixed (validation).
        prior: add the classical fills of the target (``prior``, :func:`.prior.classical_prior`).
        p_adjacent: probability that ``prev`` is the slice before the target (autoregressive form).
        annotated_slices: per mask, the drawn slices (sparse mode); ``None``: the masks are full.
        max_hidden: sparse mode: at most this many drawn slices are hidden between the two conditions.

    Items: ``target``, ``prev``, ``next`` float32 ``(1, crop, crop)`` in ``[-1, 1]``; ``position``
    (``offset / span``, counted from ``prev``) and ``span`` float32 scalars; ``prior`` ``(C, crop, crop)``
    in ``[-1, 1]`` when ``prior`` is set.
    """

    def __init__(self, masks: Sequence[np.ndarray], length: int = 2048, crop_size: int = DEFAULT_CROP_SIZE,
                 min_span: int = 2, max_span: int = 6, p_first: float = 0.5, augment: bool = True, seed: int = 0,
                 resample_each_epoch: bool = True, prior: bool = False, p_adjacent: float = 0.0,
                 annotated_slices: Sequence[Sequence[int]] | None = None, max_hidden: int = 2) -> None:
        if not masks:
            raise ValueError("SliceTripleDataset needs at least one mask")
        if not 2 <= min_span <= max_span:
            raise ValueError(f"need 2 <= min_span <= max_span, got {min_span}, {max_span}")
        if not 0.0 <= p_adjacent <= 1.0:
            raise ValueError(f"p_adjacent must be in [0, 1], got {p_adjacent}")
        self.masks = [np.asarray(m) > 0 for m in masks]
        self.extents = []
        for i, m in enumerate(self.masks):
            z = np.nonzero(m.reshape(-1, m.shape[-1]).any(axis=0))[0]
            if z.size == 0:
                raise ValueError(f"mask {i} is empty")
            self.extents.append((int(z[0]), int(z[-1])))
        self.drawn = None
        if annotated_slices is not None:
            if len(annotated_slices) != len(self.masks):
                raise ValueError(f"{len(self.masks)} masks but {len(annotated_slices)} annotated-slice lists")
            self.drawn = [sorted(set(int(z) for z in slices)) for slices in annotated_slices]
            if all(len(d) < 3 for d in self.drawn):
                raise ValueError("sparse triples need a mask with at least 3 drawn slices (one to hide between two)")
            if max_hidden < 1:
                raise ValueError(f"max_hidden must be >= 1, got {max_hidden}")
        self.prior = bool(prior)
        self.p_adjacent = float(p_adjacent)
        self.max_hidden = int(max_hidden)
        self.length = int(length)
        self.crop_size = int(crop_size)
        self.min_span, self.max_span = int(min_span), int(max_span)
        self.p_first = float(p_first)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.resample_each_epoch = bool(resample_each_epoch)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose triples are drawn (no effect when ``resample_each_epoch`` is False)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    @staticmethod
    def _slice(mask: np.ndarray, z: int) -> np.ndarray:
        if 0 <= z < mask.shape[-1]:
            return mask[..., z]
        return np.zeros(mask.shape[:2], dtype=bool)

    def _draw_sparse(self, rng: np.random.Generator) -> tuple[np.ndarray, int, int, int]:
        """A triple of drawn slices: (mask, lower, target, upper) Z indices, target hidden between the two."""
        usable = [m for m, d in enumerate(self.drawn) if len(d) >= 3]
        m = usable[int(rng.integers(len(usable)))]
        mask, drawn = self.masks[m], self.drawn[m]
        if self.augment and rng.random() < 0.5:
            mask = mask[..., ::-1]
            drawn = sorted(mask.shape[-1] - 1 - z for z in drawn)
        steps = int(rng.integers(2, min(self.max_hidden + 1, len(drawn) - 1) + 1))  # drawn slices lower -> upper
        i = int(rng.integers(len(drawn) - steps))
        j = i + int(rng.integers(1, steps))
        return mask, drawn[i], drawn[j], drawn[i + steps]

    def __getitem__(self, index: int) -> dict[str, Any]:
        epoch = self.epoch if self.resample_each_epoch else 0
        rng = np.random.default_rng([self.seed, epoch, int(index)])
        if self.drawn is not None:
            mask, start, target_z, stop = self._draw_sparse(rng)
            return self._item(rng, mask, start, target_z, stop, start)
        for _ in range(100):
            m = int(rng.integers(len(self.masks)))
            mask, (first, last) = self.masks[m], self.extents[m]
            if self.augment and rng.random() < 0.5:  # the reverse slice order is just as plausible
                mask = mask[..., ::-1]
                first, last = mask.shape[-1] - 1 - last, mask.shape[-1] - 1 - first
            span = int(rng.integers(self.min_span, self.max_span + 1))
            offset = 1 if rng.random() < self.p_first else int(rng.integers(1, span))
            start = int(rng.integers(first - span + 1, last + 1))  # window [start, start + span] meets the lesion
            prev, nxt = self._slice(mask, start), self._slice(mask, start + span)
            if prev.any() or nxt.any():
                break
        else:
            raise RuntimeError("could not draw a triple with a non-empty condition in 100 tries")
        adjacent = self.p_adjacent > 0 and rng.random() < self.p_adjacent
        return self._item(rng, mask, start, start + offset, start + span, start + offset - 1 if adjacent else start)

    def _item(self, rng: np.random.Generator, mask: np.ndarray, start: int, target_z: int, stop: int,
              prev_z: int) -> dict[str, Any]:
        """Crops of the block ``[start, stop]`` (window from its bounds, as at inference), its target slice and
        the ``prev`` condition at ``prev_z`` (``start``, or the slice before the target)."""
        lower, upper = self._slice(mask, start), self._slice(mask, stop)
        jitter = tuple(int(j) for j in rng.integers(-2, 3, size=2)) if self.augment else (0, 0)
        window = crop_window([lower, upper], self.crop_size, jitter=jitter)
        slices = (self._slice(mask, prev_z), self._slice(mask, target_z), upper, lower)
        crops = np.stack([extract_crop(s, window, self.crop_size) for s in slices])
        if self.augment:
            crops = np.rot90(crops, k=int(rng.integers(4)), axes=(1, 2))
            if rng.random() < 0.5:
                crops = crops[:, ::-1]
        crops = np.ascontiguousarray(crops)
        span = stop - prev_z
        item = {PREV: crops[0:1], TARGET: crops[1:2], NEXT: crops[2:3]}
        item = {k: torch.from_numpy(v * 2.0 - 1.0).float() for k, v in item.items()}
        item[POSITION] = torch.tensor((target_z - prev_z) / span, dtype=torch.float32)
        item[SPAN] = torch.tensor(float(span), dtype=torch.float32)
        if self.prior:
            gap = stop - start - 1
            item[PRIOR] = torch.from_numpy(classical_prior(crops[3], crops[2], gap)[target_z - start - 1])
        return item


def diffusion_loss(network: nn.Module, batch: dict[str, torch.Tensor], alphas_cumprod: torch.Tensor,
                   condition_drop: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Paper Eq. 3: ``|| y - f_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, m_p A_prev, m_f A_next, t) ||^2`` with
    ``y = eps`` for an epsilon network (the paper's form) and ``y = v`` for a v-prediction one (the default;
    :mod:`.model` says why). The network's ``prediction_type`` attribute decides (epsilon if it has none)."""
    x0 = batch[TARGET]
    device = x0.device
    count = x0.shape[0]
    t = torch.randint(0, len(alphas_cumprod), (count,), generator=generator).to(device)
    noise = torch.randn(x0.shape, generator=generator).to(device)
    alpha = alphas_cumprod.to(device)[t].to(x0.dtype).view(count, 1, 1, 1)
    x_t = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    prev, nxt = drop_conditions(batch[PREV], batch[NEXT], condition_drop, generator=generator)
    extra = (batch[PRIOR].to(device),) if getattr(network, "prior_channels", 0) else ()
    output = network(x_t, t, prev.to(device), nxt.to(device), batch[POSITION], batch[SPAN], *extra)
    target = prediction_target(x0, noise, alpha, getattr(network, "prediction_type", "epsilon"))
    return torch.mean((output - target) ** 2)


def _to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class DiffusionTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` with the diffusion iteration. Extra args: ``alphas_cumprod`` (default: the cosine
    1000-step schedule of :func:`~due_ext.interp.diffusion.model.noise_schedule`), ``condition_drop`` (paper
    ``p_mask`` = 0.5). ``engine.state.output`` is ``{"loss": tensor}``."""

    def __init__(self, *args: Any, alphas_cumprod: torch.Tensor | None = None, condition_drop: float = 0.5,
                 **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("loss_function", nn.MSELoss())
        super().__init__(*args, **kwargs)
        self.alphas_cumprod = noise_schedule() if alphas_cumprod is None else alphas_cumprod
        self.condition_drop = float(condition_drop)
        dataset = getattr(self.data_loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            self.add_event_handler(Events.EPOCH_STARTED, lambda engine: dataset.set_epoch(engine.state.epoch))

    def _iteration(self, engine: DiffusionTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = _to_device(batchdata, engine.state.device)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        loss = diffusion_loss(engine.network, batch, engine.alphas_cumprod, engine.condition_drop)
        engine.state.output = {"loss": loss.detach()}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite diffusion loss {loss.item()} at iteration {engine.state.iteration}")
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class DiffusionValidator(SupervisedEvaluator):
    """Validation epsilon loss on fixed triples, fixed timesteps/noise (seeded per batch), no condition drop.
    Its key metric ``val_loss`` (:func:`validation_loss_metric`) is lower-is-better."""

    def __init__(self, *args: Any, alphas_cumprod: torch.Tensor | None = None, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("key_val_metric", {"val_loss": validation_loss_metric()})
        kwargs.setdefault("metric_cmp_fn", lambda current, best: current < best)
        super().__init__(*args, **kwargs)
        self.alphas_cumprod = noise_schedule() if alphas_cumprod is None else alphas_cumprod
        self.seed = int(seed)

    def _iteration(self, engine: DiffusionValidator, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        batch = _to_device(batchdata, engine.state.device)
        step = (engine.state.iteration - 1) % max(engine.state.epoch_length or 1, 1)
        generator = torch.Generator().manual_seed(self.seed * 100003 + step)
        engine.network.eval()
        with torch.no_grad():
            loss = diffusion_loss(engine.network, batch, engine.alphas_cumprod, 0.0, generator=generator)
        engine.state.output = {"loss": loss}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        return engine.state.output


def validation_loss_metric() -> Average:
    """Mean of the per-batch validation losses (ignite ``Average`` over ``output["loss"]``)."""
    return Average(output_transform=lambda output: output["loss"])


def save_state_dict(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` (float32 tensors only) to ``path`` atomically."""
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    with atomic_destination(path, suffix=".tmp.pt") as tmp:
        torch.save(state, tmp)
    return Path(path)


class SaveBestWeights:
    """Attach to the validator: saves ``model``'s state dict to ``path`` whenever ``metric`` (lower is better)
    reaches a new minimum. ``model`` is usually the EMA copy (``EMAHandler.ema_model``)."""

    def __init__(self, model: nn.Module, path: str | os.PathLike, metric: str = "val_loss") -> None:
        self.model = model
        self.path = Path(path)
        self.metric = metric
        self.best = float("inf")

    def attach(self, engine: SupervisedEvaluator) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: SupervisedEvaluator) -> None:
        value = float(engine.state.metrics[self.metric])
        if value < self.best:
            self.best = value
            save_state_dict(self.model, self.path)
            logger.info("validation %s %.5f: saved %s", self.metric, value, self.path)


class LossProgressBar:
    """ignite's tqdm progress bar over iterations, showing the loss; ``attach(engine)`` like MONAI handlers."""

    def __init__(self, persist: bool = False) -> None:
        from ignite.handlers import ProgressBar

        self.bar = ProgressBar(persist=persist)

    def attach(self, engine: SupervisedTrainer) -> None:
        self.bar.attach(engine, output_transform=lambda output: {"loss": float(output["loss"])})
