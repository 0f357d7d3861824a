"""Blocks and classical interpolators on hand-made cases."""

import numpy as np
import pytest

from due_ext.interp import Block, interpolate_gaps, split_blocks
from due_ext.interp.classical import signed_distance


def test_split_blocks_odd_cases():
    assert split_blocks([2, 5, 6, 9]) == [Block(2, 5), Block(6, 9)]  # 5-6 adjacent: no block
    assert split_blocks([4]) == []
    assert split_blocks([]) == []
    assert split_blocks([9, 0, 9]) == [Block(0, 9)]  # unsorted, duplicated
    block = Block(0, 4)
    assert block.gap == 3 and list(block.missing) == [1, 2, 3] and block.position(1) == 0.25
    with pytest.raises(ValueError, match="outside a volume of 8"):
        split_blocks([0, 8], depth=8)
    with pytest.raises(ValueError, match="negative"):
        split_blocks([-1, 3])


def _square(size: int, lo: int, hi: int) -> np.ndarray:
    plane = np.zeros((size, size), np.float32)
    plane[lo:hi, lo:hi] = 1
    return plane


def _volume(planes: dict[int, np.ndarray], depth: int) -> np.ndarray:
    vol = np.zeros(next(iter(planes.values())).shape + (depth,), np.float32)
    for z, plane in planes.items():
        vol[..., z] = plane
    return vol


def test_nearest_and_linear_exact():
    a, b = _square(6, 1, 3), _square(6, 3, 5)
    vol = _volume({0: a, 4: b}, 6)
    vol[..., 2] = 1  # not annotated: must be ignored
    nearest = interpolate_gaps(vol, [0, 4], "nearest")
    for z, expected in [(0, a), (1, a), (2, a), (3, b), (4, b)]:  # z=2 is midway: lower slice
        np.testing.assert_array_equal(nearest[..., z], expected)
    assert not nearest[..., 5].any()  # beyond the last annotated slice: not extrapolated
    linear = interpolate_gaps(vol, [0, 4], "linear")
    np.testing.assert_allclose(linear[..., 1], 0.75 * a + 0.25 * b)
    np.testing.assert_allclose(linear[..., 2], 0.5 * a + 0.5 * b)


def test_sdf_interpolates_shape_not_intensity():
    small, large = _square(9, 3, 6), _square(9, 1, 8)  # 3x3 inside 7x7, same centre
    filled = interpolate_gaps(_volume({0: small, 2: large}, 3), [0, 2], "sdf")
    np.testing.assert_array_equal(filled[..., 1], _square(9, 2, 7))  # 5x5: halfway in shape


def test_sdf_does_not_bridge_to_an_empty_slice():
    blob = _square(9, 2, 7)  # 5x5, deepest inside depth 3
    filled = interpolate_gaps(_volume({0: blob, 4: np.zeros((9, 9))}, 5), [0, 4], "sdf")
    areas = [int(filled[..., z].sum()) for z in range(5)]
    # sdf inside the 5x5 square is -1 (rim), -2, -3 (centre); the empty slice's map is the constant 3.
    # t=0.25: 0.75 sdf + 0.75 <= 0 keeps the rim (tie, inclusive); t=0.5 keeps only the centre; then nothing.
    assert areas == [25, 25, 1, 0, 0]


def test_signed_distance_signs_and_errors():
    sdf = signed_distance(_square(5, 1, 4))
    assert sdf[2, 2] < 0 < sdf[0, 0]
    with pytest.raises(ValueError, match="empty"):
        signed_distance(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="method"):
        interpolate_gaps(np.zeros((2, 2, 2)), [0, 1], "cubic")
    with pytest.raises(ValueError, match=r"\(X, Y, Z\)"):
        interpolate_gaps(np.zeros((2, 2)), [0, 1])
