"""Blocks and classical interpolators on hand-made cases."""

import numpy as np
import pytest

from due_ext.interp import Block, interpolate_gaps, split_blocks
from due_ext.interp.classical import signed_distance

# ITK's SWIG wrappers trip a Python 3.11 DeprecationWarning on import, hundreds of times; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:builtin type .* has no __module__ attribute:DeprecationWarning")


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


def test_linear_union_keeps_the_union_at_the_midpoint():
    a, b = _square(6, 1, 4), _square(6, 2, 5)  # 3x3 squares overlapping in a 2x2 square
    vol = _volume({0: a, 2: b, 6: a}, 7)
    linear = interpolate_gaps(vol, [0, 2, 6], "linear")
    union = interpolate_gaps(vol, [0, 2, 6], "linear_union")
    # t = 0.5 (z = 1): linear gives 0.5 on the 5 + 5 voxels drawn in one slice only, and the evaluation's
    # strict > 0.5 drops them (intersection, 4 voxels); linear_union keeps them (union, 9 + 9 - 4 = 14 voxels)
    assert int((linear[..., 1] > 0.5).sum()) == 4
    np.testing.assert_array_equal(union[..., 1], np.maximum(a, b))
    # t = 0.5 again at z = 4 (middle of 2..6): the union; t = 0.25 / 0.75: the nearer slice, as linear > 0.5
    np.testing.assert_array_equal(union[..., 4], np.maximum(a, b))
    for z in (3, 5):
        np.testing.assert_array_equal(union[..., z], (linear[..., z] > 0.5).astype(np.float32))
    np.testing.assert_array_equal(union[..., 3], b)
    assert set(np.unique(union)) <= {0.0, 1.0}  # binary, unlike linear


def _morphological(vol: np.ndarray, slices: list[int]) -> np.ndarray:
    # needs the itk extra, part of the test extra: without it this fails with the line naming the extra
    return interpolate_gaps(vol, slices, "morphological")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a * b).sum()) / float(a.sum() + b.sum())


def test_morphological_grows_a_square_between_two_squares():
    # a 5x5 square at z = 0 and an 11x11 one at z = 4, same centre: the frustum between them has the square of
    # side 5 + 2z at slice z. The filter dilates the small square towards the large one (rounded corners), so
    # each filled slice lies between the two and near the frustum's square; Dice >= 0.85 leaves room for the
    # corners (a 9x9 square less its 12 corner voxels has Dice 0.92 with the square).
    small, large = _square(15, 5, 10), _square(15, 2, 13)
    filled = _morphological(_volume({0: small, 4: large}, 6), [0, 4])
    np.testing.assert_array_equal(filled[..., 0], small)
    np.testing.assert_array_equal(filled[..., 4], large)
    assert not filled[..., 5].any()  # beyond the last annotated slice: nothing
    areas = [int(filled[..., z].sum()) for z in range(5)]
    assert areas == sorted(areas) and len(set(areas)) == 5  # grows strictly slice by slice
    for z in (1, 2, 3):
        assert np.all(filled[..., z] >= small) and np.all(filled[..., z] <= large)
        assert _dice(filled[..., z], _square(15, 5 - z, 10 + z)) >= 0.85
    assert set(np.unique(filled)) <= {0.0, 1.0}


def test_morphological_reads_an_empty_annotated_slice_as_the_end():
    blob = _square(9, 2, 7)
    vol = _volume({1: blob, 5: blob}, 7)
    junk = vol.copy()
    junk[..., 3] = 1  # not annotated: must be ignored
    bridged = _morphological(junk, [1, 5])
    assert [int(bridged[..., z].sum()) for z in range(7)] == [0, 25, 25, 25, 25, 25, 0]  # a prism: copied through
    ended = _morphological(vol, [1, 3, 5])  # slice 3 drawn empty: the object ends there, no bridge across it
    areas = [int(ended[..., z].sum()) for z in range(7)]
    assert areas[3] == 0 and 0 < areas[2] < 25 and 0 < areas[4] < 25 and areas[0] == areas[6] == 0


def test_morphological_without_itk_names_the_extra(monkeypatch):
    import sys

    from due_ext.interp.classical import morphological_available

    monkeypatch.setitem(sys.modules, "itk", None)  # makes `import itk` fail as if it were not installed
    assert not morphological_available()
    vol = _volume({0: _square(6, 1, 4), 2: _square(6, 1, 4)}, 3)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'due-ext\[itk\]'"):
        interpolate_gaps(vol, [0, 2], "morphological")
