"""Interpolator evaluation: sparsify full 3D masks, fill them back with each method, score with Dice.

For every mask and every ``k``: keep every k-th slice between the first and the last foreground slice (both
always kept; :func:`due_ext.data.builders.sparse.sparse_slices`), fill the rest with each method, and compute

- ``dice_missing``: Dice on the slices that were removed (those strictly between the first and the last
  kept slice that are not kept), i.e. only what the method had to invent;
- ``dice_whole``: Dice on the whole volume (kept slices included, so it is higher).

Soft outputs (linear, diffusion mean) are binarised at 0.5 (strictly greater). Both-empty Dice is 1.
Methods: ``diffusion`` and every classical peer of :mod:`due_ext.interp.classical`; ``"all"`` (the command's
default) is all of them, less ``morphological`` with a warning (and a note under the table) when its optional
dependency is not installed; naming it explicitly without the dependency is an error.
Per ``k`` and method we report the mean and standard deviation over masks; a mask with no removed slice
at that ``k`` (lesion spanning fewer than ``k + 1`` slices) counts for ``dice_whole`` only. Slices are taken
along the mask's ``axis`` (default 2, the stored third array axis). The diffusion interpolator fills the
blocks of all masks in one batched run per ``k``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from due_ext.data import schema
from due_ext.data.builders.sparse import sparse_slices, sparsify
from due_ext.data.datalist import read_datalist, write_json_atomic
from due_ext.data.nifti import read_nifti
from due_ext.interp.classical import (
    CLASSICAL_METHODS,
    MORPHOLOGICAL_MISSING,
    interpolate_gaps,
    morphological_available,
)
from due_ext.metrics.segmentation import dice

METHODS = ("diffusion", *CLASSICAL_METHODS)


def load_masks_for_evaluation(source: str | os.PathLike, sections: Sequence[str] = ("test",),
                              key: str = schema.MASK) -> list[tuple[str, np.ndarray]]:
    """``(name, mask)`` pairs from a folder of NIfTI files or from a datalist's items with ``key``.

    Masks must be 3D; a mask without foreground is skipped (nothing to interpolate). Raises ``ValueError``
    naming the source when nothing usable is found.
    """
    source = Path(source)
    pairs: list[tuple[str, np.ndarray]] = []
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    elif source.is_file():
        payload = read_datalist(source)
        paths = []
        for section in sections:
            for item in payload.get(section, []):
                if key in item:
                    path = Path(item[key])
                    paths.append(path if path.is_absolute() else source.parent / path)
    else:
        raise FileNotFoundError(f"{source}: neither a folder of NIfTI masks nor a datalist file")
    for path in paths:
        array, _ = read_nifti(path)
        if array.ndim == 4 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 3:
            raise ValueError(f"{path}: a mask must be 3D, got shape {array.shape}")
        if (array > 0.5).any():
            pairs.append((path.name.split(".nii")[0], (array > 0.5).astype(np.uint8)))
    if not pairs:
        where = f"sections {', '.join(sections)} (key {key!r})" if source.is_file() else "*.nii / *.nii.gz files"
        raise ValueError(f"{source}: no non-empty 3D mask found in {where}")
    return pairs


def _parse_list(value: str | int | Sequence, kind: type) -> list:
    if isinstance(value, str):
        return [kind(v.strip()) for v in value.split(",") if v.strip()]
    if isinstance(value, int | float):
        return [kind(value)]
    return [kind(v) for v in value]


def evaluate_interpolators(masks: Sequence[tuple[str, np.ndarray]], every_k: Sequence[int] = (2, 3, 4),
                           methods: Sequence[str] = METHODS, axis: int = 2, model: Any = None,
                           settings: Any = None, progress: bool = False) -> dict[str, Any]:
    """Dice of each method at each ``k`` on ``masks``; see the module docstring. ``model`` (and the sampler
    ``settings``) are needed only for ``diffusion``."""
    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if "diffusion" in methods and model is None:
        raise ValueError("method 'diffusion' needs a model (the trained interpolator)")
    if "morphological" in methods and not morphological_available():
        raise ModuleNotFoundError(MORPHOLOGICAL_MISSING)  # before any sampling, not after it
    if any(int(k) < 2 for k in every_k):
        raise ValueError(f"every_k values must be >= 2 (k = 1 removes nothing), got {list(every_k)}")
    volumes = [(name, np.moveaxis(np.asarray(mask), axis, -1)) for name, mask in masks]
    results: dict[str, Any] = {"n_masks": len(volumes), "axis": axis, "every_k": [int(k) for k in every_k],
                               "methods": methods, "per_k": {}}
    for k in every_k:
        k = int(k)
        sparse = []
        for _, mask in volumes:
            slices = sparse_slices(mask, k)
            first, last = slices[0], slices[-1]
            missing = [z for z in range(first, last + 1) if z not in set(slices)]
            sparse.append((sparsify(mask, slices), slices, missing))
        per_method: dict[str, Any] = {}
        for method in methods:
            started = time.perf_counter()
            if method == "diffusion":
                from due_ext.interp.diffusion.inference import interpolate_volumes

                filled = [mean for mean, _ in interpolate_volumes(model, [s[0] for s in sparse], [s[1] for s in sparse],
                                                                  settings, progress=progress)]
            else:
                filled = [interpolate_gaps(s[0], s[1], method) for s in sparse]
            seconds = time.perf_counter() - started
            rows = []
            for (name, mask), (_, _, missing), fill in zip(volumes, sparse, filled, strict=True):
                row = {"name": name, "dice_whole": dice(fill, mask), "missing_slices": len(missing)}
                if missing:
                    row["dice_missing"] = dice(fill[..., missing], mask[..., missing])
                rows.append(row)
            miss = [r["dice_missing"] for r in rows if "dice_missing" in r]
            whole = [r["dice_whole"] for r in rows]
            per_method[method] = {
                "dice_missing_mean": float(np.mean(miss)) if miss else None,
                "dice_missing_std": float(np.std(miss)) if miss else None,
                "dice_whole_mean": float(np.mean(whole)), "dice_whole_std": float(np.std(whole)),
                "n_with_missing": len(miss), "seconds": seconds, "per_mask": rows}
        results["per_k"][str(k)] = per_method
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """Markdown table: one row per method, one column per ``k``: Dice on missing slices (whole volume)."""
    ks = results["every_k"]
    lines = ["| method | " + " | ".join(f"k={k}: missing (whole)" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for method in results["methods"]:
        cells = []
        for k in ks:
            r = results["per_k"][str(k)][method]
            miss = "n/a" if r["dice_missing_mean"] is None else f"{r['dice_missing_mean']:.3f}"
            cells.append(f"{miss} ({r['dice_whole_mean']:.3f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    counts = ", ".join(f"k={k}: {results['per_k'][str(k)][results['methods'][0]]['n_with_missing']}" for k in ks)
    lines.append("")
    lines.append(f"{results['n_masks']} masks; masks with removed slices per k: {counts}. Mean Dice over masks.")
    for method, reason in results.get("skipped", {}).items():
        lines.append(f"Not run: {method} ({reason}).")
    return "\n".join(lines)


def write_results(results: dict[str, Any], out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results`` as JSON to ``out`` and the markdown table beside it (``.md``); returns both paths."""
    out = Path(out)
    write_json_atomic(out, results)
    table = out.with_suffix(".md")
    table.write_text(markdown_table(results) + "\n")
    return out, table


