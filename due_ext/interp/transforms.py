"""MONAI dictionary transform that fills an item's missing annotation slices with a classical interpolator."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform

from due_ext.data import schema
from due_ext.data.axes import foreground_slices
from due_ext.data.transforms import ANNOTATED_MASK
from due_ext.interp.classical import CLASSICAL_METHODS, interpolate_gaps

#: Key written by :class:`ClassicalFilld` with the default nearest-slice method (``baseline_plus``, ``rrr``).
NEAREST_FILL = "nearest_fill"
#: Key written by :class:`ClassicalFilld` with the signed-distance method (the ``sdf_fill`` ablation).
SDF_FILL = "sdf_fill"


def fill_key(method: str) -> str:
    """The key :class:`ClassicalFilld` writes by default for ``method``: ``<method>_fill``."""
    return f"{method}_fill"


class ClassicalFilld(MapTransform):
    """Write ``output_key`` = the annotation with its gaps filled by a classical method (``(1, X, Y, Z)``).

    Reads the loaded channel-first ``annotation`` and ``annotated_mask`` (as written by
    :class:`due_ext.data.transforms.SparseAnnotationd`); an item with no annotated slice gets zeros.

    Args:
        method: any of :data:`due_ext.interp.classical.CLASSICAL_METHODS` (``nearest``, ``linear``,
            ``linear_union``, ``sdf``, ``morphological``; see :mod:`due_ext.interp.classical`).
        output_key: key to write; default :func:`fill_key` of ``method`` (``nearest_fill``, ``sdf_fill``, ...).
    """

    def __init__(self, method: str = "nearest", output_key: str | None = None,
                 annotation_key: str = schema.ANNOTATION, annotated_mask_key: str = ANNOTATED_MASK) -> None:
        if method not in CLASSICAL_METHODS:
            raise ValueError(f"ClassicalFilld: method {method!r} is not one of {', '.join(CLASSICAL_METHODS)}")
        super().__init__([annotation_key, annotated_mask_key])
        self.method = method
        self.output_key = fill_key(method) if output_key is None else output_key
        self.annotation_key = annotation_key
        self.annotated_mask_key = annotated_mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        annotation = d[self.annotation_key]
        slices = foreground_slices(np.asarray(d[self.annotated_mask_key]))
        filled = interpolate_gaps(np.asarray(annotation)[0], slices, self.method)
        # zeros_like keeps the metadata of a MetaTensor annotation so batches collate
        out = torch.zeros_like(torch.as_tensor(annotation), dtype=torch.float32)
        out[0] = torch.from_numpy(filled)
        d[self.output_key] = out
        return d
