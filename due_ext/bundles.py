"""What bundle configs call to find their folder and their data, so the configs only wire.

- :func:`bundle_root` — the repository's ``bundles/<name>`` folder, so that
  ``python -m monai.bundle run --config_file bundles/due/train.json`` works from any working directory
  (override with ``--bundle_root``).
- :func:`demo_datalist` — the embedded default data: builds a demo dataset into the cache on first use and
  returns its ``datalist.json``; later calls reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

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
                  n_neg: int | None = None, every_k: int | None = None, root: str | None = None) -> str:
    """Path of the ``datalist.json`` of a demo dataset built with these parameters (built on first use).

    The dataset lives in ``<cache>/datasets/<name>-<hash of the parameters>`` (``root`` overrides the
    folder), so different parameters never overwrite each other and a finished build is reused.
    """
    from due_ext.data.builders import build_dataset, builder_module
    from due_ext.data.cache import cache_dir

    params = {"name": name, "seed": seed, "size": size, "n_pos": n_pos, "n_neg": n_neg, "every_k": every_k,
              "version": builder_module(name).DATASET_VERSION}
    if root is None:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
        folder = cache_dir() / "datasets" / f"{name}-{digest}"
    else:
        folder = Path(root)
    datalist = folder / "datalist.json"
    if not datalist.is_file():
        logger.info("building the %s demo dataset into %s", name, folder)
        print(build_dataset(name, folder, n_pos=n_pos, n_neg=n_neg, size=size, every_k=every_k, seed=seed))
    return str(datalist)


#: Volume keys each explanation-supervision method reads (besides image/annotation and the evaluation mask).
METHOD_KEYS = {"due": ("interpolation", "weights")}


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
#: derived in fixed units of 8 (due_ext.data.shards) instead of one batch, which moved values by up to 5e-6.
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


def prepared_datalist(datalist: str, method: str, derive: bool = True, normalization: str = "block") -> str:
    """The datalist ``method`` trains on: ``datalist`` itself when every annotated positive of the training
    and validation sections already has the keys the method needs; otherwise, with ``derive``, the datalist
    :func:`derive_uncertainty_keys` writes (DUE's ``interpolation`` and ``weights`` from the shipped
    interpolator and uncertainty models, weights mapped with ``normalization``); without ``derive``, an error
    naming what is missing.
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
        return derive_uncertainty_keys(datalist, normalization=normalization)
    raise ValueError(f"{datalist}: method {method!r} needs {missing} on every annotated positive. Produce them "
                     "with the interpolator and uncertainty bundles' inference configs "
                     "(bundles/interpolator/inference.json, bundles/uncertainty/inference.json) or let the DUE "
                     "bundle derive them (derive=True), or pick another method (--method baseline_plus)")


def require_inputs(files: list[str], where: str) -> None:
    """Fail loudly when an inference run found no input volume."""
    if not files:
        raise FileNotFoundError(f"{where}: no NIfTI volume (*.nii, *.nii.gz) to run inference on; pass --input_dir")
