"""``bounded``: lesion-bounded chest-CT crops, the input protocol of the DUE paper's released code.

The paper crops each LIDC nodule's bounding box and resizes it to a fixed input, so the lesion fills much of
the input and a coarse Grad-CAM (``layer4``, 4x4x4 at 128x128x64) can outline it (DESIGN.md section 10). On
``lung-ct`` (fixed 80 mm crops, 8-20 mm nodules) no deep layer can. This builder makes the paper's kind of
input from the same real chest CTs (pyradiomics ``lung1``, ``lung2``, loaded, lung-masked and cached by
:mod:`.lung_ct`):

1. A lesion whose bounding box's longest side is 6-30 mm (:data:`LESION_DIAMETER_MM`) is drawn with
   :func:`~.nodules.random_lesion_shape` and scaled to that size: lobulated with probability 0.5, spiculated
   (thin spikes) with probability 0.3. It sits at a nodule site of the lung
   (:func:`~.lung_ct.nodule_site_depth` at least its bounding radius + 1 mm) and is blended into the CT on its
   cached 1.25 x 1.25 x 2.5 mm grid like a ``lung-ct`` nodule.
2. Its bounding box (sampled with 97 points across) times a margin drawn in :data:`MARGIN` (one factor for
   the three axes) is the crop; the crop's centre moves from the box's by up to :data:`JITTER` of the free
   room on each side, so the lesion is not always in the middle but keeps at least 5 % of its box free on
   every side (half a voxel from every face at 24 or more voxels per axis).
3. The crop is resampled trilinearly to the fixed input size (each axis with its own voxel size, as the
   paper's resize); the affine records the real voxel size. The mask is exact: the lesion's implicit surface
   sampled at the output voxel centres.
4. Annotated slices are the crop's **acquired** slices (the CT's 5 mm NRRD slices, every ``every_k``-th of
   those that hold lesion), each mapped to the output slice nearest to it; the slices in between are the ones
   the resize created, which the interpolator fills. A lesion that no acquired slice cuts is redrawn.
5. Negatives: crops of lesion-free lung of the same physical sizes. Negative ``i`` of a split takes the box
   size (and lesion-to-box offset) of positive ``i`` at another site drawn the same way, so scale is no cue;
   extra negatives draw their own virtual lesion. Crops never overlap the real tumour (plus 10 mm).
6. Intensities: HU clipped to [-1000, 400] and scaled to [0, 1], as ``lung-ct``.

Splits are by CT subject and there are **only two subjects**: training and validation from ``lung1`` (boxes in
its two X halves, so none overlap), test from ``lung2``. The section ``real_tumours`` holds each real tumour's
bounding box times 1.5, resampled the same way (a sanity set nothing trains on).

Defaults: size 48,48,24 (a ``layer3`` Grad-CAM of the bundle's ResNet is 3x3x3 there; measured oracle ceiling
in ``experiments/results/cam_ceiling_bounded.md``), 64 positives and 64 negatives (32/16/16 each), every
acquired slice annotated.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from due_ext.data.builders.lung_ct import (
    HU_WINDOW,
    NODULE_HU,
    SPACING,
    SUBJECTS,
    ChestCT,
    acquired_slice_spacing,
    blend_nodule,
    hu_to_unit,
    load_chest_ct,
    lung_mid_x,
    tumour_box,
)
from due_ext.data.builders.nodules import LesionShape, lesion_field, random_lesion_shape
from due_ext.data.builders.output import BuildSummary, StagedDataset, count_items, dataset_header
from due_ext.data.builders.splits import split_counts
from due_ext.data.cache import PYRADIOMICS_VERSION
from due_ext.data.datalist import SECTIONS

DEFAULT_SIZE = (48, 48, 24)
DEFAULT_N_POS = 64
DEFAULT_N_NEG = 64
#: Every k-th acquired slice of the lesion is annotated.
DEFAULT_EVERY_K = 1
LESION_DIAMETER_MM = (6.0, 30.0)
#: Crop extent = lesion bounding box times a factor drawn in this range.
MARGIN = (1.2, 2.0)
#: Largest shift of the crop centre from the box centre, as a fraction of the free room on each side.
JITTER = 0.5
LOBULATED_PROBABILITY = 0.5
SPICULATED_PROBABILITY = 0.3
#: Crop extent around a real tumour's bounding box.
REAL_TUMOUR_MARGIN = 1.5
REAL_TUMOURS = "real_tumours"
#: Bump when the items a build produces change, so cached demo datasets are rebuilt.
DATASET_VERSION = 1

_SITE_MARGIN_MM = 1.0
_BOX_SAMPLES = 97
_MAX_DRAWS = 2000


@dataclass(frozen=True)
class Geometry:
    """A lesion and the crop around it, relative to the lesion centre (mm)."""

    shape: LesionShape  # centred at the origin
    extent_mm: np.ndarray  # (3,) physical size of the crop
    offset_mm: np.ndarray  # (3,) crop start minus lesion centre


@dataclass
class Region:
    """Where a split's crops may lie: one CT, optionally one X half of it (voxel indices ``[x_low, x_high)``)."""

    ct: ChestCT
    x_low: int
    x_high: int
    sites: np.ndarray  # (N, 3) candidate lesion centres (voxel indices) inside the X range


