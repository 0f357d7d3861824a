"""Synthetic lesion shapes shared by the builders: ellipsoids, optionally lobulated, with exact masks.

A lesion is an implicit surface in millimetres. For a point ``x`` let ``q = R^T (x - c) / radii`` (the
point in the ellipsoid's own frame, scaled so the plain ellipsoid is the unit sphere), ``rho = |q|`` and
``u = q / rho``. Lobes are smooth bumps of the surface in random directions ``d_j``::

    g(u) = 1 + sum_j a_j * exp((u . d_j - 1) / w_j)        (1 away from a lobe, 1 + a_j on its axis)
    f(x) = rho / g(u) - 1                                    (< 0 inside)

The **mask is exactly** ``f < 0`` sampled at voxel centres; the image uses a soft edge
``alpha = sigmoid(-f * r / edge)`` (``r`` the mean radius, so ``f * r`` approximates a signed distance in
mm), which is 0.5 on the mask boundary. Texture is smoothed Gaussian noise, so a lesion is not a flat blob.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class LesionShape:
    """An ellipsoid with optional lobes, in millimetres relative to the grid's first voxel centre."""

    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    rotation: np.ndarray  # (3, 3), columns are the ellipsoid's axes
    lobe_directions: np.ndarray  # (L, 3) unit vectors in the ellipsoid frame; L may be 0
    lobe_amplitudes: np.ndarray  # (L,)
    lobe_widths: np.ndarray  # (L,)

    @property
    def bounding_radius_mm(self) -> float:
        """A radius (mm) around the centre that contains the whole lesion."""
        return float(max(self.radii_mm) * (1.0 + float(np.sum(self.lobe_amplitudes))))

    @property
    def mean_radius_mm(self) -> float:
        """Geometric mean of the ellipsoid radii (mm)."""
        return float(np.prod(self.radii_mm) ** (1.0 / 3.0))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def plain_ellipsoid(center_mm: tuple[float, float, float], radii_mm: tuple[float, float, float],
                    rotation: np.ndarray) -> LesionShape:
    """An ellipsoid without lobes."""
    empty = np.zeros((0,))
    return LesionShape(center_mm=tuple(float(c) for c in center_mm), radii_mm=tuple(float(r) for r in radii_mm),
                       rotation=np.asarray(rotation, dtype=np.float64), lobe_directions=np.zeros((0, 3)),
                       lobe_amplitudes=empty, lobe_widths=empty)


def random_lesion_shape(rng: np.random.Generator, diameter_mm: float, center_mm: tuple[float, float, float], *,
                        elongation: tuple[float, float] = (0.7, 1.0), lobulated_probability: float = 0.5,
                        max_lobes: int = 4) -> LesionShape:
    """A random lesion of about ``diameter_mm`` (its bounding diameter never exceeds it).

    Radii are ``diameter/2`` times factors drawn in ``elongation``; with probability
    ``lobulated_probability`` 2..``max_lobes`` lobes of amplitude 0.15-0.35 are added, and the radii are
    shrunk so that the lobes stay within the requested diameter.
    """
    if diameter_mm <= 0:
        raise ValueError(f"lesion diameter must be positive, got {diameter_mm}")
    radii = 0.5 * diameter_mm * rng.uniform(*elongation, size=3)
    radii[rng.integers(3)] = 0.5 * diameter_mm  # one axis spans the full diameter
    n_lobes = int(rng.integers(2, max_lobes + 1)) if rng.random() < lobulated_probability else 0
    directions = rng.normal(size=(n_lobes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True) + 1e-12
    amplitudes = rng.uniform(0.15, 0.35, size=n_lobes)
    widths = rng.uniform(0.1, 0.25, size=n_lobes)
    radii = radii / (1.0 + amplitudes.sum())  # keep the bounding diameter at diameter_mm
    return LesionShape(center_mm=tuple(float(c) for c in center_mm), radii_mm=tuple(float(r) for r in radii),
                       rotation=random_rotation(rng), lobe_directions=directions, lobe_amplitudes=amplitudes,
                       lobe_widths=widths)


def lesion_field(shape: LesionShape, grid_shape: tuple[int, int, int],
                 spacing: tuple[float, float, float]) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) of ``shape`` at every voxel centre of the grid."""
    axes = [np.arange(n, dtype=np.float64) * s - c
            for n, s, c in zip(grid_shape, spacing, shape.center_mm, strict=True)]
    offsets = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)  # (X, Y, Z, 3) in mm
    local = offsets @ shape.rotation / np.asarray(shape.radii_mm)  # ellipsoid frame, unit-sphere scaled
    rho = np.linalg.norm(local, axis=-1)
    bump = np.ones_like(rho)
    if len(shape.lobe_amplitudes):
        unit = local / np.maximum(rho, 1e-9)[..., None]
        cosines = unit @ shape.lobe_directions.T  # (..., L)
        bump = bump + np.sum(shape.lobe_amplitudes * np.exp((cosines - 1.0) / shape.lobe_widths), axis=-1)
    return (rho / bump - 1.0) * shape.mean_radius_mm


def lesion_mask(field_mm: np.ndarray) -> np.ndarray:
    """Exact binary mask (uint8) of a lesion: voxel centres strictly inside the surface."""
    return (field_mm < 0).astype(np.uint8)


def soft_edge(field_mm: np.ndarray, edge_mm: float) -> np.ndarray:
    """Blending weight in [0, 1]: 1 deep inside, 0.5 on the surface, a sigmoid of width ``edge_mm``."""
    return 1.0 / (1.0 + np.exp(np.clip(field_mm / edge_mm, -50.0, 50.0)))


def smooth_texture(rng: np.random.Generator, grid_shape: tuple[int, ...], sigma_voxels: float) -> np.ndarray:
    """Gaussian noise smoothed by ``sigma_voxels`` and rescaled to unit standard deviation."""
    noise = rng.normal(size=grid_shape)
    if sigma_voxels > 0:
        noise = ndimage.gaussian_filter(noise, sigma_voxels, mode="reflect")
    return noise / (noise.std() + 1e-12)
