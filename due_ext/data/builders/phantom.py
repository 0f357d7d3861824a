"""``phantom``: procedural volumes with lobulated, textured lesions and exact masks; no download.

Each volume (intensities in [0, 1], spacing 1 x 1 x 2 mm so that Z is the coarse slice axis, as in CT):

- background: 0.30 plus a smooth random field (sd 0.06, sigma 4 voxels) and fine texture (sd 0.02);
- distractors, in positives *and* negatives (0-2 each): smooth vessel-like tubes (elongated ellipsoids,
  3-5 mm thick, 12-20 mm long) as bright as lesions but without texture. A lesion therefore cannot be
  found by brightness alone: it differs by shape (compact, often lobulated) and texture;
- positives: one lesion of bounding diameter 25-50 % of the smallest physical extent (8-16 mm at the
  default size), +0.22 over the background with texture (sd 0.06), soft edge 0.5 mm; the mask is exact
  (:mod:`due_ext.data.builders.nodules`).

Defaults: size 32,32,16, 8 positives and 8 negatives split 50/25/25 (4/2/2 each), every 3rd lesion slice
annotated. Every item draws from its own generator seeded by (seed, class, index), so the same seed gives
identical arrays.
"""

from __future__ import annotations

import os
import time

import numpy as np
from tqdm.auto import tqdm

from due_ext.data.builders.nodules import (
    lesion_field,
    lesion_mask,
    plain_ellipsoid,
    random_lesion_shape,
    random_rotation,
    smooth_texture,
    soft_edge,
)
from due_ext.data.builders.output import BuildSummary, StagedDataset, count_items, dataset_header
from due_ext.data.builders.splits import split_counts
from due_ext.data.datalist import SECTIONS

#: Bump when the items a build produces change, so cached demo datasets are rebuilt.
DATASET_VERSION = 1
DEFAULT_SIZE = (32, 32, 16)
DEFAULT_N_POS = 8
DEFAULT_N_NEG = 8
DEFAULT_EVERY_K = 3
SPACING = (1.0, 1.0, 2.0)
LESION_CONTRAST = 0.22


def phantom_affine(spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    """Voxel-to-world matrix of a phantom: axis-aligned, the given spacing, origin at 0."""
    return np.diag([*spacing, 1.0])


def _background(rng: np.random.Generator, size: tuple[int, int, int]) -> np.ndarray:
    return (0.30 + 0.06 * smooth_texture(rng, size, 4.0) + 0.02 * smooth_texture(rng, size, 0.7))


def _add_distractors(rng: np.random.Generator, image: np.ndarray, spacing: tuple[float, float, float]) -> None:
    extent = np.asarray(image.shape) * np.asarray(spacing)
    for _ in range(int(rng.integers(0, 3))):
        thickness = rng.uniform(1.5, 2.5)
        length = rng.uniform(6.0, 10.0)
        center = rng.uniform(0.1, 0.9, size=3) * extent
        tube = plain_ellipsoid(tuple(center), (length, thickness, thickness), random_rotation(rng))
        alpha = soft_edge(lesion_field(tube, image.shape, spacing), 0.7)
        image += alpha * (LESION_CONTRAST + rng.uniform(-0.03, 0.03))


def make_phantom_volume(rng: np.random.Generator, size: tuple[int, int, int], positive: bool,
                        spacing: tuple[float, float, float] = SPACING) -> tuple[np.ndarray, np.ndarray | None]:
    """One phantom ``(image, mask)``: float32 image in [0, 1]; uint8 exact lesion mask, ``None`` if negative."""
    image = _background(rng, size)
    _add_distractors(rng, image, spacing)
    mask = None
    if positive:
        extent = np.asarray(size) * np.asarray(spacing)
        diameter = rng.uniform(0.25, 0.5) * float(extent.min())
        radius = 0.5 * diameter
        margin = np.asarray(spacing)  # keep one voxel between the lesion and the border
        center = rng.uniform(radius + margin, extent - radius - margin)
        # Snap to a voxel centre so even the smallest lesion covers at least that voxel.
        center = np.round(center / np.asarray(spacing)) * np.asarray(spacing)
        shape = random_lesion_shape(rng, diameter, tuple(center), lobulated_probability=0.6)
        field_mm = lesion_field(shape, size, spacing)
        alpha = soft_edge(field_mm, 0.5)
        lesion = LESION_CONTRAST + rng.uniform(-0.03, 0.03) + 0.06 * smooth_texture(rng, size, 0.8)
        image = image + alpha * lesion
        mask = lesion_mask(field_mm)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask


def check_phantom_size(size: tuple[int, int, int]) -> None:
    """Raise ``ValueError`` if ``size`` is too small to hold a lesion with a margin."""
    if min(size) < 8:
        raise ValueError(f"phantom size {size} is too small: every axis needs at least 8 voxels")


def build_phantom(out: str | os.PathLike, n_pos: int = DEFAULT_N_POS, n_neg: int = DEFAULT_N_NEG,
                  size: tuple[int, int, int] = DEFAULT_SIZE, every_k: int = DEFAULT_EVERY_K,
                  seed: int = 0) -> BuildSummary:
    """Build the phantom dataset into ``out`` (``datalist.json`` + NIfTI volumes); see the module docstring."""
    check_phantom_size(size)
    started = time.perf_counter()
    plan = [(section, label, index)
            for label, n in ((1, n_pos), (0, n_neg))
            for section, count in split_counts(n, "positives" if label else "negatives").items()
            for index in range(count)]
    affine = phantom_affine()
    with StagedDataset(out) as staged:
        for section, label, index in tqdm(plan, desc="phantom", unit="volume"):
            # One generator per item: (seed, section, class, index) -> the same arrays on every run.
            rng = np.random.default_rng([seed, SECTIONS.index(section), label, index])
            image, mask = make_phantom_volume(rng, size, positive=bool(label))
            name = f"{section}_{'pos' if label else 'neg'}_{index:03d}"
            staged.add_item(section, name, image, affine, label, mask=mask, every_k=every_k)
        parameters = {"n_pos": n_pos, "n_neg": n_neg, "size": list(size), "every_k": every_k, "seed": seed,
                      "spacing_mm": list(SPACING)}
        header = dataset_header("phantom", "Procedural phantom volumes with lobulated textured lesions and "
                                "vessel-like distractors (due_ext.data.builders.phantom).", "synthetic",
                                parameters)
        path = staged.commit(header)
        counts = count_items(staged.sections)
        files = staged.files
    return BuildSummary("phantom", path, counts, size, SPACING, files, time.perf_counter() - started)