def lesion_box(shape: LesionShape) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box ``(low, high)`` (mm, relative to the centre) of the lesion mask, sampled on a grid of
    :data:`_BOX_SAMPLES` points across its bounding sphere and grown by half a sample, so that it holds every
    point of the surface the grid saw (within 1 % of the diameter of the true box)."""
    radius = shape.bounding_radius_mm
    step = 2 * radius / (_BOX_SAMPLES - 1)
    start = -radius
    n = _BOX_SAMPLES
    field = lesion_field(dataclasses.replace(shape, center_mm=(radius,) * 3), (n, n, n), (step,) * 3)
    inside = np.argwhere(field < 0)
    if len(inside) == 0:
        raise ValueError(f"lesion of bounding radius {radius:.2f} mm is empty on a {step:.3f} mm grid")
    low = start + inside.min(axis=0) * step - 0.5 * step
    high = start + inside.max(axis=0) * step + 0.5 * step
    return low, high


def random_geometry(rng: np.random.Generator, margin: tuple[float, float] = MARGIN,
                    jitter: float = JITTER) -> Geometry:
    """Steps 1-2 of the module docstring, without the site: a lesion, a margin in ``margin`` and a crop whose
    centre moves from the box's by up to ``jitter`` of the free room on each side."""
    diameter = rng.uniform(*LESION_DIAMETER_MM)
    shape = random_lesion_shape(rng, diameter, (0.0, 0.0, 0.0), elongation=(0.6, 1.0),
                                lobulated_probability=LOBULATED_PROBABILITY,
                                spiculated_probability=SPICULATED_PROBABILITY)
    low, high = lesion_box(shape)
    # lobes and spicules shrink the body below the drawn diameter: scale the lesion so its largest
    # bounding-box side is the drawn diameter (the implicit surface scales exactly with its radii)
    scale = diameter / float((high - low).max())
    shape = dataclasses.replace(shape, radii_mm=tuple(r * scale for r in shape.radii_mm))
    low, high = low * scale, high * scale
    extent = rng.uniform(*margin) * (high - low)
    room = 0.5 * (extent - (high - low))
    shift = rng.uniform(-1.0, 1.0, size=3) * jitter * room
    centre = 0.5 * (low + high) + shift
    return Geometry(shape, extent, centre - 0.5 * extent)


def _regions(cts: dict[str, ChestCT]) -> tuple[dict[str, Region], list[str]]:
    """Training / validation: the two X halves of lung1 (the half with more nodule sites trains); test: lung2."""
    min_depth = 0.5 * LESION_DIAMETER_MM[0] + _SITE_MARGIN_MM

    def region(ct: ChestCT, x_low: int, x_high: int) -> Region:
        grid = np.zeros(ct.shape, dtype=bool)
        grid[x_low:x_high:2, ::2, ::2] = True
        return Region(ct, x_low, x_high, np.argwhere(grid & (ct.site_depth >= min_depth)))

    lung1, lung2 = cts["lung1"], cts["lung2"]
    mid = lung_mid_x(lung1)
    halves = {"low": region(lung1, 0, mid), "high": region(lung1, mid, lung1.shape[0])}
    train_half = "low" if len(halves["low"].sites) >= len(halves["high"].sites) else "high"
    val_half = "high" if train_half == "low" else "low"
    notes = ["only two CT subjects: training and validation crops come from lung1, test crops from lung2",
             f"lung1 training crops lie in its {train_half}-X half, validation crops in the {val_half}-X half "
             "(no overlap)"]
    return {"training": halves[train_half], "validation": halves[val_half],
            "test": region(lung2, 0, lung2.shape[0])}, notes


