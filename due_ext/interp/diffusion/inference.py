"""Diffusion interpolation of whole volumes and of datalists (the ``inference.json`` of the bundle).

Volume level: :func:`interpolate_volumes` splits every sparse annotation into blocks
(:func:`due_ext.interp.blocks.split_blocks`), crops each block around its foreground
(:mod:`.crops`), fills all gaps of all volumes in one batched run (:func:`.sampling.sample_gaps`), and pastes
the results back: ``interpolation`` = mean over the ``T`` repeats (soft mask in [0, 1]) and ``variance`` =
their per-voxel population variance. For a network with prior channels and a window larger than the crop, the
mean is the network's change to the ``sdf`` fill applied at full resolution
(:func:`.prior.refine_at_full_resolution`), so the resampling does not blur what the annotator drew. Annotated
slices are copied (variance 0); slices outside the annotated range and blocks whose two annotated slices are
both empty stay 0.

Datalist level: :class:`DiffusionInterpolation` reads a datalist, writes ``interpolation`` and ``variance``
NIfTI files per annotated item, and an updated datalist next to them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from due_ext.data import schema
from due_ext.data.annotated_items import collect_annotated_items, derive_datalist
from due_ext.data.datalist import SECTIONS
from due_ext.data.nifti import write_nifti
from due_ext.data.shards import DEFAULT_UNIT_SIZE
from due_ext.interp.blocks import split_blocks
from due_ext.interp.diffusion.crops import crop_window, extract_crop, paste_crop
from due_ext.interp.diffusion.model import SliceInterpolationUNet, noise_schedule
from due_ext.interp.diffusion.prior import (
    FULL_RESOLUTION_BASE,
    PRIOR_METHODS,
    block_fills,
    refine_at_full_resolution,
)
from due_ext.interp.diffusion.sampling import GapJob, SamplerSettings, sample_gaps

logger = logging.getLogger("due_ext.interp")

#: What to run to produce the shipped weights (quoted in the error raised when they are missing).
TRAIN_COMMAND = "python -m monai.bundle run --config_file bundles/interpolator/train.json"


def load_interpolator_weights(model: nn.Module, path: str | os.PathLike, map_location: str = "cpu") -> nn.Module:
    """Load a plain state dict (``torch.load(weights_only=True)``) into ``model``; fails loudly if missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: interpolator weights not found; train them with `{TRAIN_COMMAND}` "
                                "(or point the config's model_path at a checkpoint)")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the network definition ({err})") from err
    return model


