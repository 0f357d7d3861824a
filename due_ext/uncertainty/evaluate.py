"""Does the predicted variance match the diffusion variance, and does either point at the interpolation's errors?

For every full 3D mask and every ``k`` (slices along ``axis``): keep every k-th slice between the first and the
last foreground slice, both always kept (:func:`due_ext.data.builders.sparse.sparse_slices`, the same rule and
``--axis`` as ``python -m due_ext interp evaluate``), split into blocks and crop each block around its two kept
slices exactly as the interpolator does (:mod:`due_ext.interp.diffusion.crops`). On those crops (the voxels both
models see; all scores on the same voxels of the missing slices):

- the diffusion interpolator fills every block ``repeats`` times in one batched run: ``interpolation`` = mean,
  ``diffusion variance`` = population variance;
- the neural process predicts its variance in one pass (``np variance``);
- the cheap baselines (:mod:`due_ext.metrics.uncertainty`), which need no training: ``edge proximity`` of the
  diffusion interpolation (binarised at 0.5, slice distance to the nearer kept slice), ``edge proximity (SDF)``,
  the same heuristic on the classical SDF fill of the block (it needs no diffusion sampling at all), and the
  ``classical disagreement`` of the nearest, linear and SDF interpolations of the block.

Reported per ``k`` and over all ``k`` (``"all"``): Spearman between np and diffusion variance pooled over all
voxels (``spearman``) and its mean over blocks (``spearman_block_mean``, blocks with a constant map skipped);
AUROC of each score for "the interpolation is wrong here" (diffusion mean > 0.5 differs from the true mask,
:func:`due_ext.metrics.prediction.roc_auc`); ``np_margin``: the NP's AUROC minus the best AUROC of the other
(cheap) scores, the diffusion variance included; the error rate and the counts.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from due_ext.data.builders.sparse import sparse_slices
from due_ext.data.datalist import write_json_atomic
from due_ext.interp.blocks import split_blocks
from due_ext.interp.classical import interpolate_gaps
from due_ext.interp.diffusion.crops import crop_window, extract_crop
from due_ext.interp.diffusion.model import noise_schedule
from due_ext.interp.diffusion.sampling import GapJob, SamplerSettings, sample_gaps
from due_ext.metrics.prediction import roc_auc
from due_ext.metrics.uncertainty import classical_disagreement, edge_proximity, spearman
from due_ext.uncertainty.inference import predict_block_variance

SCORES = ("np_variance", "diffusion_variance", "edge_proximity", "edge_proximity_sdf", "classical_disagreement")
#: Column titles of the markdown table, one per score.
SCORE_TITLES = {"np_variance": "NP var", "diffusion_variance": "diffusion var", "edge_proximity": "edge proximity",
                "edge_proximity_sdf": "edge proximity (SDF)", "classical_disagreement": "classical disagreement"}


def network_from_bundle(config_file: str | os.PathLike, weights: str | os.PathLike | None = None) -> nn.Module:
    """Instantiate a bundle's ``network_def`` (from its config) and load ``weights`` (plain state dict, strict,
    loud when missing); ``None`` leaves the network as initialised."""
    from monai.bundle import ConfigParser

    from due_ext.engines.checkpoints import load_network_weights

    parser = ConfigParser()
    parser.read_config(str(config_file))
    network = parser.get_parsed_content("network_def", instantiate=True)
    if weights is not None:
        load_network_weights(network, weights)
    return network.eval()


def evaluation_blocks(masks: Sequence[tuple[str, np.ndarray]], k: int, crop_size: int, axis: int = 2
                      ) -> list[dict[str, Any]]:
    """Cropped blocks of the masks sparsified at ``k``: ``lower``, ``upper`` ``(H, W)``, ``truth`` ``(gap, H, W)``,
    ``gap``, ``name``, ``start``, ``stop``."""
    blocks = []
    for name, mask in masks:
        volume = np.moveaxis(np.asarray(mask) > 0.5, axis, -1)
        for block in split_blocks(sparse_slices(volume, k), depth=volume.shape[-1]):
            lower, upper = volume[..., block.start], volume[..., block.stop]
            window = crop_window([lower, upper], crop_size)
            if window is None:
                continue
            blocks.append({"lower": extract_crop(lower, window, crop_size),
                           "upper": extract_crop(upper, window, crop_size),
                           "truth": np.stack([extract_crop(volume[..., z], window, crop_size) for z in block.missing]),
                           "gap": block.gap, "name": name, "start": block.start, "stop": block.stop})
    return blocks


def block_scores(block: dict[str, Any], diffusion_mean: np.ndarray, diffusion_variance: np.ndarray,
                 np_variance: np.ndarray) -> dict[str, np.ndarray]:
    """Per-voxel ``(gap, H, W)`` arrays of one block: the uncertainty scores (:data:`SCORES`) and ``error``."""
    gap = int(block["gap"])
    stack = np.concatenate([block["lower"][..., None], np.zeros((*block["lower"].shape, gap), np.float32),
                            block["upper"][..., None]], axis=-1)
    nearest, linear, sdf = [np.moveaxis(interpolate_gaps(stack, [0, gap + 1], m)[..., 1:-1], -1, 0)
                             for m in ("nearest", "linear", "sdf")]
    distance = np.minimum(np.arange(1, gap + 1), gap + 1 - np.arange(1, gap + 1))
    union = (block["lower"] > 0.5) | (block["upper"] > 0.5)
    return {"np_variance": np_variance, "diffusion_variance": diffusion_variance,
            "edge_proximity": edge_proximity(diffusion_mean, distance, fallback=union),
            "edge_proximity_sdf": edge_proximity(sdf, distance, fallback=union),
            "classical_disagreement": classical_disagreement(nearest, linear, sdf),
            "error": ((diffusion_mean > 0.5) != (block["truth"] > 0.5))}


def summarise(per_block: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Spearman (pooled and per-block mean), AUROC of each score for the errors, error rate, counts."""
    if not per_block:
        return {"n_blocks": 0, "n_voxels": 0}
    pooled = {key: np.concatenate([b[key].ravel() for b in per_block]) for key in (*SCORES, "error")}
    per_block_rho = [spearman(b["np_variance"], b["diffusion_variance"]) for b in per_block
                     if b["np_variance"].size > 1]
    finite = [r for r in per_block_rho if np.isfinite(r)]
    error = pooled["error"].astype(np.float64)
    auroc = {key: roc_auc(error, pooled[key]) for key in SCORES}
    return {"n_blocks": len(per_block), "n_voxels": int(error.size), "error_rate": float(error.mean()),
            "spearman": spearman(pooled["np_variance"], pooled["diffusion_variance"]),
            "spearman_block_mean": float(np.mean(finite)) if finite else float("nan"),
            "n_blocks_spearman": len(finite), "auroc": auroc,
            "np_margin": auroc["np_variance"] - max(v for k, v in auroc.items() if k != "np_variance")}


