"""Uncertainty inference: one forward pass per block gives the variance of every missing slice; then the weights.

Volume level (:func:`predict_volume_variance`): split the sparse annotation into blocks
(:func:`due_ext.interp.blocks.split_blocks`), crop each block around the foreground of its two annotated
slices exactly as the interpolator does (:mod:`due_ext.interp.diffusion.crops`), predict all blocks of all
volumes in batches (:func:`predict_block_variance`), paste back (bilinear if the window was resampled). The
variance is 0 on annotated slices, outside the annotated range, outside the crop windows (the interpolator
leaves those voxels at 0 with variance 0 too) and in blocks whose two annotated slices are both empty.

Weights: :func:`due_ext.uncertainty.weights.uncertainty_weights` (the one mapping; its docstring says what
voxels outside any gap get: 1 on annotated slices and, by default, 1 outside the annotated range).

Datalist level (:class:`UncertaintyInference`): datalist in (usually the interpolator's output, so the new
datalist holds ``interpolation``, ``variance`` and ``weights`` together), ``variance`` and ``weights`` NIfTI per
annotated item, and the updated datalist out. An item's existing ``variance`` (e.g. the diffusion variance) is
replaced by the predicted one; the interpolator's own files are not touched.
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
from due_ext.engines.checkpoints import load_network_weights
from due_ext.interp.blocks import split_blocks
from due_ext.interp.diffusion.crops import crop_window, extract_crop, paste_crop
from due_ext.uncertainty.weights import uncertainty_weights

logger = logging.getLogger("due_ext.uncertainty")

#: What to run to produce the shipped weights (quoted in the error raised when they are missing).
TRAIN_COMMAND = "python -m monai.bundle run --config_file bundles/uncertainty/train.json"


def load_uncertainty_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the predictor's plain state dict (``weights_only=True``, strict); a missing file raises
    ``FileNotFoundError`` saying how to train it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: uncertainty-predictor weights not found; train them with "
                                f"`{TRAIN_COMMAND}` (or point the config's model_path at a checkpoint)")
    try:
        return load_network_weights(network, path)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit the network definition ({err})") from err


@torch.inference_mode()  # not no_grad: skips autograd's version and view tracking (~5 % of a one-block call)
def predict_block_variance(network: nn.Module, lowers: Sequence[np.ndarray], uppers: Sequence[np.ndarray],
                           gaps: Sequence[int], batch_size: int = 64, device: torch.device | str = "cpu"
                           ) -> list[np.ndarray]:
    """Predicted variance ``(gap, H, W)`` float32 per block from binary crops of its annotated slices.

    Blocks are sorted by gap and batched (at most ``batch_size`` per forward pass) so padding stays small; the
    prediction is deterministic (latent prior mean) and does not depend on the batching.
    """
    if not len(lowers) == len(uppers) == len(gaps):
        raise ValueError(f"{len(lowers)} lower, {len(uppers)} upper crops and {len(gaps)} gaps differ in number")
    if network.training:  # eval() walks every submodule: ~25 % of a one-volume call when done unconditionally
        network.eval()
    order = sorted(range(len(gaps)), key=lambda j: int(gaps[j]))
    out: list[np.ndarray | None] = [None] * len(gaps)
    for lo in range(0, len(order), max(1, int(batch_size))):
        chunk = order[lo:lo + batch_size]
        lower = torch.stack([torch.as_tensor(np.asarray(lowers[j]) > 0.5) for j in chunk])[:, None].float()
        upper = torch.stack([torch.as_tensor(np.asarray(uppers[j]) > 0.5) for j in chunk])[:, None].float()
        chunk_gaps = torch.tensor([int(gaps[j]) for j in chunk])
        variance = network.predict_variance(lower.to(device), upper.to(device), chunk_gaps).float().cpu().numpy()
        for row, j in enumerate(chunk):
            out[j] = variance[row, : int(gaps[j])]
    return out  # type: ignore[return-value]


def predict_volume_variance(network: nn.Module, annotations: Sequence[np.ndarray],
                            annotated_slices: Sequence[Sequence[int]], crop_size: int | None = None,
                            batch_size: int = 64, device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Predicted variance ``(X, Y, Z)`` float32 per sparse annotation (rules in the module docstring)."""
    crop_size = int(crop_size or getattr(network, "crop_size", 32))
    if len(annotations) != len(annotated_slices):
        raise ValueError(f"{len(annotations)} annotations but {len(annotated_slices)} annotated-slice lists")
    volumes, lowers, uppers, gaps, placements = [], [], [], [], []
    for v, (annotation, slices) in enumerate(zip(annotations, annotated_slices, strict=True)):
        annotation = np.asarray(annotation)
        if annotation.ndim != 3:
            raise ValueError(f"volume {v}: annotation must be (X, Y, Z), got shape {annotation.shape}")
        binary = annotation > 0.5
        volumes.append(np.zeros(annotation.shape, np.float32))
        for block in split_blocks(slices, depth=annotation.shape[-1]):
            lower, upper = binary[..., block.start], binary[..., block.stop]
            window = crop_window([lower, upper], crop_size)
            if window is None:
                continue
            lowers.append(extract_crop(lower, window, crop_size))
            uppers.append(extract_crop(upper, window, crop_size))
            gaps.append(block.gap)
            placements.append((v, block, window))
    predicted = predict_block_variance(network, lowers, uppers, gaps, batch_size, device)
    for (v, block, window), variance in zip(placements, predicted, strict=True):
        pasted = np.clip(paste_crop(variance, window, volumes[v].shape[:2]), 0.0, None)  # (gap, X, Y)
        volumes[v][..., block.start + 1:block.stop] = np.moveaxis(pasted, 0, -1)
    return volumes