def interpolate_volumes(model: nn.Module, annotations: Sequence[np.ndarray], annotated_slices: Sequence[Sequence[int]],
                        settings: SamplerSettings | None = None, alphas_cumprod: torch.Tensor | None = None,
                        crop_size: int | None = None, device: torch.device | str = "cpu",
                        progress: bool = False, volume_ids: Sequence[int] | None = None
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fill the gaps of sparse ``(X, Y, Z)`` annotations (slices along Z) with the diffusion model.

    All blocks of all volumes and all repeats are sampled together. ``volume_ids`` (default ``0, 1, ...``) seed
    each volume's chains, so a volume gets the same noise whichever call it is part of. Returns
    ``(interpolation, variance)`` float32 ``(X, Y, Z)`` arrays per volume.
    """
    settings = settings or SamplerSettings()
    alphas_cumprod = noise_schedule() if alphas_cumprod is None else alphas_cumprod
    crop_size = int(crop_size or getattr(model, "crop_size", 32))
    if len(annotations) != len(annotated_slices):
        raise ValueError(f"{len(annotations)} annotations but {len(annotated_slices)} annotated-slice lists")
    volume_ids = list(range(len(annotations))) if volume_ids is None else [int(i) for i in volume_ids]
    if len(volume_ids) != len(annotations):
        raise ValueError(f"{len(annotations)} annotations but {len(volume_ids)} volume ids")
    results, jobs, placements = [], [], []
    for v, (annotation, slices) in enumerate(zip(annotations, annotated_slices, strict=True)):
        annotation = np.asarray(annotation)
        if annotation.ndim != 3:
            raise ValueError(f"volume {v}: annotation must be (X, Y, Z), got shape {annotation.shape}")
        binary = (annotation > 0.5).astype(np.float32)
        blocks = split_blocks(slices, depth=binary.shape[-1])  # validates the slice indices first
        mean = np.zeros(binary.shape, np.float32)
        variance = np.zeros(binary.shape, np.float32)
        for z in set(int(z) for z in slices):
            mean[..., z] = binary[..., z]
        for block in blocks:
            lower, upper = binary[..., block.start], binary[..., block.stop]
            window = crop_window([lower, upper], crop_size)
            if window is None:  # both bounds empty: nothing to interpolate
                continue
            jobs.append(GapJob(extract_crop(lower, window, crop_size), extract_crop(upper, window, crop_size),
                               block.gap, (volume_ids[v], block.start, block.stop)))
            placements.append((v, block, window))
        results.append((mean, variance))
    samples = sample_gaps(model, alphas_cumprod, jobs, settings, device=device, progress=progress)
    refine = bool(getattr(model, "prior_channels", 0))
    for job, (v, block, window), sample in zip(jobs, placements, samples, strict=True):
        mean, variance = results[v]
        shape = mean.shape[:2]
        block_mean = paste_crop(sample.mean(dim=0), window, shape)  # (gap, X, Y)
        block_var = paste_crop(sample.var(dim=0, unbiased=False), window, shape)
        if refine and window.side != crop_size:
            annotation = (np.asarray(annotations[v]) > 0.5)
            base_full = block_fills(annotation[..., block.start], annotation[..., block.stop], block.gap,
                                    FULL_RESOLUTION_BASE)
            base_coarse = paste_crop(block_fills(job.lower, job.upper, block.gap, FULL_RESOLUTION_BASE), window, shape)
            block_mean = refine_at_full_resolution(block_mean, base_coarse, base_full)
        for i, z in enumerate(block.missing):
            mean[..., z] = np.clip(block_mean[i], 0.0, 1.0)
            variance[..., z] = np.clip(block_var[i], 0.0, None)
    return results


class DiffusionInterpolation:
    """Datalist in, ``interpolation`` and ``variance`` NIfTI per annotated item and an updated datalist out.

    Args:
        network: a :class:`~due_ext.interp.diffusion.model.SliceInterpolationUNet` (weights loaded by
            ``model_path`` unless ``None``).
        datalist: input datalist JSON.
        output_dir: where ``interpolation/``, ``variance/`` and the new datalist go.
        model_path: weights (plain state dict); a missing file raises ``FileNotFoundError``.
        sections: datalist sections to process (items without ``annotation`` are copied unchanged).
        settings: sampler settings (steps, eta, repeats, seed, max_batch, bf16).
        datalist_name: file name of the updated datalist inside ``output_dir``.
        device: torch device.
        unit_size: items derived together (:mod:`due_ext.data.shards`); results depend on it, not on the
            number of processes.
    """

    def __init__(self, network: nn.Module, datalist: str | os.PathLike, output_dir: str | os.PathLike,
                 model_path: str | os.PathLike | None, sections: Sequence[str] = SECTIONS,
                 settings: SamplerSettings | dict | None = None, datalist_name: str = "datalist.json",
                 device: str = "cpu", progress: bool = True, unit_size: int = DEFAULT_UNIT_SIZE) -> None:
        self.network = network
        if model_path is not None:
            load_interpolator_weights(network, model_path)
        self.datalist = Path(datalist)
        self.output_dir = Path(output_dir)
        self.sections = tuple(sections)
        self.settings = SamplerSettings(**settings) if isinstance(settings, dict) else (settings or SamplerSettings())
        self.datalist_name = datalist_name
        self.device = device
        self.progress = progress
        self.unit_size = int(unit_size)

    def run(self) -> Path:
        """Interpolate every annotated item; returns the path of the updated datalist.

        Under torch.distributed each process derives its share of the items (:mod:`due_ext.data.shards`) and
        the main process writes the datalist; a rerun reuses every unit already derived."""
        out_payload, todo = collect_annotated_items(self.datalist, self.sections)
        logger.info("interpolating %d annotated items with %s", len(todo), self.settings)
        self.network.to(self.device)

        def interpolate_unit(unit: range) -> list[dict[str, str]]:
            items = [todo[i] for i in unit]
            results = interpolate_volumes(self.network, [t.annotation for t in items], [t.slices for t in items],
                                          self.settings, device=self.device, volume_ids=list(unit))
            return [{key: str(write_nifti(self.output_dir / key / f"{item.name}.nii.gz", volume, item.affine)
                              .resolve()) for key, volume in ((schema.INTERPOLATION, mean), (schema.VARIANCE, var))}
                    for item, (mean, var) in zip(items, results, strict=True)]

        destination = derive_datalist(out_payload, todo, interpolate_unit, self.output_dir, self.datalist_name,
                                      self.unit_size, progress=self.progress)
        logger.info("wrote %s", destination)
        return destination


def default_network() -> SliceInterpolationUNet:
    """The shipped architecture (same arguments as ``network_def`` in the bundle's configs): since bundle version
    0.3.0 with the classical prior channels (checkpoints of 0.2.x need ``SliceInterpolationUNet()``)."""
    return SliceInterpolationUNet(prior_channels=len(PRIOR_METHODS))
