"""The data of an experiment: one base datalist (prepared once for every method) and per-(size, seed) training
subsets written beside the results.

Why prepare once: ``due`` needs ``interpolation``/``weights``, which :func:`due_ext.bundles.prepared_datalist`
derives with the diffusion interpolator and caches next to the datalist it is given. Deriving on the full
datalist and cutting subsets from the derived one means every subset already carries the keys, so the bundle uses
it as is and nothing is recomputed per cell.

A subset names its volumes relative to the data root (:func:`due_ext.experiments.paths.data_root`), recorded in
its ``subset`` entry in portable form with the base datalist relative to it, so a committed subset holds no
absolute path. A cell trains on :func:`resolved_datalist`, a machine-local copy with absolute paths inside its
(git-ignored) run folder, so the bundle reads it whatever folder it resolves relative paths against.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

from due_ext.data.schema import VOLUME_KEYS

logger = logging.getLogger("due_ext.experiments")

#: Sections copied unchanged into every subset (the training section is the one that is cut).
KEPT_SECTIONS = ("validation", "test")


def base_datalist(dataset: dict[str, Any] | None = None, datalist: str | None = None,
                  methods: list[str] | tuple[str, ...] = (), weight_normalization: str = "block") -> str:
    """The datalist every cell's subset is cut from: ``datalist`` or the demo dataset ``dataset`` describes,
    prepared for every method in ``methods`` (DUE's derived keys added once when one of them needs them, its
    weights mapped with ``weight_normalization``)."""
    from due_ext.bundles import METHOD_KEYS, demo_datalist, prepared_datalist

    path = datalist if datalist is not None else demo_datalist(**(dataset or {}))
    for method in methods:
        if METHOD_KEYS.get(method):
            return prepared_datalist(path, method, normalization=weight_normalization)
    return path


def _volumes(payload: dict[str, Any]) -> list[str]:
    return [item[key] for items in payload.values() if isinstance(items, list) for item in items
            for key in VOLUME_KEYS if isinstance(item.get(key), str)]


def _relative(item: dict[str, Any], folder: Path, root: Path) -> dict[str, Any]:
    """``item`` with each volume (absolute, or relative to ``folder``) relative to ``root``."""
    out = dict(item)
    for key in VOLUME_KEYS:
        if isinstance(out.get(key), str):
            out[key] = (folder / out[key]).resolve().relative_to(root).as_posix()
    return out


def subset_root(base: str) -> Path:
    """The data root of the subsets cut from ``base``: the deepest folder holding it and all its volumes."""
    from due_ext.experiments.paths import data_root

    return data_root(base, _volumes(json.loads(Path(base).read_text())))


def training_subset(items: list[dict[str, Any]], size: int | None, seed: int) -> list[dict[str, Any]]:
    """``size/2`` positives and ``size/2`` negatives drawn with ``seed`` (all items when ``size`` is None).

    Each class is shuffled once per seed and its first ``size/2`` items are taken, so for one seed the subsets
    of different sizes are nested (50 contains 20): a sample-size curve then measures more data, not other data.
    """
    if size is None:
        return list(items)
    chosen = []
    for label in (1, 0):
        pool = [item for item in items if item.get("label") == label]
        random.Random(seed).shuffle(pool)
        if len(pool) < size // 2:
            raise ValueError(f"training subset of {size} needs {size // 2} items with label {label}; the datalist "
                             f"has {len(pool)} (build a bigger dataset: dataset.n_pos / dataset.n_neg)")
        chosen += pool[:size // 2]
    return chosen


def resolved_datalist(subset: str | Path, out: str | Path) -> str:
    """Write ``subset`` to ``out`` with every volume absolute (joined to its recorded ``subset.root``)."""
    from due_ext.data.datalist import write_json_atomic
    from due_ext.experiments.paths import resolve_portable

    payload = json.loads(Path(subset).read_text())
    root = resolve_portable(payload["subset"]["root"])
    for items in payload.values():
        for item in items if isinstance(items, list) else []:
            for key in VOLUME_KEYS:
                if isinstance(item.get(key), str):
                    item[key] = str(root / item[key])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, payload)
    return str(out)


def write_subset(base: str, out_dir: str | Path, size: int | None, seed: int) -> str:
    """Write the datalist of one (size, seed) into ``out_dir``; volumes relative to :func:`subset_root` ``(base)``,
    recorded as ``subset.root`` (portable) with ``subset.base`` relative to it.

    An existing file is reused only when it was cut from the same ``base``: when the base changes (e.g. DUE's
    derived keys now come from retrained upstream models, or a method that needs them joined the grid) the
    subset is written again, so no cell trains on stale derived volumes.
    """
    from due_ext.experiments.paths import portable_path

    out = Path(out_dir) / f"train{'all' if size is None else size}-seed{seed}.json"
    base_path = Path(base).resolve()
    root = subset_root(base)
    recorded_as = {"root": portable_path(root), "base": base_path.relative_to(root).as_posix()}
    if out.is_file():
        recorded = json.loads(out.read_text()).get("subset", {})
        if {k: recorded.get(k) for k in recorded_as} == recorded_as:
            return str(out)
        logger.info("%s was cut from %s; cutting it again from %s", out, recorded, base)
    from due_ext.data.datalist import write_json_atomic

    payload = json.loads(base_path.read_text())
    subset = {key: value for key, value in payload.items() if not isinstance(value, list)}
    for section, items in payload.items():
        if isinstance(items, list):
            subset[section] = [_relative(item, base_path.parent, root) for item in items]
    subset["training"] = training_subset(subset.get("training", []), size, seed)
    subset["subset"] = {**recorded_as, "train_size": size, "seed": seed}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, subset)
    return str(out)
