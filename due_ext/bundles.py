"""What bundle configs call to find their folder and their data, so the configs only wire.

- :func:`bundle_root` — the repository's ``bundles/<name>`` folder, so that
  ``python -m monai.bundle run --config_file bundles/due/train.json`` works from any working directory
  (override with ``--bundle_root``).
- :func:`demo_datalist` — the embedded default data: builds a demo dataset into the cache on first use and
  returns its ``datalist.json``; later calls reuse it.
- What each method needs: :data:`METHOD_KEYS` (derived volumes, :func:`prepared_datalist`) and
  :func:`classical_fill` (the fill its preprocessing adds).
- Training settings built from plain keys: :func:`lr_scheduler`, :func:`training_augmentation`,
  :func:`metric_comparison`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger("due_ext.bundles")


def repository_root() -> Path:
    """The folder holding ``bundles/`` (the source checkout of an editable install)."""
    return Path(__file__).resolve().parents[1]


def bundle_root(name: str) -> str:
    """``<repository>/bundles/<name>``; raises with a hint when this install has no bundles folder."""
    path = repository_root() / "bundles" / name
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: bundle folder not found (due_ext is not an editable install of the "
                                "repository?); pass --bundle_root PATH to monai.bundle")
    return str(path)


def demo_datalist(name: str = "lung-ct", seed: int = 0, size: str | None = None, n_pos: int | None = None,
                  n_neg: int | None = None, every_k: int | None = None, root: str | None = None,
                  val_fraction: float | None = None, margin: list[float] | None = None,
                  jitter: float | None = None) -> str:
    """Path of the ``datalist.json`` of a demo dataset built with these parameters (built on first use).

    The dataset lives in ``<cache>/datasets/<name>-<hash of the parameters>`` (``root`` overrides the
    folder), so different parameters never overwrite each other and a finished build is reused.
    """
    from due_ext.data.builders import build_dataset, builder_module
    from due_ext.data.cache import cache_dir

    params = {"name": name, "seed": seed, "size": size, "n_pos": n_pos, "n_neg": n_neg, "every_k": every_k,
              "version": builder_module(name).DATASET_VERSION}
    if val_fraction is not None:  # only when given: the folders of datasets built before the option keep their key
        params["val_fraction"] = float(val_fraction)
    if margin is not None:
        params["margin"] = [float(v) for v in margin]
    if jitter is not None:
        params["jitter"] = float(jitter)
    if root is None:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        folder = cache_dir() / "datasets" / f"{name}-{digest}"
    else:
        folder = Path(root)
    datalist = folder / "datalist.json"
    if not datalist.is_file():
        logger.info("building the %s demo dataset into %s", name, folder)
        print(build_dataset(name, folder, n_pos=n_pos, n_neg=n_neg, size=size, every_k=every_k, seed=seed,
                            val_fraction=val_fraction, margin=margin, jitter=jitter))
    return str(datalist)


#: Derived volume keys each explanation-supervision method reads (besides image/annotation and the evaluation
#: mask). All come from one derivation with the shipped upstream models (:func:`derive_method_keys`).
METHOD_KEYS = {
    "due": ("interpolation", "weights"),
    "diffusion_fill": ("interpolation",),
    "due_diffusion_variance": ("interpolation", "diffusion_weights"),
}
#: Classical fill of the annotation each method's preprocessing adds (``ClassicalFilld``); others: ``nearest``.
METHOD_FILLS = {"sdf_fill": "sdf"}


def classical_fill(method: str) -> str:
    """The :mod:`due_ext.interp.classical` method whose fill ``method`` supervises with (``nearest`` unless
    :data:`METHOD_FILLS` says otherwise: ``baseline_plus`` and ``rrr`` read the nearest fill)."""
    return METHOD_FILLS.get(method, "nearest")


def method_volume_keys(method: str) -> list[str]:
    """Volume keys the loading transforms need for ``method`` (``image`` first)."""
    from due_ext.explain.supervision import METHODS

    if method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; choose one of {', '.join(METHODS)}")
    return ["image", "annotation", *METHOD_KEYS.get(method, ()), "mask"]


def _run_bundle_component(name: str, config: str, component: str, overrides: dict) -> str:
    """Build ``component`` of ``bundles/<name>/<config>`` with ``overrides`` and call its ``run()``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(bundle_root(name)) / config))
    parser.update(overrides)
    parser.parse()
    return str(parser.get_parsed_content(component).run())


#: Part of the derived-folder key besides the checkpoints: bump it when the derived numbers change without a new
#: checkpoint, so no folder written by older code is reused. 2: the neural process's inference speed-ups (451831c)
#: moved the weights by up to 6e-5, enough to change a DUE training run (bundles/due/docs/README.md). 3: items are
#: derived in fixed units of 4 (due_ext.data.shards) instead of one batch, which moved values by up to 5e-6.
DERIVATION_VERSION = 3


