"""Experiment definitions: a YAML or JSON file naming the data, the grid and the bundle overrides.

Format (every key except ``grid.method`` optional)::

    name: table1
    description: free text
    dataset: {name: lung-ct, seed: 0}     # keyword arguments of due_ext.bundles.demo_datalist
    # datalist: /path/datalist.json       # or an existing datalist instead of a demo dataset
    grid:
      method: [baseline, due]             # explanation-supervision methods
      seed: [0, 1, 2]                     # model seed and training-subset seed
      train_size: [20]                    # training items, half positives half negatives; null = all
      lam: [1.0]                          # explanation-loss weight; absent = the bundle's default
    # grid may also be a list of such mappings: the cells are their union (e.g. DUE at four lambdas plus the
    # baseline once, without running the baseline at every lambda)
    overrides: {max_epochs: 24}           # any other bundle key, for every cell
    extra_sections: [real_tumours]        # datalist sections also evaluated after the test split
    weight_normalization: block           # how DUE's uncertainty weights are mapped (block, volume, absolute)

Errors name the file and the key, so a typo is found without reading a traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Grid axes, in the order a cell id names them.
GRID_AXES = ("method", "train_size", "lam", "seed")
TOP_KEYS = ("name", "description", "dataset", "datalist", "grid", "overrides", "extra_sections", "bundle",
            "weight_normalization")
#: Mappings of the variance to DUE's loss weights (:func:`due_ext.uncertainty.weights.uncertainty_weights`).
WEIGHT_NORMALIZATIONS = ("block", "volume", "absolute")
#: Keys of ``dataset``: the arguments of :func:`due_ext.bundles.demo_datalist`.
DATASET_KEYS = ("every_k", "jitter", "margin", "n_neg", "n_pos", "name", "root", "seed", "size",
                "val_fraction")
#: Keys the runner sets per cell; an experiment may not override them.
RESERVED_OVERRIDES = ("method", "seed", "lam", "datalist", "output_dir", "ckpt_dir", "bundle_root")


class ExperimentConfigError(ValueError):
    """A problem in an experiment file; the message names the file and the key."""


@dataclass(frozen=True)
class Cell:
    """One run of the grid: train then evaluate with these values."""

    method: str
    seed: int
    train_size: int | None
    lam: float | None

    @property
    def cell_id(self) -> str:
        size = "all" if self.train_size is None else str(self.train_size)
        lam = "default" if self.lam is None else f"{self.lam:g}"
        return f"{self.method}-n{size}-lam{lam}-s{self.seed}"

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "seed": self.seed, "train_size": self.train_size, "lam": self.lam}


@dataclass
class Experiment:
    """A parsed experiment file."""

    path: str
    name: str
    description: str = ""
    dataset: dict[str, Any] = field(default_factory=dict)
    datalist: str | None = None
    grid: list[dict[str, list[Any]]] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    extra_sections: list[str] = field(default_factory=list)
    bundle: str = "due"
    weight_normalization: str = "block"

    def cells(self) -> list[Cell]:
        """Every cell, seed-major: all methods of the first seed come first, so an interrupted grid leaves
        whole seeds (comparable methods) rather than a few methods with all seeds."""
        cells: dict[str, Cell] = {}
        for seed in sorted({s for g in self.grid for s in g["seed"]}):
            for grid in self.grid:
                if seed not in grid["seed"]:
                    continue
                for n in grid["train_size"]:
                    for lam in grid["lam"]:
                        for method in grid["method"]:
                            cell = Cell(method=method, seed=seed, train_size=n, lam=lam)
                            cells.setdefault(cell.cell_id, cell)
        return list(cells.values())

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "name": self.name, "description": self.description, "dataset": self.dataset,
                "datalist": self.datalist, "grid": self.grid, "overrides": self.overrides,
                "extra_sections": self.extra_sections, "bundle": self.bundle,
                "weight_normalization": self.weight_normalization}


def _read(path: Path) -> Any:
    if not path.is_file():
        raise ExperimentConfigError(f"{path}: experiment file not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ExperimentConfigError(f"{path}: not valid YAML: {err}") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ExperimentConfigError(f"{path}: not valid JSON: {err}") from None
    raise ExperimentConfigError(f"{path}: experiment files are .yaml, .yml or .json")


def _as_list(where: str, key: str, value: Any) -> list[Any]:
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ExperimentConfigError(f"{where}: key '{key}' is an empty list")
    if len(set(map(json.dumps, values))) != len(values):
        raise ExperimentConfigError(f"{where}: key '{key}' repeats a value: {values}")
    return values


def _check_int(where: str, key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ExperimentConfigError(f"{where}: key '{key}' must be integers >= {minimum}, got {value!r}")
    return value


def _check_keys(where: str, mapping: Any, allowed: Sequence[str], prefix: str, not_mapping: str) -> None:
    """Raise naming the file when ``mapping`` is not a dict (``not_mapping`` says what it must be) or holds a key
    outside ``allowed`` (reported as ``prefix + key``)."""
    if not isinstance(mapping, dict):
        raise ExperimentConfigError(f"{where}: {not_mapping}")
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise ExperimentConfigError(f"{where}: unknown key '{prefix}{unknown[0]}'; allowed: {', '.join(allowed)}")


def _grid(where: str, grid: Any) -> dict[str, list[Any]]:
    from due_ext.explain.supervision import METHODS

    _check_keys(where, grid, GRID_AXES, "grid.", f"key 'grid' must be a mapping of {', '.join(GRID_AXES)}")
    if "method" not in grid:
        raise ExperimentConfigError(f"{where}: key 'grid.method' is required (a list of methods)")
    methods = _as_list(where, "grid.method", grid["method"])
    for method in methods:
        if method not in METHODS:
            raise ExperimentConfigError(f"{where}: key 'grid.method' has unknown method {method!r}; "
                                        f"choose from {', '.join(METHODS)}")
    seeds = [_check_int(where, "grid.seed", s, 0) for s in _as_list(where, "grid.seed", grid.get("seed", [0]))]
    sizes = []
    for n in _as_list(where, "grid.train_size", grid.get("train_size", [None])):
        if n is not None:
            _check_int(where, "grid.train_size", n, 2)
            if n % 2:
                raise ExperimentConfigError(f"{where}: key 'grid.train_size' must be even (half positives, half "
                                            f"negatives), got {n}")
        sizes.append(n)
    lams = []
    for lam in _as_list(where, "grid.lam", grid.get("lam", [None])):
        if lam is not None and (isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam)
                                or lam < 0):
            raise ExperimentConfigError(f"{where}: key 'grid.lam' must be numbers >= 0 (or null), got {lam!r}")
        lams.append(None if lam is None else float(lam))
    return {"method": methods, "seed": seeds, "train_size": sizes, "lam": lams}


def _grids(where: str, grid: Any) -> list[dict[str, list[Any]]]:
    if isinstance(grid, list):
        if not grid:
            raise ExperimentConfigError(f"{where}: key 'grid' is an empty list")
        return [_grid(f"{where} (grid {i})", g) for i, g in enumerate(grid)]
    return [_grid(where, grid)]


def load_experiment(path: str | Path) -> Experiment:
    """Parse and validate an experiment file (YAML or JSON); raises :class:`ExperimentConfigError`."""
    path = Path(path)
    raw = _read(path)
    where = str(path)
    _check_keys(where, raw, TOP_KEYS, "", f"the top level must be a mapping with keys {', '.join(TOP_KEYS)}")
    if "grid" not in raw:
        raise ExperimentConfigError(f"{where}: key 'grid' is required")
    name = raw.get("name", path.stem)
    if not isinstance(name, str) or not name or "/" in name:
        raise ExperimentConfigError(f"{where}: key 'name' must be a non-empty string without '/', got {name!r}")
    dataset = raw.get("dataset", {}) or {}
    _check_keys(where, dataset, DATASET_KEYS, "dataset.", "key 'dataset' must be a mapping (demo_datalist arguments)")
    datalist = raw.get("datalist")
    if datalist is not None:
        if dataset:
            raise ExperimentConfigError(f"{where}: keys 'dataset' and 'datalist' exclude each other; give one")
        if not isinstance(datalist, str):
            raise ExperimentConfigError(f"{where}: key 'datalist' must be a path")
        datalist = str((path.parent / datalist).resolve()) if not Path(datalist).is_absolute() else datalist
    overrides = raw.get("overrides", {}) or {}
    if not isinstance(overrides, dict):
        raise ExperimentConfigError(f"{where}: key 'overrides' must be a mapping of bundle keys to values")
    for key in overrides:
        if key in RESERVED_OVERRIDES:
            raise ExperimentConfigError(f"{where}: key 'overrides.{key}' is set by the runner per cell; use 'grid' "
                                        "for method/seed/lam and 'dataset'/'datalist' for the data")
    extra = raw.get("extra_sections", []) or []
    if not isinstance(extra, list) or not all(isinstance(s, str) for s in extra):
        raise ExperimentConfigError(f"{where}: key 'extra_sections' must be a list of datalist section names")
    bundle = raw.get("bundle", "due")
    if bundle != "due":
        raise ExperimentConfigError(f"{where}: key 'bundle' must be 'due' (the only classifier bundle)")
    normalization = raw.get("weight_normalization", "block")
    if normalization not in WEIGHT_NORMALIZATIONS:
        raise ExperimentConfigError(f"{where}: key 'weight_normalization' must be one of "
                                    f"{', '.join(WEIGHT_NORMALIZATIONS)}, got {normalization!r}")
    return Experiment(path=str(path.resolve()), name=name, description=str(raw.get("description", "")),
                      dataset=dataset, datalist=datalist, grid=_grids(where, raw["grid"]), overrides=overrides,
                      extra_sections=extra, bundle=bundle, weight_normalization=normalization)