def _place(rng: np.random.Generator, region: Region, geometry: Geometry) -> np.ndarray | None:
    """A lesion centre (mm on the cached grid) where the lesion sits in the lung's nodule-site region and the
    crop lies inside the CT, inside the region's X range and away from the real tumour; ``None`` if none found."""
    ct = region.ct
    spacing = np.asarray(SPACING)
    upper = (np.asarray(ct.shape) - 1) * spacing
    x_range = (region.x_low * spacing[0], (region.x_high - 1) * spacing[0])
    tumour = tumour_box(ct)
    needed = geometry.shape.bounding_radius_mm + _SITE_MARGIN_MM
    for _ in range(_MAX_DRAWS):
        site = region.sites[rng.integers(len(region.sites))]
        if ct.site_depth[tuple(site)] < needed:
            continue
        centre = site * spacing
        start = centre + geometry.offset_mm
        stop = start + geometry.extent_mm
        if np.any(start < 0) or np.any(stop > upper) or start[0] < x_range[0] or stop[0] > x_range[1]:
            continue
        if tumour is not None and np.all((start <= tumour[1] * spacing) & (stop >= tumour[0] * spacing)):
            continue
        return centre
    return None


def output_centres(start_mm: np.ndarray, extent_mm: np.ndarray, size: tuple[int, int, int]) -> list[np.ndarray]:
    """Per axis, the positions (mm) of the output voxel centres: ``size`` equal cells spanning the crop."""
    return [start_mm[a] + (np.arange(size[a]) + 0.5) * extent_mm[a] / size[a] for a in range(3)]


def resample(volume: np.ndarray, start_mm: np.ndarray, extent_mm: np.ndarray, size: tuple[int, int, int],
             order: int = 1) -> np.ndarray:
    """``volume`` (cached grid, :data:`SPACING`) sampled at the output voxel centres of the crop
    (``order`` 1: trilinear, 0: nearest)."""
    axes = [c / s for c, s in zip(output_centres(start_mm, extent_mm, size), SPACING, strict=True)]
    low = [max(int(np.floor(a.min())) - 1, 0) for a in axes]
    high = [min(int(np.ceil(a.max())) + 2, n) for a, n in zip(axes, volume.shape, strict=True)]
    part = volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    coords = np.meshgrid(*(a - lo for a, lo in zip(axes, low, strict=True)), indexing="ij")
    return ndimage.map_coordinates(part, coords, order=order, mode="nearest")


