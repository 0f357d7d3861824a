"""Synthetic lesion shapes shared by the builders: ellipsoids, optionally lobulated, with exact masks.

A lesion is an implicit surface in millimetres. For a point ``x`` let ``q = R^T (x - c) / radii`` (the
point in the ellipsoid's own frame, scaled so the plain ellipsoid is the unit sphere), ``rho = |q|`` and
``u = q / rho``. Lobes are smooth bumps of the surface in random directions ``d_j``::

    g(u) = 1 + sum_j a_j * exp((u . d_j - 1) / w_j)        (1 away from a lobe, 1 + a_j on its axis)
    f(x) = rho / g(u) - 1                                    (< 0 inside)

A spicule is the same bump made narrow and tall (width ``w_j`` of 0.004-0.012 instead of 0.1-0.25): a thin
spike leaving the surface. The **mask is exactly** ``f < 0`` sampled at voxel centres; the image uses a soft edge
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
        return float(max(self.radii_mm) * surface_bound(self.lobe_directions, self.lobe_amplitudes,
                                                         self.lobe_widths))

    @property
    def mean_radius_mm(self) -> float:
        """Geometric mean of the ellipsoid radii (mm)."""
        return float(np.prod(self.radii_mm) ** (1.0 / 3.0))


#: Bumps at most this wide count as spicules in :func:`surface_bound` (lobes are 0.1-0.25 wide).
SPICULE_MAX_WIDTH = 0.05


def surface_bound(directions: np.ndarray, amplitudes: np.ndarray, widths: np.ndarray) -> float:
    """An upper bound of ``g(u)`` over all directions ``u``: the largest radius factor of the lesion.

    Wide bumps (lobes) add at most their amplitude each. Narrow bumps (spicules, width <= ``SPICULE_MAX_WIDTH``)
    are pairwise at least ``2 delta`` apart, so at any ``u`` at most one of them lies within ``delta``; the
    others add at most ``a_k exp((cos delta - 1) / w_k)``. Summing every amplitude would also be a bound, but
    one that shrinks a spiculated body to nothing.
    """
    amplitudes = np.asarray(amplitudes, dtype=np.float64)
    narrow = np.asarray(widths) <= SPICULE_MAX_WIDTH
    bound = 1.0 + float(amplitudes[~narrow].sum())
    if narrow.sum() == 1:
        bound += float(amplitudes[narrow].max())
    elif narrow.sum() > 1:
        spikes = np.asarray(directions, dtype=np.float64)[narrow]
        cosines = np.clip(spikes @ spikes.T, -1.0, 1.0)
        np.fill_diagonal(cosines, -1.0)
        half_angle = 0.5 * float(np.arccos(cosines.max()))
        tails = amplitudes[narrow] * np.exp((np.cos(half_angle) - 1.0) / np.asarray(widths)[narrow])
        bound += min(float(amplitudes[narrow].sum()), float(amplitudes[narrow].max() + tails.sum()))
    return bound


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
                        max_lobes: int = 4, spiculated_probability: float = 0.0,
                        max_spicules: int = 8) -> LesionShape:
    """A random lesion of about ``diameter_mm`` (its bounding diameter never exceeds it).

    Radii are ``diameter/2`` times factors drawn in ``elongation``; with probability
    ``lobulated_probability`` 2..``max_lobes`` lobes of amplitude 0.15-0.35 are added, with probability
    ``spiculated_probability`` 3..``max_spicules`` spicules (amplitude 0.4-0.9, width 0.004-0.012, directions at
    least 0.6 rad apart), and the radii are shrunk by :func:`surface_bound` so that everything stays within the
    requested diameter. With ``spiculated_probability == 0`` the random stream is the one of a lesion without
    the spicule option (builders that do not ask for spicules draw the same lesions as before).
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
    if spiculated_probability > 0 and rng.random() < spiculated_probability:
        spikes = _separated_directions(rng, int(rng.integers(3, max_spicules + 1)), min_angle=0.6)
        directions = np.concatenate([directions, spikes])
        amplitudes = np.concatenate([amplitudes, rng.uniform(0.4, 0.9, size=len(spikes))])
        widths = np.concatenate([widths, rng.uniform(0.004, 0.012, size=len(spikes))])
    radii = radii / surface_bound(directions, amplitudes, widths)  # keep the bounding diameter at diameter_mm
    return LesionShape(center_mm=tuple(float(c) for c in center_mm), radii_mm=tuple(float(r) for r in radii),
                       rotation=random_rotation(rng), lobe_directions=directions, lobe_amplitudes=amplitudes,
                       lobe_widths=widths)


def _separated_directions(rng: np.random.Generator, count: int, min_angle: float) -> np.ndarray:
    """Up to ``count`` random unit vectors ``(n, 3)``, pairwise at least ``min_angle`` radians apart (rejection;
    gives fewer when 200 draws cannot place them all)."""
    kept: list[np.ndarray] = []
    for _ in range(200):
        if len(kept) == count:
            break
        candidate = rng.normal(size=3)
        candidate /= np.linalg.norm(candidate) + 1e-12
        if all(float(candidate @ other) <= np.cos(min_angle) for other in kept):
            kept.append(candidate)
    return np.asarray(kept).reshape(-1, 3)


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
