"""Filling the slices an annotator did not draw: blocks, classical interpolators (and, later, diffusion)."""

from due_ext.interp.blocks import Block, split_blocks
from due_ext.interp.classical import CLASSICAL_METHODS, interpolate_gaps

__all__ = ["CLASSICAL_METHODS", "Block", "interpolate_gaps", "split_blocks"]
