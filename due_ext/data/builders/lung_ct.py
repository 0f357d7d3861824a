"""``lung-ct``: real chest-CT backgrounds (pyradiomics ``lung1``, ``lung2``) with inserted synthetic nodules.

Recipe (DUE design brief, section 3):

1. Read the NRRD (HU, 5 mm slices) with SimpleITK and resample to 1.25 x 1.25 x 2.5 mm, linear for the
   image, nearest for the tumour label. The new size is ``(n - 1) * old // new + 1`` per axis, so the
   resampled grid never reaches past the last original voxel (a rounded-up size adds an air slice whose
   air touches the lungs and breaks the lung mask).
2. Lung mask: air (< -400 HU) components not connected to the in-plane border of the volume (outside air
   and the table touch it), at least 10 % of the largest such component (drops bowel gas), closed with a
   5 x 5 x 3 box (fills vessels). Resampled CT, lung and tumour masks are cached as npz in the cache folder.
3. Nodule sites: the lung minus axial pieces under 1000 mm^2 (trachea, main bronchi, apex tips); a nodule
   of bounding radius R is centred at least R + 1 mm inside that region, so its exact mask lies in the lung.
4. Crops of the requested size are centred in the lung eroded by 5 mm and never touch the real tumour
   (its bounding box plus 10 mm). A nodule of bounding diameter 8-20 mm (limited by the crop), 0-60 HU,
   with smooth texture (sd 20 HU) and noise (sd 10 HU), soft edge 0.5 mm, lobulated with probability 0.5,
   is blended in with its centre at most 10 mm from the crop centre along each axis; the same crop without
   it is the paired negative (extra negatives get their own crops).

   Why 8 mm and near the centre (DESIGN.md says 3-20 mm anywhere in the crop): nodule-centred crops are the
   LIDC protocol of the DUE paper, and at 1.25 mm voxels a 3-5 mm nodule is a few voxels that look like a
   vessel cross-section. Measured on 48 + 48 training crops (ResNet18 widths 16-128, cross-entropy only,
   30 epochs): 3-20 mm anywhere, 10-20 mm anywhere, 8-20 mm anywhere and 3-20 mm within 10 mm of the centre
   all stayed at test ROC-AUC 0.50-0.55; 8-20 mm within 10 mm of the centre reached 0.91.
5. Intensities: HU clipped to [-1000, 400] and scaled linearly to [0, 1].

Splits are by CT subject and there are **only two subjects**: training and validation come from ``lung1``
(training crops in one half of the chest along X, validation crops in the other, so no training crop
overlaps a validation crop; the half with more room trains), test from ``lung2``. The two real tumours are
exported as crops centred on them in the section ``real_tumours`` (label 1, sparse annotation, full mask),
a sanity set that no training code reads.

Default size 64,64,32 voxels (80 x 80 x 80 mm), 96 positives and 96 negatives (48/24/24 each), every 3rd
nodule slice annotated.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from due_ext.data.builders.nodules import lesion_field, lesion_mask, random_lesion_shape, smooth_texture, soft_edge
from due_ext.data.builders.output import BuildSummary, StagedDataset, count_items, dataset_header
from due_ext.data.builders.splits import split_counts
from due_ext.data.cache import PYRADIOMICS_VERSION, cache_dir, fetch_pyradiomics_data
from due_ext.data.datalist import SECTIONS

DEFAULT_SIZE = (64, 64, 32)
DEFAULT_N_POS = 96
DEFAULT_N_NEG = 96
DEFAULT_EVERY_K = 3
SPACING = (1.25, 1.25, 2.5)
HU_WINDOW = (-1000.0, 400.0)
NODULE_DIAMETER_MM = (8.0, 20.0)
NODULE_HU = (0.0, 60.0)
#: Largest distance (mm, per axis) of a nodule's centre from its crop's centre; ``None``: anywhere in the crop.
NODULE_CENTRE_JITTER_MM: float | None = 10.0
SUBJECTS = ("lung1", "lung2")
#: Datalist section of the two real tumour crops.
REAL_TUMOURS = "real_tumours"
AIR_HU = -400.0
#: Bump when the preprocessing changes, so stale caches are not reused.
CACHE_VERSION = 2
#: Bump when the items a build produces change (nodule recipe, counts), so cached demo datasets are rebuilt.
DATASET_VERSION = 2

_MIN_SITE_AREA_MM2 = 1000.0
_CROP_CENTRE_DEPTH_MM = 5.0
_TUMOUR_MARGIN_MM = 10.0
_SITE_MARGIN_MM = 1.0


@dataclass
class ChestCT:
    """One resampled chest CT, arrays ``(X, Y, Z)`` on the :data:`SPACING` grid."""

    name: str
    hu: np.ndarray  # int16
    lung: np.ndarray  # bool
    tumour: np.ndarray  # bool, the real tumour from the label NRRD
    affine: np.ndarray  # voxel -> RAS mm (NIfTI convention)
    site_depth: np.ndarray  # float32 mm, see nodule_site_depth

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]

    def crop_affine(self, start: tuple[int, int, int]) -> np.ndarray:
        """Affine of the crop whose first voxel is ``start``."""
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ np.asarray(start, dtype=np.float64) + self.affine[:3, 3]
        return affine


def resampled_size(size: tuple[int, ...], spacing: tuple[float, ...], new_spacing: tuple[float, ...]) -> list[int]:
    """``(n - 1) * old // new + 1`` per axis: the new grid stays inside the old field of view."""
    return [int((n - 1) * old // new) + 1 for n, old, new in zip(size, spacing, new_spacing, strict=True)]


def _read_resampled(path: Path, spacing: tuple[float, float, float], label: bool):
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ValueError(f"{path}: SimpleITK cannot read it ({err}); delete the cache folder and rebuild") from err
    resampler = sitk.ResampleImageFilter()
    resampler.SetOutputSpacing(spacing)
    resampler.SetSize(resampled_size(image.GetSize(), image.GetSpacing(), spacing))
    resampler.SetOutputOrigin(image.GetOrigin())
    resampler.SetOutputDirection(image.GetDirection())
    resampler.SetInterpolator(sitk.sitkNearestNeighbor if label else sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0 if label else -1024)
    source = image if label else sitk.Cast(image, sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(resampler.Execute(source)).transpose(2, 1, 0)  # (Z,Y,X) -> (X,Y,Z)
    # NRRD/ITK is LPS, NIfTI is RAS: flip the sign of the first two world axes.
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ direction @ np.diag(spacing)
    affine[:3, 3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(image.GetOrigin())
    return array, affine


def lung_mask(hu: np.ndarray) -> np.ndarray:
    """Lung mask of a CT in HU ``(X, Y, Z)``: see step 2 of the module docstring."""
    air = hu < AIR_HU
    components, count = ndimage.label(air)
    if count == 0:
        raise ValueError("no air below -400 HU: is this a chest CT in Hounsfield units?")
    border = np.unique(np.concatenate([components[0].ravel(), components[-1].ravel(),
                                       components[:, 0].ravel(), components[:, -1].ravel()]))
    sizes = np.bincount(components.ravel(), minlength=count + 1).astype(np.int64)
    sizes[0] = 0
    sizes[border] = 0
    if sizes.max() == 0:
        raise ValueError("every air region touches the in-plane border: no lung found")
    keep = sizes >= 0.1 * sizes.max()
    keep[0] = False
    lung = keep[components]
    structure = np.ones((5, 5, 3), dtype=bool)
    pad = [(s // 2, s // 2) for s in structure.shape]
    # Pad so that closing does not erode lung voxels on the volume's faces.
    closed = ndimage.binary_closing(np.pad(lung, pad), structure=structure)
    return closed[pad[0][0]:-pad[0][1], pad[1][0]:-pad[1][1], pad[2][0]:-pad[2][1]]


def load_chest_ct(name: str, spacing: tuple[float, float, float] = SPACING) -> ChestCT:
    """Resampled CT, lung mask and real tumour of subject ``name`` (cached as npz after the first call)."""
    if name not in SUBJECTS:
        raise ValueError(f"unknown chest CT {name!r}; choices: {', '.join(SUBJECTS)}")
    cached = cache_dir() / "lung_ct" / f"{name}_{'x'.join(f'{s:g}' for s in spacing)}mm_v{CACHE_VERSION}.npz"
    if cached.is_file():
        try:
            with np.load(cached) as data:
                return ChestCT(name, data["hu"], data["lung"].astype(bool), data["tumour"].astype(bool),
                               data["affine"], data["site_depth"])
        except (OSError, ValueError, KeyError):
            cached.unlink()  # corrupt cache: rebuild it below
    folder = fetch_pyradiomics_data()
    hu, affine = _read_resampled(folder / f"{name}_image.nrrd", spacing, label=False)
    tumour, _ = _read_resampled(folder / f"{name}_label.nrrd", spacing, label=True)
    hu = np.round(hu).astype(np.int16)
    lung = lung_mask(hu)
    ct = ChestCT(name, hu, lung, tumour > 0, affine, nodule_site_depth(lung, spacing))
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.stem}.{uuid.uuid4().hex[:8]}.tmp.npz")
    np.savez_compressed(tmp, hu=ct.hu, lung=ct.lung, tumour=ct.tumour, affine=ct.affine, site_depth=ct.site_depth)
    tmp.replace(cached)
    return ct


def acquired_slice_spacing(name: str) -> float:
    """Slice spacing (mm) of subject ``name`` as acquired (the NRRD's Z spacing; 5 mm for lung1 and lung2).
    The cached grid starts on the first acquired slice, so acquired slices lie at multiples of it."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(fetch_pyradiomics_data() / f"{name}_image.nrrd"))
    reader.ReadImageInformation()
    return float(reader.GetSpacing()[2])


def nodule_site_depth(lung: np.ndarray, spacing: tuple[float, float, float] = SPACING) -> np.ndarray:
    """Depth (mm) of every voxel inside the nodule-site region of a lung mask (step 3); 0 outside it."""
    region = lung.copy()
    min_voxels = _MIN_SITE_AREA_MM2 / (spacing[0] * spacing[1])
    for z in range(region.shape[2]):
        pieces, count = ndimage.label(region[:, :, z])
        if count:
            areas = np.bincount(pieces.ravel())
            small = np.nonzero(areas < min_voxels)[0]
            region[:, :, z] &= ~np.isin(pieces, small[small > 0])
    return ndimage.distance_transform_edt(region, sampling=spacing).astype(np.float32)


def hu_to_unit(hu: np.ndarray) -> np.ndarray:
    """HU clipped to :data:`HU_WINDOW` and scaled to [0, 1] (float32)."""
    low, high = HU_WINDOW
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def crop_starts(ct: ChestCT, size: tuple[int, int, int], half: str | None = None,
                spacing: tuple[float, float, float] = SPACING, step: int = 2) -> np.ndarray:
    """First voxels ``(N, 3)`` of valid crops: centred in the eroded lung, inside the volume, away from the
    real tumour, and if ``half`` is ``"low"``/``"high"`` entirely on that side of the lung's mid-X plane.
    Centres are taken on a grid of ``step`` voxels.
    """
    shape = np.asarray(ct.shape)
    size_arr = np.asarray(size)
    if np.any(size_arr > shape):
        raise ValueError(f"crop size {tuple(size)} exceeds the resampled CT {ct.name} of shape {ct.shape}")
    grid = np.zeros(ct.shape, dtype=bool)
    grid[::step, ::step, ::step] = True
    centres = np.argwhere(grid & (ct.site_depth >= _CROP_CENTRE_DEPTH_MM))
    starts = centres - size_arr // 2
    ok = np.all(starts >= 0, axis=1) & np.all(starts + size_arr <= shape, axis=1)
    box = tumour_box(ct, spacing)
    if box is not None:
        low, high = box
        overlaps = np.all((starts <= high) & (starts + size_arr > low), axis=1)
        ok &= ~overlaps
    if half is not None:
        mid = lung_mid_x(ct)
        ok &= (starts[:, 0] + size_arr[0] <= mid) if half == "low" else (starts[:, 0] >= mid)
    return starts[ok]


def tumour_box(ct: ChestCT, spacing: tuple[float, float, float] = SPACING) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last voxel (inclusive) of the real tumour's bounding box grown by 10 mm; ``None`` without one.
    No crop may overlap it."""
    if not ct.tumour.any():
        return None
    margin = np.ceil(_TUMOUR_MARGIN_MM / np.asarray(spacing)).astype(int)
    where = np.argwhere(ct.tumour)
    return where.min(axis=0) - margin, where.max(axis=0) + margin


def lung_mid_x(ct: ChestCT) -> int:
    """The X index that splits the lung's X extent in two halves (``low``: below it, ``high``: from it on)."""
    xs = np.nonzero(ct.lung.any(axis=(1, 2)))[0]
    return int((xs[0] + xs[-1] + 1) // 2)


def insert_nodule(rng: np.random.Generator, hu: np.ndarray, depth: np.ndarray,
                  spacing: tuple[float, float, float] = SPACING,
                  centre_jitter_mm: float | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Blend a random nodule into the HU crop ``hu``; returns ``(hu_with_nodule, exact_mask)``.

    ``depth`` is :func:`nodule_site_depth` on the same crop. Returns ``None`` if no site in the crop can
    hold the drawn nodule entirely inside both the crop and the lung.
    """
    size = np.asarray(hu.shape)
    spacing_arr = np.asarray(spacing)
    largest = min(NODULE_DIAMETER_MM[1], float((size * spacing_arr).min()) - 2 * float(spacing_arr.max()))
    if largest < NODULE_DIAMETER_MM[0]:
        return None
    diameter = rng.uniform(NODULE_DIAMETER_MM[0], largest)
    radius = 0.5 * diameter
    inset = np.ceil(radius / spacing_arr).astype(int) + 1
    inner = np.zeros(hu.shape, dtype=bool)
    inner[inset[0]:size[0] - inset[0], inset[1]:size[1] - inset[1], inset[2]:size[2] - inset[2]] = True
    if centre_jitter_mm is not None:
        # Nodule-centred crops (the LIDC protocol): the centre may move at most this far from the crop centre.
        offset = (np.indices(hu.shape).transpose(1, 2, 3, 0) - (size - 1) / 2.0) * spacing_arr
        inner &= np.all(np.abs(offset) <= centre_jitter_mm, axis=-1)
    sites = np.argwhere(inner & (depth >= radius + _SITE_MARGIN_MM))
    if len(sites) == 0:
        return None
    centre = sites[rng.integers(len(sites))] * spacing_arr
    shape = random_lesion_shape(rng, diameter, tuple(centre), elongation=(0.75, 1.0), lobulated_probability=0.5)
    field_mm = lesion_field(shape, hu.shape, spacing)
    # depth > 0 is the site region, a subset of the lung; the depth margin already keeps the nodule inside.
    mask = lesion_mask(field_mm) & (depth > 0)
    return blend_nodule(rng, hu, field_mm), mask.astype(np.uint8)


def blend_nodule(rng: np.random.Generator, hu: np.ndarray, field_mm: np.ndarray) -> np.ndarray:
    """``hu`` with a nodule of signed distance ``field_mm`` blended in (step 4 of the module docstring): a soft
    edge of 0.5 mm, a random density in :data:`NODULE_HU`, texture sd 20 HU and noise sd 10 HU."""
    alpha = soft_edge(field_mm, 0.5)
    nodule = (rng.uniform(*NODULE_HU) + 20.0 * smooth_texture(rng, hu.shape, 1.0)
              + 10.0 * rng.normal(size=hu.shape))
    return hu * (1.0 - alpha) + alpha * nodule


def crop(array: np.ndarray, start: tuple[int, int, int] | np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """``array[start : start + size]`` along the three axes."""
    x, y, z = (int(s) for s in start)
    return array[x:x + size[0], y:y + size[1], z:z + size[2]]


def tumour_crop_start(ct: ChestCT, size: tuple[int, int, int]) -> np.ndarray:
    """First voxel of the crop centred on the real tumour's centroid, shifted to lie inside the volume."""
    centre = np.round(np.argwhere(ct.tumour).mean(axis=0)).astype(int)
    start = centre - np.asarray(size) // 2
    return np.clip(start, 0, np.asarray(ct.shape) - np.asarray(size))


def _split_crops(cts: dict[str, ChestCT],
                 size: tuple[int, int, int]) -> tuple[dict[str, tuple[ChestCT, np.ndarray]], list[str]]:
    """Crop starts per split (training/validation: the two X halves of lung1; test: lung2) and notes."""
    lung1, lung2 = cts["lung1"], cts["lung2"]
    notes = ["only two CT subjects: training and validation crops come from lung1, test crops from lung2"]
    halves = {half: crop_starts(lung1, size, half) for half in ("low", "high")}
    if len(halves["low"]) and len(halves["high"]):
        train_half = "low" if len(halves["low"]) >= len(halves["high"]) else "high"
        val_half = "high" if train_half == "low" else "low"
        train, val = halves[train_half], halves[val_half]
        notes.append(f"lung1 training crops lie in its {train_half}-X half, validation crops in the {val_half}-X "
                     "half (no overlap)")
    else:
        train = val = crop_starts(lung1, size)
        notes.append(f"crop size {size} does not fit in one half of lung1: training and validation crops may "
                     "overlap")
    test = crop_starts(lung2, size)
    for section, starts, ct in (("training", train, lung1), ("validation", val, lung1), ("test", test, lung2)):
        if len(starts) == 0:
            raise ValueError(f"no {section} crop of size {size} (voxels of {SPACING} mm) fits in {ct.name} "
                             f"(shape {ct.shape}) centred in its lung and away from its real tumour; "
                             "choose a smaller --size")
    notes.append("negatives reuse the crops of the positives of their split (same background, no nodule)")
    return {"training": (lung1, train), "validation": (lung1, val), "test": (lung2, test)}, notes


def build_lung_ct(out: str | os.PathLike, n_pos: int = DEFAULT_N_POS, n_neg: int = DEFAULT_N_NEG,
                  size: tuple[int, int, int] = DEFAULT_SIZE, every_k: int = DEFAULT_EVERY_K,
                  seed: int = 0) -> BuildSummary:
    """Build the lung-CT dataset into ``out``; downloads the CTs on first use (see the module docstring)."""
    started = time.perf_counter()
    pos_counts = split_counts(n_pos, "positives")
    neg_counts = split_counts(n_neg, "negatives")
    cts = {name: load_chest_ct(name) for name in SUBJECTS}
    sources, notes = _split_crops(cts, size)
    with StagedDataset(out) as staged, tqdm(total=n_pos + n_neg + len(SUBJECTS), desc="lung-ct",
                                            unit="volume") as bar:
        for section in SECTIONS:
            ct, starts = sources[section]
            positive_starts = []
            for index in range(pos_counts[section]):
                rng = np.random.default_rng([seed, SECTIONS.index(section), 1, index])
                for _ in range(100):
                    start = starts[rng.integers(len(starts))]
                    inserted = insert_nodule(rng, crop(ct.hu, start, size).astype(np.float64),
                                             crop(ct.site_depth, start, size),
                                             centre_jitter_mm=NODULE_CENTRE_JITTER_MM)
                    if inserted is not None:
                        break
                else:
                    raise ValueError(f"could not place a nodule in 100 {section} crops of {ct.name} of size "
                                     f"{size}; choose a larger --size")
                hu, mask = inserted
                staged.add_item(section, f"{section}_pos_{index:03d}", hu_to_unit(hu), ct.crop_affine(start), 1,
                                mask=mask, every_k=every_k,
                                extra={"subject": ct.name, "crop_start": [int(s) for s in start]})
                positive_starts.append(start)
                bar.update()
            for index in range(neg_counts[section]):
                if index < len(positive_starts):
                    start = positive_starts[index]
                else:
                    rng = np.random.default_rng([seed, SECTIONS.index(section), 0, index])
                    start = starts[rng.integers(len(starts))]
                staged.add_item(section, f"{section}_neg_{index:03d}", hu_to_unit(crop(ct.hu, start, size)),
                                ct.crop_affine(start), 0,
                                extra={"subject": ct.name, "crop_start": [int(s) for s in start]})
                bar.update()
        for name, ct in cts.items():
            start = tumour_crop_start(ct, size)
            staged.add_item(REAL_TUMOURS, f"real_tumour_{name}", hu_to_unit(crop(ct.hu, start, size)),
                            ct.crop_affine(start), 1, mask=crop(ct.tumour, start, size), every_k=every_k,
                            extra={"subject": name, "crop_start": [int(s) for s in start]})
            bar.update()
        notes.append(f"section '{REAL_TUMOURS}' holds the two real tumours (pyradiomics labels): a sanity set, "
                     "never trained on")
        parameters = {"n_pos": n_pos, "n_neg": n_neg, "size": list(size), "every_k": every_k, "seed": seed,
                      "spacing_mm": list(SPACING), "hu_window": list(HU_WINDOW),
                      "nodule_diameter_mm": list(NODULE_DIAMETER_MM), "nodule_hu": list(NODULE_HU),
                      "nodule_centre_jitter_mm": NODULE_CENTRE_JITTER_MM,
                      "source": f"pyradiomics=={PYRADIOMICS_VERSION} sdist, data/lung1 and data/lung2"}
        header = dataset_header("lung-ct", "Chest-CT crops (pyradiomics lung1/lung2, resampled) with inserted "
                                "synthetic nodules and exact masks (due_ext.data.builders.lung_ct). Image "
                                "provenance undocumented upstream: demo use only.", "CT", parameters, notes)
        path = staged.commit(header)
        counts = count_items(staged.sections)
        files = staged.files
    return BuildSummary("lung-ct", path, counts, size, SPACING, files, time.perf_counter() - started, notes)