def derived_folder(datalist: str | Path, sections: tuple[str, ...]) -> Path:
    """``<datalist folder>/derived-<key>``: the key hashes both shipped checkpoints, ``sections`` and
    :data:`DERIVATION_VERSION`."""
    digest = hashlib.sha1()
    for name in ("interpolator", "uncertainty"):
        digest.update((Path(bundle_root(name)) / "models" / "model.pt").read_bytes())
    digest.update(json.dumps(sorted(sections)).encode())
    digest.update(f"derivation {DERIVATION_VERSION}".encode())
    return Path(datalist).resolve().parent / f"derived-{digest.hexdigest()[:10]}"


def derive_uncertainty_keys(datalist: str, sections: tuple[str, ...] = ("training", "validation"),
                            normalization: str = "block") -> str:
    """Add DUE's derived keys to ``datalist`` with the shipped upstream models; returns the new datalist.

    Runs the interpolator bundle's inference (``interpolation``, diffusion mean of the repeats) and then the
    uncertainty bundle's inference (``variance`` from the neural process and ``weights`` mapped with
    ``normalization``: ``"block"``, ``"volume"`` or ``"absolute"``) on ``sections``, through their own
    ``inference.json`` (so the network definitions have one home). Results go to
    ``<datalist folder>/derived-<key>/`` (:func:`derived_folder`): ``interpolator/``, and
    ``uncertainty/`` for the default mapping or ``uncertainty-<normalization>/`` for another one, so every
    mapping shares one interpolation (it does not depend on the mapping). Finished steps are reused.
    """
    from due_ext.data.shards import broken_receipts

    folder = derived_folder(datalist, sections)
    final = folder / ("uncertainty" if normalization == "block" else f"uncertainty-{normalization}") / "datalist.json"
    broken = [path for step in (folder / "interpolator", final.parent) for path in broken_receipts(step / "units")]
    if final.is_file() and not broken:
        return str(final)
    if broken:  # a corrupted cache: the steps below derive the broken units again and reuse the rest
        logger.warning("derived files changed or missing (%s): deriving them again", ", ".join(map(str, broken)))
    logger.info("deriving interpolation and uncertainty weights for %s into %s", datalist, folder)
    interpolated = folder / "interpolator" / "datalist.json"  # written last: present = complete
    if not interpolated.is_file() or any(path.parent.parent == interpolated.parent for path in broken):
        interpolated = Path(_run_bundle_component("interpolator", "inference.json", "interpolation", {
            "datalist": str(Path(datalist).resolve()), "output_dir": str(interpolated.parent),
            "sections": list(sections)}))
    return _run_bundle_component("uncertainty", "inference.json", "inference", {
        "datalist": str(interpolated), "output_dir": str(final.parent), "sections": list(sections),
        "normalization": normalization})


def add_diffusion_weights(datalist: str | Path, interpolated: str | Path, output_dir: str | Path,
                          sections: tuple[str, ...], normalization: str = "block") -> str:
    """Add ``diffusion_weights`` to the annotated items of ``datalist``: the variance of the diffusion repeats
    (``variance`` in the interpolator's datalist ``interpolated``) mapped to weights exactly as DUE maps the neural
    process's (:func:`due_ext.uncertainty.weights.uncertainty_weights`, same ``normalization``). Writes
    ``diffusion_weights/<item>.nii.gz`` and ``datalist.json`` (last) into ``output_dir``; returns the datalist's
    path. Derived in units like the upstream bundles (:mod:`due_ext.data.shards`), so it resumes and shards."""
    from due_ext.data import schema
    from due_ext.data.annotated_items import collect_annotated_items, derive_datalist
    from due_ext.data.nifti import read_nifti, write_nifti
    from due_ext.uncertainty.weights import uncertainty_weights

    output_dir = Path(output_dir)
    payload, todo = collect_annotated_items(datalist, sections)
    variances = {item.name: item.entry.get(schema.VARIANCE) for item in collect_annotated_items(interpolated,
                                                                                                 sections)[1]}
    missing = [item.name for item in todo if not variances.get(item.name)]
    if missing:
        raise ValueError(f"{interpolated}: no diffusion variance for {', '.join(missing[:5])}; derive it with the "
                         "interpolator bundle (bundles/interpolator/inference.json)")

    def map_unit(unit: range) -> list[dict[str, str]]:
        entries = []
        for item in (todo[i] for i in unit):
            variance, _ = read_nifti(variances[item.name])
            weights = uncertainty_weights(variance, item.slices, normalization=normalization)
            path = write_nifti(output_dir / schema.DIFFUSION_WEIGHTS / f"{item.name}.nii.gz", weights, item.affine)
            entries.append({schema.DIFFUSION_WEIGHTS: str(Path(path).resolve())})
        return entries

    return str(derive_datalist(payload, todo, map_unit, output_dir))


