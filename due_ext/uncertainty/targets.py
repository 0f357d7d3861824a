"""Training targets of the uncertainty predictor: diffusion variance maps of blocks, computed once and cached.

A *target block* holds what the neural process sees and must predict (paper Figure 2, dashed line): the two
annotated slices (binary crops, positions 0 and 1), the gap length, and per missing slice the per-voxel
population variance over ``T`` diffusion samples (the interpolator's batched sampler,
:func:`due_ext.interp.diffusion.sampling.sample_gaps`); also the diffusion mean and, when a full 3D mask is
known, the true slices (evaluation). Crops are the interpolator's lesion-centred windows
(:mod:`due_ext.interp.diffusion.crops`), so the predictor sees exactly the interpolator's inputs.
What the predictor learns from a cached block is chosen by :class:`VarianceTargetDataset` (``target``): the
diffusion variance, or the expected squared error of a diffusion sample against the true slices (variance plus
squared bias), which also marks where the sampler is confidently wrong.

Blocks come from a datalist:

- items with a full ``mask``: for every ``k`` in ``every_k`` and every phase ``p < k``, annotate slices
  ``first, first + p, first + p + k, ...`` and ``last`` (first and last lesion slices always; slices without
  foreground skipped, as :func:`due_ext.data.builders.sparse.sparse_slices`), and take their blocks. Phases give
  different blocks from the same lesion, so a few volumes yield hundreds of blocks.
- items with only ``annotation`` and ``annotated_slices``: their blocks as drawn (no truth).
- extra full masks passed in (procedural shapes in ``train.json``): like items with a ``mask``.

Blocks whose two annotated slices are both empty are skipped (the interpolator leaves them empty, variance 0).
The cache is one ``.npz`` written atomically (temporary name, then rename) with a JSON ``meta`` entry; it is
reused only if its ``meta`` (datalist, sections, ``every_k``, sampler settings, crop size, SHA-256 of the
interpolator weights) matches the request, otherwise recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from due_ext.data import schema
from due_ext.data.atomic import atomic_destination
from due_ext.data.axes import foreground_slices
from due_ext.data.datalist import read_datalist
from due_ext.data.nifti import read_nifti
from due_ext.interp.blocks import split_blocks
from due_ext.interp.diffusion.crops import crop_window, extract_crop
from due_ext.interp.diffusion.model import noise_schedule
from due_ext.interp.diffusion.sampling import GapJob, SamplerSettings, sample_gaps
from due_ext.uncertainty.model import DEFAULT_CROP_SIZE, DEFAULT_EPS, log_variance_target

logger = logging.getLogger("due_ext.uncertainty")

LOWER, UPPER, GAP, VARIANCE, LOG_VARIANCE, TRUTH = "lower", "upper", "gap", "variance", "log_variance", "truth"
ERROR, HAS_TRUTH = "error", "has_truth"
#: What the predictor learns (:class:`VarianceTargetDataset`).
TARGETS = ("variance", "squared_error")
CACHE_FORMAT = 1


def phased_sparse_slices(mask: np.ndarray, every_k: int, phase: int = 0) -> list[int]:
    """Annotated Z slices of a full ``(X, Y, Z)`` mask: every ``every_k``-th lesion slice starting ``phase``
    slices after the first, plus the first and last lesion slices; slices without foreground are skipped.
    ``phase = 0`` equals :func:`due_ext.data.builders.sparse.sparse_slices`."""
    if every_k < 1 or not 0 <= phase < every_k:
        raise ValueError(f"need every_k >= 1 and 0 <= phase < every_k, got every_k={every_k}, phase={phase}")
    occupied = foreground_slices(mask)
    if not occupied:
        raise ValueError("the mask has no foreground, so no slice can be annotated")
    first, last = occupied[0], occupied[-1]
    candidates = {first, last} | set(range(first + phase, last + 1, every_k))
    return sorted(z for z in candidates if z in set(occupied))


@dataclass
class VarianceTargets:
    """Cached target blocks (``N`` blocks, gaps padded to ``G``, crops ``H x W``).

    Attributes:
        lower, upper: ``(N, H, W)`` uint8 binary crops of the annotated slices.
        gaps: ``(N,)`` int missing slices per block.
        variance: ``(N, G, H, W)`` float32 diffusion variance (0 where padded).
        mean: ``(N, G, H, W)`` float32 diffusion mean (the interpolation).
        truth: ``(N, G, H, W)`` uint8 true slices (0 where unknown); ``has_truth`` ``(N,)`` bool.
        source: ``(N, 5)`` int: section index, item index, block start, block stop, ``k`` (0 = as drawn).
        meta: what produced them (see the module docstring).
    """

    lower: np.ndarray
    upper: np.ndarray
    gaps: np.ndarray
    variance: np.ndarray
    mean: np.ndarray
    truth: np.ndarray
    has_truth: np.ndarray
    source: np.ndarray
    meta: dict[str, Any]

    def __len__(self) -> int:
        return int(self.gaps.shape[0])

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (``.npz``, compressed) atomically."""
        arrays = {k: v for k, v in asdict(self).items() if k != "meta"}
        with atomic_destination(path, suffix=".tmp.npz") as tmp:
            np.savez_compressed(tmp, meta=np.array(json.dumps(self.meta, sort_keys=True)), **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VarianceTargets:
        """Read a cache written by :meth:`save`; raises ``ValueError`` naming the file if it is not one."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: variance-target cache not found")
        try:
            with np.load(path, allow_pickle=False) as data:
                fields = {k: data[k] for k in data.files}
            meta = json.loads(str(fields.pop("meta")))
            targets = cls(meta=meta, **fields)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a variance-target cache ({err}); delete it to rebuild") from err
        if meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{path}: cache format {meta.get('format')} is not {CACHE_FORMAT}; delete it to rebuild")
        return targets


def file_sha256(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file (``None`` for ``None``)."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_item_volume(datalist: Path, item: dict[str, Any], key: str) -> np.ndarray:
    path = Path(item[key])
    path = path if path.is_absolute() else datalist.parent / path
    array, _ = read_nifti(path)
    if array.ndim != 3:
        raise ValueError(f"{path}: {key} must be a 3D (X, Y, Z) volume, got shape {array.shape}")
    return (array > 0.5).astype(np.uint8)


def collect_blocks(datalist: str | os.PathLike, sections: Sequence[str] = ("training",),
                   every_k: Sequence[int] = (2, 3, 4, 5), crop_size: int = DEFAULT_CROP_SIZE,
                   masks: Sequence[np.ndarray] = ()) -> list[dict[str, Any]]:
    """Blocks of the datalist's items (rules in the module docstring), then of the extra full ``masks`` (e.g.
    procedural shapes, :func:`due_ext.interp.diffusion.shapes.generate_shapes`; their ``source`` section index is
    ``len(sections)``), as dicts with ``lower``, ``upper`` (crops), ``gap``, ``truth`` (``(gap, H, W)`` crops or
    ``None``) and ``source``."""
    datalist = Path(datalist)
    payload = read_datalist(datalist)
    blocks: list[dict[str, Any]] = []
    for s, section in enumerate(sections):
        for i, item in enumerate(payload.get(section, [])):
            if schema.MASK in item:
                mask = _read_item_volume(datalist, item, schema.MASK)
                blocks += _full_mask_blocks(mask, every_k, crop_size, (s, i))
            elif schema.ANNOTATION in item and schema.ANNOTATED_SLICES in item:
                sparse = _read_item_volume(datalist, item, schema.ANNOTATION)
                annotations = [(0, [int(z) for z in item[schema.ANNOTATED_SLICES]])]
                blocks += _blocks(sparse, None, annotations, crop_size, (s, i))
    for i, mask in enumerate(masks):
        blocks += _full_mask_blocks((np.asarray(mask) > 0.5).astype(np.uint8), every_k, crop_size, (len(sections), i))
    return blocks


def _full_mask_blocks(mask: np.ndarray, every_k: Sequence[int], crop_size: int, source: tuple[int, int]
                      ) -> list[dict[str, Any]]:
    if not mask.any():
        return []
    annotations = [(k, phased_sparse_slices(mask, k, p)) for k in every_k for p in range(int(k))]
    return _blocks(mask, mask, annotations, crop_size, source)


def _blocks(sparse: np.ndarray, full: np.ndarray | None, annotations: Sequence[tuple[int, list[int]]],
            crop_size: int, source: tuple[int, int]) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    seen: set[tuple[int, int]] = set()
    for k, slices in annotations:
        for block in split_blocks(slices, depth=sparse.shape[-1]):
            if (block.start, block.stop) in seen:  # phases of different k can repeat a block
                continue
            seen.add((block.start, block.stop))
            lower, upper = sparse[..., block.start], sparse[..., block.stop]
            window = crop_window([lower, upper], crop_size)
            if window is None:
                continue
            truth = None if full is None else np.stack(
                [extract_crop(full[..., z], window, crop_size) for z in block.missing])
            blocks.append({LOWER: extract_crop(lower, window, crop_size),
                           UPPER: extract_crop(upper, window, crop_size), GAP: block.gap, TRUTH: truth,
                           "source": (*source, block.start, block.stop, int(k))})
    return blocks


def compute_variance_targets(interpolator: nn.Module, blocks: Sequence[dict[str, Any]],
                             settings: SamplerSettings | None = None, alphas_cumprod: torch.Tensor | None = None,
                             device: torch.device | str = "cpu", meta: dict[str, Any] | None = None,
                             progress: bool = False) -> VarianceTargets:
    """Sample every block ``settings.repeats`` times in one batched run; variance and mean over the repeats."""
    if not blocks:
        raise ValueError("no blocks to compute variance targets for (no item with a non-empty mask or annotation)")
    settings = settings or SamplerSettings()
    alphas_cumprod = noise_schedule() if alphas_cumprod is None else alphas_cumprod
    jobs = [GapJob(b[LOWER], b[UPPER], int(b[GAP]), tuple(int(x) for x in b["source"])) for b in blocks]
    samples = sample_gaps(interpolator, alphas_cumprod, jobs, settings, device=device, progress=progress)
    n, width = len(blocks), max(int(b[GAP]) for b in blocks)
    shape = np.shape(blocks[0][LOWER])
    variance = np.zeros((n, width, *shape), np.float32)
    mean = np.zeros((n, width, *shape), np.float32)
    truth = np.zeros((n, width, *shape), np.uint8)
    for j, (block, sample) in enumerate(zip(blocks, samples, strict=True)):
        gap = int(block[GAP])
        variance[j, :gap] = sample.var(dim=0, unbiased=False).numpy()
        mean[j, :gap] = sample.mean(dim=0).numpy()
        if block[TRUTH] is not None:
            truth[j, :gap] = block[TRUTH] > 0.5
    return VarianceTargets(
        lower=np.stack([b[LOWER] for b in blocks]).astype(np.uint8),
        upper=np.stack([b[UPPER] for b in blocks]).astype(np.uint8),
        gaps=np.array([int(b[GAP]) for b in blocks], np.int64), variance=variance, mean=mean, truth=truth,
        has_truth=np.array([b[TRUTH] is not None for b in blocks]),
        source=np.array([b["source"] for b in blocks], np.int64).reshape(n, 5),
        meta={"format": CACHE_FORMAT, **(meta or {}), "settings": asdict(settings)})


def cached_variance_targets(cache: str | os.PathLike, interpolator: nn.Module, datalist: str | os.PathLike,
                            sections: Sequence[str] = ("training",), every_k: Sequence[int] = (2, 3, 4, 5),
                            settings: SamplerSettings | dict | None = None,
                            interpolator_weights: str | os.PathLike | None = None, crop_size: int | None = None,
                            device: torch.device | str = "cpu", progress: bool = True,
                            masks: Sequence[np.ndarray] = ()) -> VarianceTargets:
    """Load the targets from ``cache`` if it was built from the same inputs, else compute and save them.

    ``interpolator`` must already hold its weights; ``interpolator_weights`` (their file) only enters the
    cache key, so new weights rebuild the cache.
    """
    settings = SamplerSettings(**settings) if isinstance(settings, dict) else (settings or SamplerSettings())
    crop_size = int(crop_size or getattr(interpolator, "crop_size", DEFAULT_CROP_SIZE))
    meta = {"format": CACHE_FORMAT, "datalist": str(Path(datalist).resolve()), "sections": list(sections),
            "every_k": [int(k) for k in every_k], "crop_size": crop_size,
            "interpolator_sha256": file_sha256(interpolator_weights), "settings": asdict(settings)}
    if len(masks):
        digest = hashlib.sha256()
        for mask in masks:
            digest.update(repr(np.shape(mask)).encode())
            digest.update(np.ascontiguousarray(np.asarray(mask) > 0.5).tobytes())
        meta["extra_masks"] = {"count": len(masks), "sha256": digest.hexdigest()}
    cache = Path(cache)
    if cache.is_file():
        try:
            found = VarianceTargets.load(cache)
            if found.meta == meta:
                logger.info("variance targets: reusing %s (%d blocks)", cache, len(found))
                return found
            logger.info("variance targets: %s was built from other inputs; recomputing", cache)
        except ValueError as err:
            logger.warning("%s; recomputing", err)
    blocks = collect_blocks(datalist, sections, every_k, crop_size, masks)
    logger.info("variance targets: sampling %d blocks x %d repeats (%d steps)", len(blocks), settings.repeats,
                settings.steps)
    targets = compute_variance_targets(interpolator, blocks, settings, device=device, meta=meta, progress=progress)
    targets.save(cache)
    logger.info("variance targets: wrote %s", cache)
    return targets


class VarianceTargetDataset(Dataset):
    """Torch dataset over cached target blocks: dicts of ``lower``/``upper`` ``(1, H, W)`` float, ``gap`` (int),
    ``variance`` ``(G, H, W)`` (what the predictor learns, see ``target``), ``log_variance`` (``log(variance +
    eps)``, padded slices hold ``log(eps)``), ``error`` ``(G, H, W)`` (1 where the diffusion mean, binarised at
    0.5, differs from the true slice; 0 without truth) and ``has_truth`` (bool).

    Args:
        targets: the cache.
        indices: which blocks (default all).
        target: ``"variance"``: the diffusion variance over the ``T`` samples; ``"squared_error"``: the expected
            squared error of one diffusion sample ``x`` against the true slice ``y``,
            ``E[(x - y)^2] = var + (mean - y)^2`` (variance plus squared bias, in [0, 1]): the spread the
            predictor should report where the fill is wrong, not only where the sampler hesitates. Blocks
            without truth (drawn annotations) fall back to the variance.
        augment: random in-plane flips and 90-degree rotations, the same for all slices of a block (the
            variance of a rotated block is the rotated variance; the slice order is kept because the
            autoregressive sampler is not symmetric in Z).
        seed: item ``i`` of epoch ``e`` draws its augmentation from ``default_rng([seed, e, i])``.
        eps: floor of the log-variance target (the model's ``eps``).
    """

    def __init__(self, targets: VarianceTargets, indices: Sequence[int] | None = None, augment: bool = False,
                 seed: int = 0, eps: float = DEFAULT_EPS, target: str = "variance") -> None:
        if target not in TARGETS:
            raise ValueError(f"target {target!r} is not one of {', '.join(TARGETS)}")
        self.target = target
        self.targets = targets
        self.indices = list(range(len(targets))) if indices is None else [int(i) for i in indices]
        self.augment, self.seed, self.eps, self.epoch = augment, int(seed), float(eps), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (called by the trainer at each epoch start)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        j = self.indices[index]
        t = self.targets
        has_truth = bool(t.has_truth[j])
        truth = t.truth[j].astype(np.float32)
        learned = t.variance[j]
        if self.target == "squared_error" and has_truth:
            learned = np.maximum(t.variance[j], 0.0) + np.square(t.mean[j] - truth)  # padded slices: 0 + 0
        error = (((t.mean[j] > 0.5) != (truth > 0.5)) & has_truth).astype(np.float32)
        arrays = [t.lower[j][None].astype(np.float32), t.upper[j][None].astype(np.float32), learned, error]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            turns, flip = int(rng.integers(4)), bool(rng.integers(2))
            arrays = [np.rot90(a, turns, axes=(-2, -1)) for a in arrays]
            if flip:
                arrays = [a[..., ::-1] for a in arrays]
        lower, upper, variance, error = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        return {LOWER: lower, UPPER: upper, GAP: int(t.gaps[j]), VARIANCE: variance,
                LOG_VARIANCE: log_variance_target(variance, self.eps), ERROR: error, HAS_TRUTH: has_truth}