def evaluate_uncertainty(masks: Sequence[tuple[str, np.ndarray]], predictor: nn.Module, interpolator: nn.Module,
                         every_k: Sequence[int] = (2, 3, 4), axis: int = 2, settings: SamplerSettings | None = None,
                         crop_size: int | None = None, device: str | torch.device = "cpu",
                         progress: bool = False) -> dict[str, Any]:
    """The evaluation of the module docstring on ``(name, mask)`` pairs; returns a JSON-ready dict."""
    if any(int(k) < 2 for k in every_k):
        raise ValueError(f"every_k values must be >= 2 (k = 1 removes nothing), got {list(every_k)}")
    settings = settings or SamplerSettings()
    crop_size = int(crop_size or getattr(interpolator, "crop_size", 32))
    predictor_crop = getattr(predictor, "crop_size", crop_size)
    if predictor_crop != crop_size:
        raise ValueError(f"the predictor was built for {predictor_crop}-voxel crops but the interpolator uses "
                         f"{crop_size}: they must see the same crops")
    alphas = noise_schedule()
    results: dict[str, Any] = {"n_masks": len(masks), "axis": axis, "every_k": [int(k) for k in every_k],
                               "sampler": asdict(settings), "crop_size": crop_size,
                               "per_k": {}}
    everything: list[dict[str, np.ndarray]] = []
    for k in every_k:
        blocks = evaluation_blocks(masks, int(k), crop_size, axis)
        started = time.perf_counter()
        jobs = [GapJob(b["lower"], b["upper"], b["gap"], (j, b["start"], b["stop"])) for j, b in enumerate(blocks)]
        samples = sample_gaps(interpolator, alphas, jobs, settings, device=device, progress=progress)
        diffusion_seconds = time.perf_counter() - started
        started = time.perf_counter()
        predicted = predict_block_variance(predictor, [b["lower"] for b in blocks], [b["upper"] for b in blocks],
                                           [b["gap"] for b in blocks], device=device)
        np_seconds = time.perf_counter() - started
        per_block = [block_scores(b, s.mean(dim=0).numpy(), s.var(dim=0, unbiased=False).numpy(), p)
                     for b, s, p in zip(blocks, samples, predicted, strict=True)]
        everything.extend(per_block)
        summary = summarise(per_block)
        summary["seconds"] = {"diffusion": diffusion_seconds, "np": np_seconds}
        results["per_k"][str(int(k))] = summary
    results["all"] = summarise(everything)
    return results