def derive_method_keys(datalist: str, sections: tuple[str, ...] = ("training", "validation"),
                       normalization: str = "block") -> str:
    """Every derived key of :data:`METHOD_KEYS` on ``sections`` of ``datalist``, with the shipped upstream models:
    DUE's ``interpolation`` and ``weights`` (:func:`derive_uncertainty_keys`) and ``diffusion_weights``
    (:func:`add_diffusion_weights`), in ``<derived folder>/diffusion-weights[-<normalization>]/datalist.json``.
    One datalist for every method, so an experiment prepares its data once whatever methods it runs."""
    from due_ext.data.shards import broken_receipts

    folder = derived_folder(datalist, sections)
    step = folder / ("diffusion-weights" if normalization == "block" else f"diffusion-weights-{normalization}")
    # first the upstream steps: they verify (and re-derive) their own files, which this step's datalist names too
    uncertain = derive_uncertainty_keys(datalist, sections, normalization)
    if (step / "datalist.json").is_file() and not broken_receipts(step / "units"):
        return str(step / "datalist.json")
    return add_diffusion_weights(uncertain, folder / "interpolator" / "datalist.json", step, sections,
                                 normalization)


def prepared_datalist(datalist: str, method: str, derive: bool = True, normalization: str = "block") -> str:
    """The datalist ``method`` trains on: ``datalist`` itself when every annotated positive of the training
    and validation sections already has the keys the method needs (:data:`METHOD_KEYS`); otherwise, with
    ``derive``, the datalist :func:`derive_method_keys` writes (every derived key, from the shipped interpolator and
    uncertainty models, weights mapped with ``normalization``); without ``derive``, an error naming what is
    missing.
    """
    from due_ext.data.datalist import read_datalist

    needed = METHOD_KEYS.get(method, ())
    if not needed:
        return datalist
    payload = read_datalist(datalist)
    missing = sorted({key for section in ("training", "validation") for item in payload.get(section, [])
                      if item.get("label") == 1 and "annotation" in item for key in needed if key not in item})
    if not missing:
        return datalist
    if derive:
        return derive_method_keys(datalist, normalization=normalization)
    raise ValueError(f"{datalist}: method {method!r} needs {missing} on every annotated positive. Produce them "
                     "with the interpolator and uncertainty bundles' inference configs "
                     "(bundles/interpolator/inference.json, bundles/uncertainty/inference.json) or let the DUE "
                     "bundle derive them (derive=True), or pick another method (--method baseline_plus)")


def require_inputs(files: list[str], where: str) -> None:
    """Fail loudly when an inference run found no input volume."""
    if not files:
        raise FileNotFoundError(f"{where}: no NIfTI volume (*.nii, *.nii.gz) to run inference on; pass --input_dir")


#: Learning-rate schedules of :func:`lr_scheduler`.
LR_SCHEDULES = ("constant", "cosine")


def lr_scheduler(optimizer: Any, schedule: str = "constant", max_epochs: int = 1, warmup_epochs: int = 0,
                 warmup_start: float = 0.1) -> Any:
    """A torch learning-rate scheduler stepped once per epoch (MONAI ``LrScheduleHandler``, ``epoch_level``).

    ``warmup_epochs`` epochs rise linearly from ``warmup_start`` times the optimizer's rate to the full rate
    (``LinearLR``), then ``schedule``: ``"constant"`` keeps it, ``"cosine"`` decays it to 0 over the remaining
    epochs (``CosineAnnealingLR``). A run shorter than its warm-up (a one-epoch smoke test of a profile) trains at
    the warm-up's rates. The scheduler has a state dict: the training checkpoint holds it, so a
    resumed run continues the schedule where it stopped.
    """
    from torch.optim import lr_scheduler as schedulers

    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if warmup_epochs < 0 or max_epochs < 1:
        raise ValueError(f"warmup_epochs must be >= 0 and max_epochs >= 1, got {warmup_epochs} and {max_epochs}")
    if not 0.0 < warmup_start <= 1.0:
        raise ValueError(f"warmup_start must lie in (0, 1], got {warmup_start}")
    if schedule == "cosine":
        main = schedulers.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs - warmup_epochs))
    else:
        main = schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_epochs == 0:
        return main
    warmup = schedulers.LinearLR(optimizer, start_factor=warmup_start, end_factor=1.0, total_iters=warmup_epochs)
    return schedulers.SequentialLR(optimizer, [warmup, main], milestones=[warmup_epochs])


