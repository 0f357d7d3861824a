"""Procedural 3D shapes for training the interpolator beyond the phantom ellipsoids.

Real anatomy is lobulated, spiculated, thin and branching, made of several pieces, organ-sized, and drawn at
all kinds of slice spacings. :func:`random_shape` draws one binary ``(X, Y, Z)`` mask from a mixture of such
families, built in millimetres on a grid whose Z spacing (``spacing_z``, uniform in 1-5 mm against 1 mm in-plane
by default) is drawn per shape, so the same body changes slowly or quickly from slice to slice:

- ``lobulated``: an ellipsoid whose radius is modulated by a smooth random field (bumps and lobes).
- ``spiculated``: a lobulated body with thin tapering spikes.
- ``branching``: a tree of thin tubes (vessels, airways), 1-3 mm radius.
- ``multi``: two to four separate lobulated pieces.
- ``organ``: a large smooth body (up to the whole grid), possibly with a concave bite (kidney-, liver-like).
Two more families, not in :data:`DEFAULT_FAMILIES` (the shipped 0.3.0 training set; tried for bundle 0.4,
measured in the bundle's docs and not shipped):

- ``smooth``: a large body with an almost regular surface (deep grey nuclei, ventricles, bladder): between close
  slices the shape-based fill is nearly exact, and the network must learn to leave it alone.
- ``tissue``: a thresholded smooth random field inside an ellipsoid: many thin, folded pieces per slice (white
  matter, lung parenchyma, bowel).

:func:`generate_shapes` draws a reproducible list (one seed per shape), the input of
:class:`.training.SliceTripleDataset` beside the demo set's masks. Its ``families``, ``spacing_z_mm`` and
``log_spacing`` (log-uniform Z spacing, e.g. 1-8 mm: clinical tumour labels are drawn on 5-6.5 mm slices of
0.6-0.8 mm pixels) change the mixture; the defaults give the shipped training set.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

FAMILIES = ("lobulated", "spiculated", "branching", "multi", "organ", "smooth", "tissue")
#: The mixture the shipped interpolator was trained on.
DEFAULT_FAMILIES = FAMILIES[:5]
#: Default range of the Z spacing in mm, against 1 mm in-plane.
DEFAULT_SPACING_Z_MM = (1.0, 5.0)


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth Gaussian random field on ``shape`` (correlation length ~ ``sigma`` voxels)."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return (field - field.mean()) / max(field.std(), 1e-6)


def _blob(rng: np.random.Generator, coords: np.ndarray, centre: np.ndarray, radii: np.ndarray,
          roughness: float, grid_shape: tuple[int, ...]) -> np.ndarray:
    """Rotated ellipsoid (``radii`` in mm) whose surface is pushed in and out by a smooth field (``roughness``
    as a fraction of the radius)."""
    local = (coords - centre) @ _rotation(rng).T
    radius = np.sqrt(((local / radii) ** 2).sum(-1))
    field = _smooth_field(rng, grid_shape, sigma=float(rng.uniform(2.0, 4.0)))
    return radius <= 1.0 + roughness * field


def _tube(coords: np.ndarray, a: np.ndarray, b: np.ndarray, r_a: float, r_b: float) -> np.ndarray:
    """Tapered capsule from ``a`` (radius ``r_a``) to ``b`` (radius ``r_b``), in mm."""
    ab = b - a
    t = np.clip(((coords - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    distance = np.linalg.norm(coords - (a + t[..., None] * ab), axis=-1)
    return distance <= r_a + (r_b - r_a) * t


def random_shape(rng: np.random.Generator, family: str | None = None, size_xy: int = 48, depth: int = 24,
                 families: tuple[str, ...] = DEFAULT_FAMILIES,
                 spacing_z_mm: tuple[float, float] = DEFAULT_SPACING_Z_MM, log_spacing: bool = False) -> np.ndarray:
    """One binary uint8 ``(size_xy, size_xy, depth)`` mask of ``family`` (drawn from ``families`` if ``None``);
    never empty. The Z spacing is uniform in ``spacing_z_mm`` (log-uniform with ``log_spacing``)."""
    unknown = [f for f in (*families, *([family] if family is not None else [])) if f not in FAMILIES]
    if unknown or not families:
        raise ValueError(f"family {unknown[0] if unknown else '(none)'!r} is not one of {', '.join(FAMILIES)}")
    family = families[int(rng.integers(len(families)))] if family is None else family
    low, high = (float(v) for v in spacing_z_mm)
    if not 0 < low <= high:
        raise ValueError(f"spacing_z_mm must be 0 < LOW <= HIGH, got {spacing_z_mm}")
    spacing_z = float(np.exp(rng.uniform(np.log(low), np.log(high))) if log_spacing else rng.uniform(low, high))
    grid = np.stack(np.meshgrid(np.arange(size_xy, dtype=np.float32), np.arange(size_xy, dtype=np.float32),
                                np.arange(depth, dtype=np.float32) * spacing_z, indexing="ij"), axis=-1)
    extent = np.array([size_xy, size_xy, depth * spacing_z], np.float32)
    centre = extent / 2 + rng.uniform(-0.1, 0.1, 3) * extent
    shape = grid.shape[:3]
    if family in ("lobulated", "spiculated"):
        radii = rng.uniform(3.0, min(12.0, extent[2] / 3 + 3.0), 3)
        mask = _blob(rng, grid, centre, radii, float(rng.uniform(0.05, 0.35)), shape)
        if family == "spiculated":
            for _ in range(int(rng.integers(3, 9))):
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                tip = centre + direction * radii.max() * rng.uniform(1.5, 2.6)
                mask |= _tube(grid, centre, tip, float(rng.uniform(1.0, 2.0)), 0.3)
    elif family == "branching":
        mask = np.zeros(shape, bool)
        nodes = [(centre + rng.uniform(-0.15, 0.15, 3) * extent, float(rng.uniform(1.5, 3.0)), 0)]
        while nodes:
            start, radius, level = nodes.pop()
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            end = start + direction * rng.uniform(8.0, 20.0)
            end_radius = max(radius * rng.uniform(0.6, 0.95), 0.8)
            mask |= _tube(grid, start, end, radius, end_radius)
            if level < 3:
                nodes += [(end, end_radius, level + 1) for _ in range(int(rng.integers(1, 3)))]
    elif family == "multi":
        mask = np.zeros(shape, bool)
        for _ in range(int(rng.integers(2, 5))):
            piece_centre = centre + rng.uniform(-0.3, 0.3, 3) * extent
            mask |= _blob(rng, grid, piece_centre, rng.uniform(2.0, 7.0, 3), float(rng.uniform(0.05, 0.3)), shape)
    elif family == "smooth":
        radii = rng.uniform(0.15, 0.42, 3) * extent
        field_sigma = float(rng.uniform(4.0, 8.0))
        local = (grid - centre) @ _rotation(rng).T
        radius = np.sqrt(((local / radii) ** 2).sum(-1))
        mask = radius <= 1.0 + float(rng.uniform(0.0, 0.06)) * _smooth_field(rng, shape, sigma=field_sigma)
    elif family == "tissue":
        radii = rng.uniform(0.3, 0.48, 3) * extent
        body = np.sqrt((((grid - centre) @ _rotation(rng).T / radii) ** 2).sum(-1)) <= 1.0
        field = _smooth_field(rng, shape, sigma=float(rng.uniform(1.5, 4.0)))
        mask = body & (field > np.quantile(field[body], float(rng.uniform(0.4, 0.75))))
    else:  # organ
        radii = rng.uniform(0.2, 0.42, 3) * extent
        mask = _blob(rng, grid, centre, radii, float(rng.uniform(0.03, 0.15)), shape)
        if rng.random() < 0.5:  # a concave bite out of one side
            bite_centre = centre + rng.normal(size=3) / np.sqrt(3) * radii
            mask &= ~_blob(rng, grid, bite_centre, radii * rng.uniform(0.3, 0.6), 0.05, shape)
    if not mask.any():  # a degenerate draw (a piece outside the grid): fall back to a plain ball
        mask = np.linalg.norm(grid - centre, axis=-1) <= 4.0
    return mask.astype(np.uint8)


def generate_shapes(count: int, seed: int = 0, size_xy: int = 48, depth: int = 24,
                    families: tuple[str, ...] = DEFAULT_FAMILIES,
                    spacing_z_mm: tuple[float, float] = DEFAULT_SPACING_Z_MM, log_spacing: bool = False
                    ) -> list[np.ndarray]:
    """``count`` shapes from :func:`random_shape`, shape ``i`` drawn from ``default_rng([seed, i])``."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    families = tuple(families)
    return [random_shape(np.random.default_rng([int(seed), i]), size_xy=size_xy, depth=depth, families=families,
                         spacing_z_mm=tuple(spacing_z_mm), log_spacing=log_spacing) for i in range(count)]
