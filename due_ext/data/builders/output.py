"""Writing a built dataset: volumes, sparse annotations, datalist and provenance, all-or-nothing.

Everything is first written to a hidden staging folder inside OUT; :meth:`StagedDataset.commit` then swaps
the builder's folders (``images/``, ``annotations/``, ``masks/``) into place and writes ``datalist.json``
last, so a crash never leaves a datalist pointing at half-written files, and a re-run into the same OUT
replaces the previous build entirely (no stale volumes from a larger earlier build).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from due_ext.data import schema
from due_ext.data.builders.sparse import sparse_slices, sparsify
from due_ext.data.datalist import write_datalist
from due_ext.data.nifti import write_nifti

DATALIST_NAME = "datalist.json"
#: Folders inside OUT that a build owns and replaces.
OWNED_FOLDERS = ("images", "annotations", "masks")
#: Top-level datalist key holding the provenance; also how a folder is recognised as ours.
PROVENANCE_KEY = "builder"


def _is_our_build(out: Path) -> bool:
    path = out / DATALIST_NAME
    try:
        return PROVENANCE_KEY in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


class StagedDataset:
    """Collects the items of one build in a staging folder; use as a context manager, then :meth:`commit`.

    Raises ``FileExistsError`` if OUT already holds ``images/``, ``annotations/`` or ``masks/`` that a DUE
    builder did not write (we never delete someone else's files).
    """

    def __init__(self, out: str | os.PathLike) -> None:
        self.out = Path(out).expanduser().resolve()
        foreign = [name for name in OWNED_FOLDERS if (self.out / name).exists()]
        if foreign and not _is_our_build(self.out):
            raise FileExistsError(
                f"{self.out}: holds {', '.join(foreign)}/ but no datalist.json written by a DUE builder; "
                "refusing to replace them. Choose an empty or new --out folder.")
        self.out.mkdir(parents=True, exist_ok=True)
        self.stage = self.out / f".due-build-{uuid.uuid4().hex[:8]}"
        self.stage.mkdir()
        self.sections: dict[str, list[dict[str, Any]]] = {}
        self.files = 0

    def __enter__(self) -> StagedDataset:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)

    def _write(self, folder: str, name: str, array: np.ndarray, affine: np.ndarray) -> str:
        relative = f"{folder}/{name}.nii.gz"
        write_nifti(self.stage / relative, array, affine)
        self.files += 1
        return relative

    def add_item(self, section: str, name: str, image: np.ndarray, affine: np.ndarray, label: int,
                 mask: np.ndarray | None = None, every_k: int | None = None,
                 extra: dict[str, Any] | None = None,
                 annotated_slices: list[int] | None = None) -> dict[str, Any]:
        """Write one item (float32 image; for positives the uint8 sparse annotation and full mask).

        Positives (``label == 1``) need ``mask`` and either ``annotated_slices`` (Z indices chosen by the
        builder, each holding foreground) or ``every_k``: the annotation keeps every k-th lesion slice
        (:func:`~due_ext.data.builders.sparse.sparse_slices`). It is zero on the other slices.
        """
        if label not in (0, 1):
            raise ValueError(f"{name}: label must be 0 or 1, got {label!r}")
        item: dict[str, Any] = {schema.IMAGE: self._write("images", name, image.astype(np.float32), affine),
                                schema.LABEL: int(label)}
        if label == 1:
            if mask is None or (every_k is None and annotated_slices is None):
                raise ValueError(f"{name}: a positive item needs its lesion mask and every_k or annotated_slices")
            mask = (np.asarray(mask) > 0).astype(np.uint8)
            if mask.shape != image.shape:
                raise ValueError(f"{name}: mask shape {mask.shape} differs from image shape {image.shape}")
            if annotated_slices is None:
                slices = sparse_slices(mask, every_k)
            else:
                slices = sorted({int(z) for z in annotated_slices})
                empty = [z for z in slices if not 0 <= z < mask.shape[-1] or not mask[..., z].any()]
                if not slices or empty:
                    raise ValueError(f"{name}: annotated slices {slices} must be non-empty Z indices holding "
                                     f"lesion foreground; {empty} do not")
            item[schema.ANNOTATION] = self._write("annotations", name, sparsify(mask, slices), affine)
            item[schema.ANNOTATED_SLICES] = slices
            item[schema.MASK] = self._write("masks", name, mask, affine)
        item.update(extra or {})
        self.sections.setdefault(section, []).append(item)
        return item

    def commit(self, header: dict[str, Any]) -> Path:
        """Swap the staged folders into OUT and write ``datalist.json`` (``header`` keys + sections)."""
        trash = self.out / f".due-old-{uuid.uuid4().hex[:8]}"
        trash.mkdir()
        try:
            for folder in OWNED_FOLDERS:
                target = self.out / folder
                if target.exists():
                    os.replace(target, trash / folder)
                if (self.stage / folder).exists():
                    os.replace(self.stage / folder, target)
            path = write_datalist(self.out / DATALIST_NAME, {**header, **self.sections})
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return path


@dataclass
class BuildSummary:
    """What a build produced; ``str()`` gives the multi-line description the CLI prints."""

    name: str
    datalist: Path
    counts: dict[str, dict[str, int]]  # section -> {"positives": n, "negatives": n}
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    files: int
    seconds: float
    notes: list[str] = field(default_factory=list)
    preview: Path | None = None

    def __str__(self) -> str:
        lines = [f"built dataset '{self.name}' in {self.seconds:.1f} s",
                 f"  datalist: {self.datalist}",
                 f"  volume size X,Y,Z = {','.join(map(str, self.size))} voxels, "
                 f"spacing {' x '.join(f'{s:g}' for s in self.spacing)} mm",
                 f"  files: {self.files} NIfTI volumes (images/, annotations/, masks/)"]
        for section, count in self.counts.items():
            lines.append(f"  {section:<12} {count['positives']:>3} positives, {count['negatives']:>3} negatives")
        if self.preview is not None:
            lines.append(f"  preview: {self.preview}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def count_items(sections: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, int]]:
    """Positives and negatives per section."""
    return {name: {"positives": sum(1 for it in items if it[schema.LABEL] == 1),
                   "negatives": sum(1 for it in items if it[schema.LABEL] == 0)}
            for name, items in sections.items()}


def dataset_header(name: str, description: str, modality: str, parameters: dict[str, Any],
                   notes: list[str] | None = None) -> dict[str, Any]:
    """Top-level keys of a built datalist: Decathlon ``dataset.json``-style fields plus our provenance.

    MONAI's ``load_decathlon_datalist`` reads only the section it is asked for and ignores these keys.
    """
    from due_ext import __version__

    return {"name": name, "description": description, "tensorImageSize": "3D", "modality": {"0": modality},
            "labels": {"0": "no lesion", "1": "lesion"},
            PROVENANCE_KEY: {"package": "due_ext", "version": __version__, "builder": name,
                             "parameters": parameters, "notes": list(notes or [])}}
