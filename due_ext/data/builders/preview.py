"""A PNG overview of a built dataset: a few positives and negatives on axial (Z) slices.

Positives show the annotated slice with the largest lesion area (ties: nearest the middle lesion slice),
the annotation outlined in a solid red line and the full lesion mask in yellow dashes on top; negatives show
their middle slice. Real tumour crops (section ``real_tumours``, lung-CT only) get a row of their own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from due_ext.data import schema
from due_ext.data.axes import foreground_slices, slice_of
from due_ext.data.datalist import SECTIONS, read_datalist
from due_ext.data.nifti import read_nifti


def _items(datalist: dict[str, Any], label: int, n: int, sections: tuple[str, ...]) -> list[tuple[str, dict]]:
    chosen = []
    for section in sections:
        for item in datalist.get(section, []):
            if item.get(schema.LABEL) == label and len(chosen) < n:
                chosen.append((section, item))
    return chosen


def _display_slice(item: dict[str, Any], root: Path, depth: int) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """(z, annotation slice or None, mask slice or None) for one item."""
    if item.get(schema.LABEL) != 1:
        return depth // 2, None, None
    mask = read_nifti(root / item[schema.MASK])[0] if schema.MASK in item else None
    annotation = read_nifti(root / item[schema.ANNOTATION])[0] if schema.ANNOTATION in item else None
    reference = mask if mask is not None else annotation
    lesion = foreground_slices(reference) if reference is not None else []
    middle = lesion[len(lesion) // 2] if lesion else depth // 2
    annotated = [int(z) for z in item.get(schema.ANNOTATED_SLICES, [])]
    if annotated and annotation is not None:
        # The drawn slice with the largest lesion area; ties go to the one nearest the lesion's middle.
        z = max(annotated, key=lambda a: (int(slice_of(annotation, a).sum()), -abs(a - middle)))
    else:
        z = annotated[len(annotated) // 2] if annotated else middle
    return (z, slice_of(annotation, z) if annotation is not None and z in annotated else None,
            slice_of(mask, z) if mask is not None else None)


def write_preview(datalist_path: str | os.PathLike, out_png: str | os.PathLike, n: int = 4) -> Path:
    """Write a PNG with up to ``n`` positives and ``n`` negatives of the datalist (plus real tumours).

    Images are drawn with X to the right and Y down (``slice.T``); titles give the item name, label and Z.
    Returns the PNG path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    datalist_path = Path(datalist_path)
    root = datalist_path.parent
    datalist = read_datalist(datalist_path)
    rows = [("positives", _items(datalist, 1, n, SECTIONS)), ("negatives", _items(datalist, 0, n, SECTIONS))]
    if datalist.get("real_tumours"):
        rows.append(("real tumours", _items(datalist, 1, n, ("real_tumours",))))
    rows = [(title, items) for title, items in rows if items]
    if not rows:
        raise ValueError(f"{datalist_path}: no items to preview")
    columns = max(len(items) for _, items in rows)
    fig, axes = plt.subplots(len(rows), columns, figsize=(3 * columns, 3.5 * len(rows)), squeeze=False)
    for r, (title, items) in enumerate(rows):
        for c in range(columns):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(items):
                continue
            section, item = items[c]
            image = read_nifti(root / item[schema.IMAGE])[0]
            z, annotation, mask = _display_slice(item, root, image.shape[-1])
            ax.imshow(slice_of(image, z).T, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            # Red first, yellow dashes on top: on a drawn slice both outlines coincide and both stay visible.
            if annotation is not None and annotation.any():
                ax.contour(annotation.T, levels=[0.5], colors="red", linewidths=1.6)
            if mask is not None and mask.any():
                ax.contour(mask.T, levels=[0.5], colors="yellow", linestyles="dashed", linewidths=1.0)
            name = Path(item[schema.IMAGE]).name.removesuffix(".nii.gz")
            drawn = " (annotated)" if annotation is not None else ""
            ax.set_title(f"{name}\nlabel {item[schema.LABEL]}, z={z}{drawn}", fontsize=8)
        axes[r][0].text(-0.08, 0.5, title, transform=axes[r][0].transAxes, rotation=90, va="center",
                        ha="right", fontsize=10)
    fig.suptitle(f"{datalist.get('name', datalist_path.name)}: red = annotation (drawn slice), "
                 "yellow dashed = full mask", fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, out_png)
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()
    return out_png
