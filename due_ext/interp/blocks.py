"""The unit of interpolation: a *block* = two consecutive annotated slices and the gap between them.

Slices are indices along Z, the last axis (see :mod:`due_ext.data.axes`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """Annotated slices ``start`` < ``stop`` with ``stop - start - 1`` missing slices between them."""

    start: int
    stop: int

    @property
    def gap(self) -> int:
        """Number of missing slices."""
        return self.stop - self.start - 1

    @property
    def missing(self) -> range:
        """Z indices of the missing slices."""
        return range(self.start + 1, self.stop)

    def position(self, z: int) -> float:
        """Relative position of slice ``z`` in the block: 0 at ``start``, 1 at ``stop``."""
        return (z - self.start) / (self.stop - self.start)


def split_blocks(annotated_slices: Sequence[int], depth: int | None = None) -> list[Block]:
    """Blocks with at least one missing slice, from sorted-or-not annotated slice indices.

    Adjacent annotated slices form no block (nothing to fill); a single annotated slice gives none; slices
    outside the annotated range (before the first, after the last) are not part of any block. ``depth``
    (the number of Z slices), when given, is checked against the indices.
    """
    slices = sorted(set(int(z) for z in annotated_slices))
    if slices and slices[0] < 0:
        raise ValueError(f"annotated slice {slices[0]} is negative")
    if depth is not None and slices and slices[-1] >= depth:
        raise ValueError(f"annotated slice {slices[-1]} is outside a volume of {depth} slices")
    return [Block(a, b) for a, b in zip(slices, slices[1:], strict=False) if b - a > 1]