def _json_ready(value: Any) -> Any:
    """NaN (an undefined metric) becomes ``None`` so that the file is strict JSON."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def markdown_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per ``k`` and one for all: Spearman, the AUROC of every score and the NP's margin
    over the best other score."""
    titles = [f"AUROC {SCORE_TITLES[s]}" for s in SCORES]
    lines = ["| k | blocks | error rate | Spearman (pooled / block mean) | " + " | ".join(titles)
             + " | NP minus best peer |", "|---|---|---|---|" + "---|" * (len(SCORES) + 1)]
    rows = [(k, results["per_k"][str(k)]) for k in results["every_k"]] + [("all", results["all"])]
    for k, r in rows:
        if not r.get("n_blocks"):
            lines.append(f"| {k} | 0 | n/a | n/a | " + " | ".join(["n/a"] * (len(SCORES) + 1)) + " |")
            continue
        a = r["auroc"]
        lines.append(f"| {k} | {r['n_blocks']} | {r['error_rate']:.3f} | {r['spearman']:.3f} / "
                     f"{r['spearman_block_mean']:.3f} | " + " | ".join(f"{a[s]:.3f}" for s in SCORES)
                     + f" | {r['np_margin']:+.3f} |")
    return "\n".join(lines)


def run_evaluation(masks: str | os.PathLike, every_k: str | Sequence[int] = (2, 3, 4), axis: int = 2,
                   out: str | os.PathLike = "results.json", sections: str | Sequence[str] = ("test",),
                   model_path: str | os.PathLike | None = None, interpolator_path: str | os.PathLike | None = None,
                   steps: int = 10, eta: float = 1.0, repeats: int = 8, seed: int = 0, bf16: bool = False,
                   max_batch: int = 64, progress: bool = True) -> dict[str, Any]:
    """Load masks (folder or datalist), both networks from their bundles' configs and weights (default: the
    shipped ones), evaluate, write ``out`` (JSON) and the markdown table beside it (``.md``)."""
    from due_ext.bundles import bundle_root
    from due_ext.interp.evaluate import load_masks_for_evaluation, parse_every_k

    section_list = [s.strip() for s in sections.split(",")] if isinstance(sections, str) else list(sections)
    pairs = load_masks_for_evaluation(masks, section_list)
    interp_root, np_root = Path(bundle_root("interpolator")), Path(bundle_root("uncertainty"))
    interpolator_path = Path(interpolator_path or interp_root / "models" / "model.pt")
    model_path = Path(model_path or np_root / "models" / "model.pt")
    interpolator = network_from_bundle(interp_root / "inference.json", interpolator_path)
    predictor = network_from_bundle(np_root / "inference.json", model_path)
    settings = SamplerSettings(steps=steps, eta=eta, repeats=repeats, seed=seed, bf16=bf16, max_batch=max_batch)
    results = evaluate_uncertainty(pairs, predictor, interpolator, parse_every_k(every_k), axis, settings,
                                   progress=progress)
    results.update({"source": str(masks), "model_path": str(model_path), "interpolator_path": str(interpolator_path)})
    out = Path(out)
    write_json_atomic(out, _json_ready(results))
    out.with_suffix(".md").write_text(markdown_table(results) + "\n")
    return results