def metric_comparison(ties: str = "first") -> Callable[[float, float], bool]:
    """The evaluator's ``metric_cmp_fn``: is the current key metric a new best? ``"first"``: only when strictly
    better (the earliest of equally good epochs is kept, MONAI's default); ``"last"``: also when equal, so the
    latest of equally good epochs is kept. ``"last"`` matters when the validation metric saturates (PR-AUC 1.0
    from the second epoch on an easy set): the first epoch to reach it may rank every case right while still
    predicting one class for all, and explanations are of the predicted class."""
    import operator

    if ties not in ("first", "last"):
        raise ValueError(f"best_ties must be 'first' or 'last', got {ties!r}")
    return operator.gt if ties == "first" else operator.ge


#: Keys of the ``augmentation`` mapping of :func:`training_augmentation` and their meaning.
AUGMENTATION_KEYS = {
    "flip": "probability of a flip along each axis",
    "rotate_deg": "largest in-plane rotation (about Z), degrees",
    "scale": "largest in-plane zoom in or out, as a fraction",
    "affine_prob": "probability of the in-plane rotation and zoom",
    "intensity": "largest intensity scale and shift, as a fraction of the [0, 1] range",
    "noise_std": "standard deviation of the Gaussian noise added to the image (probability 0.5)",
}


def training_augmentation(method: str, augmentation: dict[str, float] | None) -> list[Any]:
    """MONAI random transforms for the training items of ``method`` (empty when ``augmentation`` is ``None``).

    Spatial steps move the image and every explanation volume of the item together: flips along each axis, an
    in-plane rotation and zoom (about Z only, so every axial slice stays one slice: the annotation lives on whole
    drawn slices and ``annotated_mask`` marks them). Masks are resampled with nearest neighbour and zero padding,
    soft maps bilinearly; the image, ``annotated_mask`` and the weights are padded with their border values.
    Intensity steps (scale, shift, noise) touch the image only. The random state is the dataset's, which
    :class:`due_ext.engines.EpochSeeder` reseeds each epoch.
    """
    import math

    from monai.transforms import (
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    from due_ext.data import schema
    from due_ext.data.transforms import ANNOTATED_MASK
    from due_ext.interp.transforms import fill_key

    if augmentation is None:
        return []
    unknown = sorted(set(augmentation) - set(AUGMENTATION_KEYS))
    if unknown:
        raise ValueError(f"augmentation: unknown key {unknown[0]!r}; allowed: {', '.join(AUGMENTATION_KEYS)}")
    settings = {"flip": 0.0, "rotate_deg": 0.0, "scale": 0.0, "affine_prob": 0.0, "intensity": 0.0,
                "noise_std": 0.0, **{k: float(v) for k, v in augmentation.items()}}
    derived = METHOD_KEYS.get(method, ())
    masks = [schema.ANNOTATION, schema.MASK, fill_key(classical_fill(method))]
    lesion_maps = [*masks, *(k for k in derived if k == schema.INTERPOLATION)]  # padded with "no lesion"
    keys = [schema.IMAGE, ANNOTATED_MASK, *(k for k in derived if k not in lesion_maps), *lesion_maps]
    modes = ["nearest" if k in (*masks, ANNOTATED_MASK) else "bilinear" for k in keys]
    padding = ["zeros" if k in lesion_maps else "border" for k in keys]
    steps: list[Any] = []
    if settings["flip"] > 0:
        steps += [RandFlipd(keys, prob=settings["flip"], spatial_axis=axis, allow_missing_keys=True)
                  for axis in range(3)]
    if settings["affine_prob"] > 0 and (settings["rotate_deg"] > 0 or settings["scale"] > 0):
        angle = math.radians(settings["rotate_deg"])
        steps.append(RandAffined(keys, prob=settings["affine_prob"], rotate_range=(0.0, 0.0, angle),
                                 scale_range=(settings["scale"], settings["scale"], 0.0), mode=modes,
                                 padding_mode=padding, allow_missing_keys=True))
    if settings["intensity"] > 0:
        steps += [RandScaleIntensityd(schema.IMAGE, factors=settings["intensity"], prob=0.5),
                  RandShiftIntensityd(schema.IMAGE, offsets=settings["intensity"], prob=0.5)]
    if settings["noise_std"] > 0:
        steps.append(RandGaussianNoised(schema.IMAGE, std=settings["noise_std"], prob=0.5))
    return steps


def training_transforms(preprocessing: Any, method: str, augmentation: dict[str, float] | None = None) -> Any:
    """The training chain: ``preprocessing`` then :func:`training_augmentation`, flattened into one ``Compose``
    so that ``CacheDataset`` caches everything before the first random step (it does not look inside a nested
    ``Compose``, which it takes for a random transform)."""
    from monai.transforms import Compose

    return Compose([preprocessing, *training_augmentation(method, augmentation)]).flatten()
