"""The dataset examples' top lists (worker/batches/examples.py): merged in any grouping and
order, they equal a sort of every score (score descending, member index ascending), with the
sum, maximum and count of all scores."""

from __future__ import annotations

import numpy as np
import pytest

from worker.batches.examples import NO_ITEM, TopLists

LAYOUT = [{"name": "a", "shape": [3, 4, 4]}, {"name": "b", "shape": [2, 2, 2]}]


def brute_force(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    items, channels = scores.shape
    top_items = np.full((k, channels), NO_ITEM, np.int64)
    top_scores = np.full((k, channels), -np.inf, np.float32)
    for c in range(channels):
        order = sorted(range(items), key=lambda i: (-scores[i, c], i))[:k]
        top_items[: len(order), c] = order
        top_scores[: len(order), c] = scores[order, c]
    return top_items, top_scores


@pytest.mark.parametrize("k", [1, 3, 9])
@pytest.mark.parametrize("groups", [[20], [1] * 20, [7, 1, 12], [5, 5, 5, 5]])
def test_merged_partials_equal_a_sort_of_every_score(k, groups):
    rng = np.random.default_rng(k + len(groups))
    # Few distinct values, so that ties are many and decided by the member index.
    scores = rng.integers(0, 6, (sum(groups), 5)).astype(np.float32) / 4
    members = rng.permutation(len(scores))
    partials, start = [], 0
    for size in groups:
        part = TopLists.empty(k, LAYOUT)
        rows = members[start : start + size]
        part.add(scores[rows], rows.astype(np.int64))
        partials.append(TopLists.from_bytes(part.to_bytes()))
        start += size
    merged = partials[-1]
    for part in reversed(partials[:-1]):
        merged.merge(part)
    want_items, want_scores = brute_force(scores, k)
    np.testing.assert_array_equal(merged.items, want_items)
    np.testing.assert_array_equal(merged.scores, want_scores)
    np.testing.assert_allclose(merged.total, scores.sum(axis=0, dtype=np.float64))
    np.testing.assert_array_equal(merged.maximum, scores.max(axis=0))
    assert merged.count == len(scores) and merged.layout == LAYOUT


def test_nan_scores_rank_last():
    top = TopLists.empty(2, LAYOUT)
    scores = np.zeros((3, 5), np.float32)
    scores[0] = np.nan
    top.add(scores, np.array([0, 1, 2], np.int64))
    assert top.items[:, 0].tolist() == [1, 2]
