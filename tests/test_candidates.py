"""Candidate block sizes: the documented rule, no duplicates, equivalent shapes collapsed."""
import numpy as np
import pytest

from secure_inference import candidate_block_sizes, candidate_costs
from secure_inference.candidates import square_ladder


def patches(h, w, height, width):
    """Independent: the set of patches (as frozensets of pixels) that a size cuts the map into."""
    if h == 0 or w == 0:
        return "identity"
    return frozenset(frozenset((r, c) for r in range(top, min(top + h, height))
                               for c in range(left, min(left + w, width)))
                     for top in range(0, height, h) for left in range(0, width, w))


@pytest.mark.parametrize("height,width", [(32, 32), (7, 7), (56, 56), (1, 1), (3, 9), (14, 5)])
def test_no_two_candidates_cut_the_map_the_same_way(height, width):
    sizes = candidate_block_sizes(height, width)
    tilings = [patches(h, w, height, width) for h, w in sizes]
    assert len(set(tilings)) == len(tilings)
    assert sizes[0].tolist() == [1, 1] and sizes[-1].tolist() == [0, 1]
    assert sizes.dtype == np.int32


def test_rule_for_a_32x32_map():
    sizes = [tuple(s) for s in candidate_block_sizes(32, 32).tolist()]
    rects = [(h, w) for h in range(1, 5) for w in range(1, 5)]
    squares = [(s, s) for s in (5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32)]
    assert sizes == [(1, 1)] + [r for r in rects if r != (1, 1)] + squares + [(0, 1)]


def test_small_map_clips_and_collapses():
    sizes = [tuple(s) for s in candidate_block_sizes(2, 3).tolist()]
    # every h >= 2 is the same single row of patches; every w >= 3 the same single column
    assert sizes == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (0, 1)]


def test_limits_are_configurable():
    assert candidate_block_sizes(56, 56, max_rect=2, max_size=8).tolist() == [
        [1, 1], [1, 2], [2, 1], [2, 2], [3, 3], [4, 4], [5, 5], [6, 6], [7, 7], [8, 8], [0, 1]]
    assert len(candidate_block_sizes(56, 56)) <= 56
    no_id = candidate_block_sizes(8, 8, include_identity=False)
    assert [0, 1] not in no_id.tolist()
    with pytest.raises(ValueError):
        candidate_block_sizes(0, 4)
    with pytest.raises(ValueError):
        candidate_block_sizes(4, 4, max_rect=0)


def test_ladder_and_costs():
    assert square_ladder(4, 64) == [5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64]
    sizes = candidate_block_sizes(7, 7)
    costs = candidate_costs(sizes, 7, 7)
    assert costs[0] == 49 and costs[-1] == 0
    assert costs[sizes.tolist().index([7, 7])] == 1
