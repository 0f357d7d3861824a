"""Walk a datalist for the annotated items a derivation step (interpolation, uncertainty) works on.

Both upstream bundles write a copy of their input datalist with new keys; this module does the shared part:
every item is copied with its volume paths made absolute (the new datalist lives elsewhere), and the items of
the chosen sections that carry an annotation are loaded and checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from due_ext.data import schema
from due_ext.data.datalist import read_datalist, write_datalist
from due_ext.data.nifti import read_nifti
from due_ext.data.shards import DEFAULT_UNIT_SIZE, barrier, current_shard, derive_in_units


@dataclass
class AnnotatedItem:
    """One annotated item: ``entry`` is its dict in the output payload (add derived keys to it)."""

    entry: dict[str, Any]
    annotation: np.ndarray
    affine: np.ndarray
    slices: list[int]
    name: str


def collect_annotated_items(datalist: str | os.PathLike, sections: Sequence[str]
                            ) -> tuple[dict[str, Any], list[AnnotatedItem]]:
    """``(payload copy with absolute paths, annotated items of sections)``; raises naming the file on a bad item."""
    datalist = Path(datalist)
    payload = read_datalist(datalist)

    def absolute(value: str) -> str:
        path = Path(value)
        return str((path if path.is_absolute() else datalist.parent / path).resolve())

    out_payload: dict[str, Any] = {k: v for k, v in payload.items() if not isinstance(v, list)}
    annotated: list[AnnotatedItem] = []
    for section, items in payload.items():
        if not isinstance(items, list):
            continue
        new_items = []
        for index, item in enumerate(items):
            entry = {k: (absolute(v) if k in schema.VOLUME_KEYS and isinstance(v, str) else v) for k, v in item.items()}
            new_items.append(entry)
            if section not in sections or schema.ANNOTATION not in item:
                continue
            path = entry[schema.ANNOTATION]
            annotation, affine = read_nifti(path)
            if annotation.ndim != 3:
                raise ValueError(f"{path}: annotation must be a 3D (X, Y, Z) volume, got shape {annotation.shape}")
            slices = item.get(schema.ANNOTATED_SLICES)
            if slices is None:
                raise ValueError(f"{path}: item {index} of section {section!r} has an annotation but no "
                                 f"{schema.ANNOTATED_SLICES}")
            bad = [int(z) for z in slices if not 0 <= int(z) < annotation.shape[-1]]
            if bad:
                raise ValueError(f"{path}: annotated slices {bad} lie outside the volume's {annotation.shape[-1]} "
                                 "Z slices")
            name = Path(item[schema.ANNOTATION]).name.split(".nii")[0]
            annotated.append(AnnotatedItem(entry, annotation, affine, [int(z) for z in slices], f"{section}_{name}"))
        out_payload[section] = new_items
    return out_payload, annotated


def derive_datalist(out_payload: dict[str, Any], items: Sequence[AnnotatedItem],
                    derive_unit: Callable[[range], list[dict[str, str]]], output_dir: str | os.PathLike,
                    datalist_name: str = "datalist.json", unit_size: int = DEFAULT_UNIT_SIZE,
                    progress: bool = False) -> Path:
    """Derive ``items`` in work units shared by every process (:func:`~due_ext.data.shards.derive_in_units`,
    receipts in ``output_dir/units``), then, on the main process, add each item's derived keys to its entry of
    ``out_payload`` and write it as ``output_dir/datalist_name``. Every process returns that path once it is
    written."""
    shard = current_shard()
    entries = derive_in_units([item.name for item in items], derive_unit, Path(output_dir) / "units", shard,
                              unit_size, progress=progress)
    destination = Path(output_dir) / datalist_name
    if entries is not None:
        for item, entry in zip(items, entries, strict=True):
            item.entry.update(entry)
        write_datalist(destination, out_payload)
    barrier(shard)  # the others read the datalist next
    return destination
