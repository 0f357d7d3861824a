"""The one variance-to-weights mapping on hand-made volumes: annotated slices 1, the most uncertain voxel of a block
0, the most certain 1, the other normalisations, and loud errors."""

import numpy as np
import pytest
import torch

from due_ext.uncertainty.weights import uncertainty_weights


def hand_made_variance() -> np.ndarray:
    """(4, 3, 9) volume, annotated slices 0, 3, 8: blocks (0, 3) with 2 and (3, 8) with 4 missing slices."""
    var = np.zeros((4, 3, 9), np.float32)
    var[1, 1, 1] = 0.2   # the hardest voxel of the first block
    var[2, 2, 2] = 0.05
    var[0, 0, 5] = 0.01  # the second block is easy: its hardest voxel has variance 0.01
    var[..., 0] = 0.3    # garbage on annotated slices must be ignored
    return var


def test_block_minmax_faithful_default():
    var = hand_made_variance()
    w = uncertainty_weights(var, [0, 3, 8])
    assert w.dtype == np.float32 and w.shape == var.shape
    assert np.all(w[..., [0, 3, 8]] == 1.0)
    assert w[1, 1, 1] == 0.0 and w[0, 0, 5] == 0.0  # most uncertain voxel of each block, even the easy one
    assert w[0, 0, 1] == 1.0 and w[3, 2, 6] == 1.0  # zero-variance voxels are the most certain
    s = lambda v: 1.0 / (1.0 + np.exp(v))  # noqa: E731  sigmoid(-v)
    expected = (s(0.05) - s(0.2)) / (s(0.0) - s(0.2))
    assert w[2, 2, 2] == pytest.approx(expected, rel=1e-6)


def test_volume_normalisation_keeps_easy_blocks_high():
    var = hand_made_variance()
    w = uncertainty_weights(var, [0, 3, 8], normalization="volume")
    assert w[1, 1, 1] == 0.0
    s = lambda v: 1.0 / (1.0 + np.exp(v))  # noqa: E731
    assert w[0, 0, 5] == pytest.approx((s(0.01) - s(0.2)) / (s(0.0) - s(0.2)), rel=1e-6)
    assert w[0, 0, 5] > 0.9


def test_absolute_normalisation_uses_fixed_bounds():
    var = hand_made_variance()
    w = uncertainty_weights(var, [0, 3, 8], normalization="absolute", max_variance=0.25)
    s = lambda v: 1.0 / (1.0 + np.exp(v))  # noqa: E731
    assert w[1, 1, 1] == pytest.approx((s(0.2) - s(0.25)) / (0.5 - s(0.25)), rel=1e-6)
    assert 0.0 < w[1, 1, 1] < 0.25
    var[1, 1, 1] = 0.5  # beyond the bound: clipped to 0
    assert uncertainty_weights(var, [0, 3, 8], normalization="absolute")[1, 1, 1] == 0.0


def test_outside_range_and_constant_blocks():
    var = np.zeros((2, 2, 8), np.float32)
    var[..., 0] = 0.1  # before the first annotated slice
    w = uncertainty_weights(var, [2, 5])
    assert np.all(w == 1.0)  # constant block: nothing to rank; outside range: default 1
    w = uncertainty_weights(var, [2, 5], outside=0.25)
    assert np.all(w[..., [0, 1, 6, 7]] == 0.25) and np.all(w[..., 2:6] == 1.0)


def test_adjacent_annotations_and_torch_input():
    var = torch.rand(3, 3, 6, generator=torch.Generator().manual_seed(0)) * 0.2
    w = uncertainty_weights(var, [0, 1, 2, 5])
    assert isinstance(w, torch.Tensor) and w.dtype == torch.float32
    assert torch.all(w[..., [0, 1, 2, 5]] == 1.0)
    assert w[..., 3:5].min() == 0.0 and w[..., 3:5].max() == 1.0
    # monotone: more variance, less weight (within one block)
    block_var, block_w = var[..., 3:5].flatten(), w[..., 3:5].flatten()
    order = torch.argsort(block_var)
    assert torch.all(torch.diff(block_w[order]) <= 0)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="normalization"):
        uncertainty_weights(np.zeros((2, 2, 4)), [0, 3], normalization="global")
    with pytest.raises(ValueError, match=r"\(X, Y, Z\)"):
        uncertainty_weights(np.zeros((2, 4)), [0, 3])
    with pytest.raises(ValueError, match="NaN"):
        uncertainty_weights(np.full((2, 2, 4), np.nan), [0, 3])
    with pytest.raises(ValueError, match="outside a volume"):
        uncertainty_weights(np.zeros((2, 2, 4)), [0, 4])


def test_huge_and_negative_variances():
    var = np.zeros((2, 2, 5))
    var[0, 0, 2] = 1e4     # exp(1e4) would overflow: must still map to the lowest weight, without a warning
    var[1, 1, 2] = -1e-3   # numerical noise below 0 counts as 0
    var[1, 0, 2] = 0.1
    with np.errstate(all="raise"):
        w = uncertainty_weights(var, [0, 4])
    assert w[0, 0, 2] == 0.0 and w[1, 1, 2] == w[0, 1, 2] == 1.0 and 0.0 < w[1, 0, 2] < 1.0