class UncertaintyInference:
    """Datalist in, ``variance`` and ``weights`` NIfTI per annotated item and an updated datalist out.

    Args:
        network: a :class:`~due_ext.uncertainty.model.NeuralProcessUncertainty`.
        datalist: input datalist JSON (items with ``annotation`` and ``annotated_slices`` are processed, others
            copied unchanged).
        output_dir: where ``variance/``, ``weights/`` and the new datalist go.
        model_path: weights (plain state dict); ``None`` keeps the network's current weights (tests).
        sections: datalist sections to process.
        normalization, max_variance, outside: options of
            :func:`~due_ext.uncertainty.weights.uncertainty_weights` (default: the original per-block min-max).
        datalist_name: file name of the updated datalist inside ``output_dir``.
        batch_size: blocks per forward pass.
        device: torch device.
        unit_size: items derived together (:mod:`due_ext.data.shards`); results depend on it, not on the
            number of processes.
    """

    def __init__(self, network: nn.Module, datalist: str | os.PathLike, output_dir: str | os.PathLike,
                 model_path: str | os.PathLike | None, sections: Sequence[str] = SECTIONS,
                 normalization: str = "block", max_variance: float = 0.25, outside: float = 1.0,
                 datalist_name: str = "datalist.json", batch_size: int = 64, device: str | torch.device = "cpu",
                 unit_size: int = DEFAULT_UNIT_SIZE) -> None:
        self.network = network
        if model_path is not None:
            load_uncertainty_weights(network, model_path)
        self.datalist = Path(datalist)
        self.output_dir = Path(output_dir)
        self.sections = tuple(sections)
        self.weight_options = {"normalization": normalization, "max_variance": max_variance, "outside": outside}
        self.datalist_name = datalist_name
        self.batch_size = int(batch_size)
        self.device = device
        self.unit_size = int(unit_size)

    def run(self) -> Path:
        """Predict every annotated item; returns the path of the updated datalist."""
        if not self.datalist.is_file():
            raise FileNotFoundError(f"{self.datalist}: datalist not found (the uncertainty bundle reads the "
                                    "interpolator's output: run bundles/interpolator/inference.json first, or pass "
                                    "--datalist)")
        out_payload, todo = collect_annotated_items(self.datalist, self.sections)
        logger.info("predicting the uncertainty of %d annotated items", len(todo))
        self.network.to(self.device)

        def predict_unit(unit: range) -> list[dict[str, str]]:
            items = [todo[i] for i in unit]
            variances = predict_volume_variance(self.network, [t.annotation for t in items],
                                                [t.slices for t in items], batch_size=self.batch_size,
                                                device=self.device)
            entries = []
            for item, variance in zip(items, variances, strict=True):
                weights = uncertainty_weights(variance, item.slices, **self.weight_options)
                entries.append({key: str(write_nifti(self.output_dir / key / f"{item.name}.nii.gz", volume,
                                                     item.affine).resolve())
                                for key, volume in ((schema.VARIANCE, variance), (schema.WEIGHTS, weights))})
            return entries

        destination = derive_datalist(out_payload, todo, predict_unit, self.output_dir, self.datalist_name,
                                      self.unit_size)
        logger.info("wrote %s", destination)
        return destination