def crop_affine(ct: ChestCT, start_mm: np.ndarray, extent_mm: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """Voxel -> RAS affine of the output grid: the cached grid's affine composed with the crop's scaling."""
    voxel = np.asarray(extent_mm) / np.asarray(size)
    to_cached = np.eye(4)
    to_cached[:3, :3] = np.diag(voxel / np.asarray(SPACING))
    to_cached[:3, 3] = (np.asarray(start_mm) + 0.5 * voxel) / np.asarray(SPACING)
    return ct.affine @ to_cached


def acquired_slices(start_mm: np.ndarray, extent_mm: np.ndarray, size: tuple[int, int, int],
                    acquired_mm: float) -> list[int]:
    """Output Z indices nearest to the acquired slices (at multiples of ``acquired_mm`` on the cached grid)
    that lie inside the crop, in order, without repeats."""
    z0, z1 = start_mm[2], start_mm[2] + extent_mm[2]
    planes = np.arange(np.ceil(z0 / acquired_mm), np.floor(z1 / acquired_mm) + 1) * acquired_mm
    step = extent_mm[2] / size[2]
    indices = np.clip(np.round((planes - z0) / step - 0.5), 0, size[2] - 1).astype(int)
    return sorted({int(i) for i in indices})


def annotated_slices(mask: np.ndarray, candidates: list[int], every_k: int) -> list[int]:
    """Every ``every_k``-th candidate slice that holds lesion, the last such one always kept."""
    held = [z for z in candidates if mask[..., z].any()]
    if not held:
        return []
    return sorted(set(held[::every_k]) | {held[-1]})


def _positive(rng: np.random.Generator, region: Region, size: tuple[int, int, int], every_k: int,
              acquired_mm: float, margin: tuple[float, float] = MARGIN, jitter: float = JITTER):
    """One positive: ``(image, mask, slices, start_mm, geometry)``; redraws until a lesion fits and is annotated."""
    ct = region.ct
    for _ in range(100):
        geometry = random_geometry(rng, margin, jitter)
        centre = _place(rng, region, geometry)
        if centre is None:
            continue
        start = centre + geometry.offset_mm
        # blend the lesion into the part of the cached grid the crop reads (it holds the lesion), then resample
        low = np.maximum(np.floor(start / SPACING).astype(int) - 1, 0)
        high = np.minimum(np.ceil((start + geometry.extent_mm) / SPACING).astype(int) + 2, ct.shape)
        part = ct.hu[low[0]:high[0], low[1]:high[1], low[2]:high[2]].astype(np.float64)
        origin = low * np.asarray(SPACING)
        local = dataclasses.replace(geometry.shape, center_mm=tuple(centre - origin))
        part = blend_nodule(rng, part, lesion_field(local, part.shape, SPACING))
        image = resample(part, start - origin, geometry.extent_mm, size)
        voxel = geometry.extent_mm / np.asarray(size)
        first_centre = start + 0.5 * voxel
        on_output = dataclasses.replace(geometry.shape, center_mm=tuple(centre - first_centre))
        mask = (lesion_field(on_output, size, tuple(voxel)) < 0).astype(np.uint8)
        slices = annotated_slices(mask, acquired_slices(start, geometry.extent_mm, size, acquired_mm), every_k)
        if slices:
            return image, mask, slices, start, geometry
    raise ValueError(f"could not place an annotated lesion in {ct.name} in 100 draws; is the CT cache intact?")


def _item_extra(ct: ChestCT, start: np.ndarray, extent: np.ndarray) -> dict:
    return {"subject": ct.name, "box_start_mm": [round(float(v), 4) for v in start],
            "box_extent_mm": [round(float(v), 4) for v in extent]}


def build_bounded(out: str | os.PathLike, n_pos: int = DEFAULT_N_POS, n_neg: int = DEFAULT_N_NEG,
                  size: tuple[int, int, int] = DEFAULT_SIZE, every_k: int = DEFAULT_EVERY_K,
                  seed: int = 0, val_fraction: float = 0.25, margin: tuple[float, float] = MARGIN,
                  jitter: float = JITTER) -> BuildSummary:
    """Build the lesion-bounded dataset into ``out`` (see the module docstring); downloads the CTs on first use.
    ``val_fraction``: share of each class in validation (taken from training; the test share stays 25 %).
    ``margin``: range of the crop extent over the lesion box; ``jitter``: largest shift of the crop centre, as a
    fraction of the free room on each side (1: the lesion may touch a face). Larger values take the lesion away
    from the centre, where a centred prior scores nothing (``experiments/README.md``, the decentred set)."""
    started = time.perf_counter()
    margin = (float(margin[0]), float(margin[1]))
    if not 1.0 <= margin[0] <= margin[1]:
        raise ValueError(f"margin must be (low, high) with 1 <= low <= high, got {margin}")
    if not 0.0 <= jitter <= 1.0:
        raise ValueError(f"jitter must be in [0, 1], got {jitter}")
    size = tuple(int(s) for s in size)
    pos_counts = split_counts(n_pos, "positives", val_fraction)
    neg_counts = split_counts(n_neg, "negatives", val_fraction)
    cts = {name: load_chest_ct(name) for name in SUBJECTS}
    acquired = {name: acquired_slice_spacing(name) for name in SUBJECTS}
    regions, notes = _regions(cts)
    with StagedDataset(out) as staged, tqdm(total=n_pos + n_neg + len(SUBJECTS), desc="bounded",
                                            unit="volume") as bar:
        for section in SECTIONS:
            region = regions[section]
            ct = region.ct
            geometries = []
            for index in range(pos_counts[section]):
                rng = np.random.default_rng([seed, SECTIONS.index(section), 1, index])
                image, mask, slices, start, geometry = _positive(rng, region, size, every_k, acquired[ct.name],
                                                                 margin, jitter)
                staged.add_item(section, f"{section}_pos_{index:03d}", hu_to_unit(image),
                                crop_affine(ct, start, geometry.extent_mm, size), 1, mask=mask,
                                annotated_slices=slices, extra=_item_extra(ct, start, geometry.extent_mm))
                geometries.append(geometry)
                bar.update()
            for index in range(neg_counts[section]):
                rng = np.random.default_rng([seed, SECTIONS.index(section), 0, index])
                for _ in range(100):
                    geometry = geometries[index] if index < len(geometries) else random_geometry(rng, margin, jitter)
                    centre = _place(rng, region, geometry)
                    if centre is not None:
                        break
                else:
                    raise ValueError(f"no lesion-free {section} crop fits in {ct.name} in 100 draws")
                start = centre + geometry.offset_mm
                staged.add_item(section, f"{section}_neg_{index:03d}",
                                hu_to_unit(resample(ct.hu.astype(np.float32), start, geometry.extent_mm, size)),
                                crop_affine(ct, start, geometry.extent_mm, size), 0,
                                extra=_item_extra(ct, start, geometry.extent_mm))
                bar.update()
        for name, ct in cts.items():
            image, mask, slices, start, extent = _real_tumour(ct, size, every_k, acquired[name])
            staged.add_item(REAL_TUMOURS, f"real_tumour_{name}", hu_to_unit(image),
                            crop_affine(ct, start, extent, size), 1, mask=mask, annotated_slices=slices,
                            extra=_item_extra(ct, start, extent))
            bar.update()
        notes += ["voxel sizes differ per crop (crop extent / size, in each item's affine and box_extent_mm); "
                  "the spacing above is the CT grid the crops are cut from",
                  "negatives of a split take the box sizes of its positives (extra ones draw their own), at other "
                  "sites: positives and negatives share the distribution of physical sizes",
                  "annotated slices: the output slices nearest to the CT's acquired slices (every "
                  f"{every_k}-th that holds lesion)",
                  f"section '{REAL_TUMOURS}' holds the two real tumours (pyradiomics labels): a sanity set, "
                  "never trained on"]
        parameters = {"n_pos": n_pos, "n_neg": n_neg, "size": list(size), "every_k": every_k, "seed": seed,
                      "val_fraction": val_fraction,
                      "source_spacing_mm": list(SPACING), "acquired_slice_mm": acquired,
                      "hu_window": list(HU_WINDOW), "lesion_diameter_mm": list(LESION_DIAMETER_MM),
                      "lesion_hu": list(NODULE_HU), "margin": list(margin), "jitter": jitter,
                      "lobulated_probability": LOBULATED_PROBABILITY,
                      "spiculated_probability": SPICULATED_PROBABILITY,
                      "source": f"pyradiomics=={PYRADIOMICS_VERSION} sdist, data/lung1 and data/lung2"}
        header = dataset_header("bounded", "Lesion-bounded chest-CT crops (pyradiomics lung1/lung2) with inserted "
                                "synthetic lesions and exact masks, resampled to a fixed size "
                                "(due_ext.data.builders.bounded). Image provenance undocumented upstream: demo "
                                "use only.", "CT", parameters, notes)
        path = staged.commit(header)
        counts = count_items(staged.sections)
        files = staged.files
    return BuildSummary("bounded", path, counts, size, SPACING, files, time.perf_counter() - started, notes)


def _real_tumour(ct: ChestCT, size: tuple[int, int, int], every_k: int, acquired_mm: float):
    """The real tumour's bounding box times :data:`REAL_TUMOUR_MARGIN`, moved inside the CT, resampled."""
    spacing = np.asarray(SPACING)
    where = np.argwhere(ct.tumour)
    low, high = (where.min(axis=0) - 0.5) * spacing, (where.max(axis=0) + 0.5) * spacing
    extent = np.minimum(REAL_TUMOUR_MARGIN * (high - low), (np.asarray(ct.shape) - 1) * spacing)
    start = np.clip(0.5 * (low + high) - 0.5 * extent, 0, (np.asarray(ct.shape) - 1) * spacing - extent)
    image = resample(ct.hu.astype(np.float32), start, extent, size)
    mask = resample(ct.tumour.astype(np.uint8), start, extent, size, order=0)
    slices = annotated_slices(mask, acquired_slices(start, extent, size, acquired_mm), every_k)
    return image, mask, slices, start, extent
