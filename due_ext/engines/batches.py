"""What the engines need from a collated dictionary batch besides its tensors: moving it to a device and naming
its items (for errors and warnings that point at the cases, not at an iteration number)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from due_ext.data import schema


def batch_to_device(batch: Mapping[str, Any], device: torch.device | str, non_blocking: bool = False) -> dict:
    """Tensors of a collated dictionary batch moved to ``device``; other values kept as they are."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def batch_item_names(batch: Mapping[str, Any]) -> list[str]:
    """The source file of every item: the ``filename_or_obj`` metadata of the collated ``image`` (a MONAI
    ``MetaTensor``, as ``LoadImaged`` makes it), else ``"item i"`` (in-memory batches)."""
    image = batch.get(schema.IMAGE)
    count = len(image) if isinstance(image, torch.Tensor) and image.dim() > 0 else 0
    files = (getattr(image, "meta", None) or {}).get("filename_or_obj")
    if isinstance(files, str):
        files = [files]
    if isinstance(files, Sequence) and len(files) == count:
        return [str(f) for f in files]
    return [f"item {i}" for i in range(count)]


def describe_items(names: Sequence[str], limit: int = 10) -> str:
    """``names`` joined for a message, the first ``limit`` of them and how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
