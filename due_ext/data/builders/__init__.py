"""Dataset builders: ``python -m due_ext data build NAME --out DIR``.

- ``phantom`` (:mod:`.phantom`): procedural volumes, no download; tests and the smallest demo.
- ``lung-ct`` (:mod:`.lung_ct`): real chest-CT backgrounds with inserted nodules (downloads once).
- ``bounded`` (:mod:`.bounded`): lesion-bounded crops of the same CTs resampled to a fixed size, the DUE
  paper's input protocol (the lesion fills much of the input).

All write NIfTI volumes and a Decathlon-style ``datalist.json`` (sections training/validation/test, items
per :mod:`due_ext.data.schema`) with a ``builder`` provenance block, atomically (:mod:`.output`).
"""

from __future__ import annotations

import importlib
import os
import time
from pathlib import Path
from types import ModuleType

from due_ext.data.axes import parse_size
from due_ext.data.builders.output import BuildSummary

BUILDERS = ("phantom", "lung-ct", "bounded")
#: Builder name -> (module, build function).
_BUILD_FUNCTIONS = {"phantom": ("phantom", "build_phantom"), "lung-ct": ("lung_ct", "build_lung_ct"),
                    "lung_ct": ("lung_ct", "build_lung_ct"), "bounded": ("bounded", "build_bounded")}


def builder_module(name: str) -> ModuleType:
    """The module of builder ``name`` (it defines ``DEFAULT_*`` and ``DATASET_VERSION``)."""
    if name in _BUILD_FUNCTIONS:
        return importlib.import_module(f"due_ext.data.builders.{_BUILD_FUNCTIONS[name][0]}")
    raise ValueError(f"unknown dataset {name!r}; choices: {', '.join(BUILDERS)}")


def build_dataset(name: str, out: str | os.PathLike, n_pos: int | None = None, n_neg: int | None = None,
                  size: str | tuple[int, int, int] | None = None, every_k: int | None = None, seed: int = 0,
                  preview: bool = False, val_fraction: float | None = None,
                  margin: tuple[float, float] | None = None, jitter: float | None = None) -> BuildSummary:
    """Build dataset ``name`` into ``out``; ``None`` arguments take the builder's defaults.

    Args:
        name: one of :data:`BUILDERS`.
        out: output folder (``datalist.json`` goes there).
        n_pos, n_neg: positives / negatives (at least 3 each: one per split).
        size: ``"X,Y,Z"`` or a 3-tuple of voxels.
        every_k: keep every k-th lesion slice as annotated (``bounded``: every k-th acquired slice).
        seed: the same seed gives identical arrays.
        preview: also write ``preview.png`` next to the datalist.
        val_fraction: share of each class in validation, taken from training (``bounded`` only; default 0.25).
        margin, jitter: crop extent range over the lesion box and largest centre shift (``bounded`` only;
            defaults (1.2, 2.0) and 0.5).

    Returns:
        A :class:`~due_ext.data.builders.output.BuildSummary`; ``str()`` of it is a readable description.
    """
    module = builder_module(name)
    builder = getattr(module, _BUILD_FUNCTIONS[name][1])
    for label, value in (("n_pos", n_pos), ("n_neg", n_neg), ("every_k", every_k)):
        if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
            raise ValueError(f"{label} must be a positive integer, got {value!r}")
    extra: dict = {}
    for option, value in (("val_fraction", val_fraction), ("margin", margin), ("jitter", jitter)):
        if value is None:
            continue
        if name != "bounded":
            raise ValueError(f"{option} is an option of the bounded builder only, not of {name!r}")
        if option == "margin":
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
                raise ValueError(f"margin must be two numbers LOW,HIGH, got {value!r}")
            extra[option] = (float(value[0]), float(value[1]))
        else:
            extra[option] = float(value)
    summary = builder(
        out,
        n_pos=module.DEFAULT_N_POS if n_pos is None else int(n_pos),
        n_neg=module.DEFAULT_N_NEG if n_neg is None else int(n_neg),
        size=module.DEFAULT_SIZE if size is None else parse_size(size),
        every_k=module.DEFAULT_EVERY_K if every_k is None else int(every_k),
        seed=int(seed),
        **extra,
    )
    if preview:
        from due_ext.data.builders.preview import write_preview

        started = time.perf_counter()
        summary.preview = write_preview(summary.datalist, Path(summary.datalist).parent / "preview.png")
        summary.seconds += time.perf_counter() - started
    return summary


__all__ = ["BUILDERS", "BuildSummary", "build_dataset", "builder_module"]