def parse_every_k(value: str | int | Sequence) -> list[int]:
    """``"2,3,4"``, ``(2, 3, 4)`` or ``3`` -> list of ints."""
    return _parse_list(value, int)


def parse_methods(value: str | Sequence[str]) -> list[str]:
    """``"diffusion,sdf"`` or a sequence -> list of method names."""
    return _parse_list(value, str)


def resolve_methods(value: str | Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Method names and the ones skipped (``{name: reason}``): ``"all"`` is :data:`METHODS` less
    ``morphological`` when ITK is missing (warned); anything else is parsed as given."""
    methods = parse_methods(value)
    if methods != ["all"]:
        return methods, {}
    if morphological_available():
        return list(METHODS), {}
    warnings.warn(f"skipping {MORPHOLOGICAL_MISSING}", stacklevel=2)
    return [m for m in METHODS if m != "morphological"], {"morphological": MORPHOLOGICAL_MISSING}


def shipped_model_path() -> Path:
    """Where the bundle's trained weights live in a source checkout: ``bundles/interpolator/models/model.pt``."""
    return Path(__file__).resolve().parents[2] / "bundles" / "interpolator" / "models" / "model.pt"


def run_evaluation(masks: str | os.PathLike, every_k: str | Sequence[int] = (2, 3, 4),
                   methods: str | Sequence[str] = "all", axis: int = 2, out: str | os.PathLike = "results.json",
                   sections: str | Sequence[str] = ("test",), model_path: str | os.PathLike | None = None,
                   steps: int = 10, eta: float = 1.0, repeats: int = 8, seed: int = 0, bf16: bool = False,
                   max_batch: int = 64, progress: bool = True) -> dict[str, Any]:
    """Load masks, evaluate every method, write ``out`` (JSON) and ``out`` with ``.md``; returns the results."""
    method_list, skipped = resolve_methods(methods)
    pairs = load_masks_for_evaluation(masks, _parse_list(sections, str))
    model = settings = None
    if "diffusion" in method_list:
        from due_ext.interp.diffusion.inference import default_network, load_interpolator_weights
        from due_ext.interp.diffusion.sampling import SamplerSettings

        model = load_interpolator_weights(default_network(), model_path or shipped_model_path())
        settings = SamplerSettings(steps=steps, eta=eta, repeats=repeats, seed=seed, bf16=bf16, max_batch=max_batch)
    results = evaluate_interpolators(pairs, parse_every_k(every_k), method_list, axis=axis, model=model,
                                     settings=settings, progress=progress)
    results["source"] = str(masks)
    if skipped:
        results["skipped"] = skipped
    if settings is not None:
        results["sampler"] = {"steps": steps, "eta": eta, "repeats": repeats, "seed": seed, "bf16": bf16,
                              "model_path": str(model_path or shipped_model_path())}
    write_results(results, out)
    return results
