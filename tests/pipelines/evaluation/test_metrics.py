"""Metric functions against hand-computed cases: hits at known ranks, ties, targets outside the top-K."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from align3gr_pipelines.evaluation.metrics import (
    bootstrap_ci,
    list_matrix,
    mrr_at_k,
    ndcg_at_k,
    paired_permutation_test,
    ranking_metrics,
    recall_at_k,
    tie_group_at_list_end,
)

LISTS = [
    ["a", "b", "c", "d", "e", "f"],  # target at rank 0
    ["a", "b", "c", "d", "e", "f"],  # target at rank 3
    ["a", "b", "c", "d", "e", "f"],  # target at rank 5: inside top-6, outside top-5
    ["a", "b", "c", None, None, None],  # target missing, list shorter than K (padding)
]
TARGETS = ["a", "d", "f", "z"]


def test_recall_and_ndcg_by_hand():
    np.testing.assert_allclose(recall_at_k(LISTS, TARGETS, 5), [1, 1, 0, 0])
    np.testing.assert_allclose(recall_at_k(LISTS, TARGETS, 6), [1, 1, 1, 0])
    np.testing.assert_allclose(recall_at_k(LISTS, TARGETS, 1), [1, 0, 0, 0])
    np.testing.assert_allclose(ndcg_at_k(LISTS, TARGETS, 5), [1.0, 1 / math.log2(5), 0, 0])
    np.testing.assert_allclose(ndcg_at_k(LISTS, TARGETS, 10), [1.0, 1 / math.log2(5), 1 / math.log2(7), 0])
    m = ranking_metrics(LISTS, TARGETS, ks=(5, 10))
    assert list(m) == ["recall@5", "recall@10", "ndcg@5", "ndcg@10"]
    assert m["recall@10"].mean() == pytest.approx(0.75)


def test_head_metrics_by_hand_ties_included():
    # MRR: 1/rank of the target, 0 beyond k; HR@1 is recall@1
    np.testing.assert_allclose(mrr_at_k(LISTS, TARGETS, 20), [1.0, 1 / 4, 1 / 6, 0.0])
    np.testing.assert_allclose(mrr_at_k(LISTS, TARGETS, 5), [1.0, 1 / 4, 0.0, 0.0])
    lists, scores = [["a", "b", "c", "d"], ["a", "b", "c", "d"]], [[0.9, 0.5, 0.5, 0.1], [0.7, 0.7, 0.7, 0.7]]
    # user 0: c tied with b at ranks 2 and 3 -> (1/2 + 1/3) / 2; with k = 2 only rank 2 counts -> (1/2) / 2
    # user 1: a in a four-way tie at ranks 1..4 -> (1 + 1/2 + 1/3 + 1/4) / 4
    np.testing.assert_allclose(mrr_at_k(lists, ["c", "a"], 10, scores), [(1 / 2 + 1 / 3) / 2, (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4])
    np.testing.assert_allclose(mrr_at_k(lists, ["c", "a"], 2, scores), [(1 / 2) / 2, (1 + 1 / 2) / 4])
    m = ranking_metrics(lists, ["c", "a"], ks=(1, 2), rec_scores=scores, mrr_ks=(4,))
    assert list(m) == ["recall@1", "recall@2", "ndcg@2", "mrr@4"]  # ndcg@1 would repeat recall@1 (one target)
    np.testing.assert_allclose(m["recall@1"], [0.0, 0.25])
    with pytest.raises(ValueError, match="k must be >= 1"):
        mrr_at_k(lists, ["c", "a"], 0)


def test_ties_average_over_the_tied_positions():
    lists = [["a", "b", "c", "d"], ["a", "b", "c", "d"], ["a", "b", "c", "d"]]
    scores = [[0.9, 0.5, 0.5, 0.1], [0.9, 0.5, 0.5, 0.1], [0.7, 0.7, 0.7, 0.7]]
    targets = ["c", "a", "a"]
    # user 0: target tied with b at positions {1, 2}: recall@2 = 1/2, NDCG@5 = (1/log2 3 + 1/log2 4) / 2
    # user 1: target alone at position 0
    # user 2: four-way tie at positions {0..3}: recall@1 = 1/4, recall@3 = 3/4
    np.testing.assert_allclose(recall_at_k(lists, targets, 2, scores), [0.5, 1.0, 0.5])
    np.testing.assert_allclose(recall_at_k(lists, targets, 1, scores), [0.0, 1.0, 0.25])
    np.testing.assert_allclose(recall_at_k(lists, targets, 3, scores), [1.0, 1.0, 0.75])
    expected = (1 / math.log2(3) + 1 / math.log2(4)) / 2
    all4 = sum(1 / math.log2(i + 2) for i in range(4)) / 4
    np.testing.assert_allclose(ndcg_at_k(lists, targets, 5, scores), [expected, 1.0, all4])
    # NDCG@2 for user 0: only position 1 of the tie group counts
    np.testing.assert_allclose(ndcg_at_k(lists, targets, 2, scores)[0], (1 / math.log2(3)) / 2)
    # the -inf padding slots never tie with a real target
    pad_scores = [[0.3, -np.inf, -np.inf]]
    np.testing.assert_allclose(recall_at_k([["a", None, None]], ["a"], 1, pad_scores), [1.0])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="targets"):
        recall_at_k(LISTS, TARGETS[:2], 5)
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(LISTS, TARGETS, 0)
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(LISTS, TARGETS, 5, rec_scores=[[1.0]])


def test_bootstrap_ci_brackets_the_mean_and_is_deterministic():
    x = np.r_[np.ones(30), np.zeros(70)]
    lo, hi = bootstrap_ci(x, 2000, 0.95, seed=1)
    assert lo < 0.3 < hi
    # normal approximation of the CI of a proportion: 0.3 ± 1.96 * sqrt(0.21 / 100) = ±0.09
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.21 / 100), rel=0.2)
    assert bootstrap_ci(x, 2000, 0.95, seed=1) == (lo, hi)
    assert bootstrap_ci(np.full(50, 0.25), 100) == (0.25, 0.25)
    many_lo, many_hi = bootstrap_ci(np.stack([x, 1 - x], axis=1), 2000, 0.95, seed=1)
    assert many_lo[0] == lo and many_hi[0] == hi  # same resamples for every series


def test_paired_permutation_test():
    rng = np.random.default_rng(0)
    base = (rng.random(400) < 0.2).astype(float)
    better = np.maximum(base, (rng.random(400) < 0.3).astype(float))
    assert paired_permutation_test(better, base, 2000, seed=0) < 0.01
    assert paired_permutation_test(base, base, 2000) == 1.0
    # two-sided: swapping the models gives the same p-value
    assert paired_permutation_test(base, better, 2000, seed=0) == paired_permutation_test(better, base, 2000, seed=0)
    # one user better by 1, one worse by 1, rest equal: mean difference 0 → p = 1
    a, b = np.zeros(50), np.zeros(50)
    a[0], b[1] = 1.0, 1.0
    assert paired_permutation_test(a, b, 2000, seed=0) == pytest.approx(1.0, abs=1e-3)
    # exact: 3 users with differences (+1, +1, +1): of the 8 sign patterns, 2 reach |mean| = 1
    p = paired_permutation_test(np.ones(3), np.zeros(3), 20000, seed=0)
    assert p == pytest.approx(2 / 8, abs=0.02)
    both = paired_permutation_test(np.stack([better, base], 1), np.stack([base, base], 1), 2000, seed=0)
    assert both[0] < 0.01 and both[1] == 1.0


def test_tie_group_at_list_end_by_hand():
    lists = [list("abcd")] * 5
    scores = [[4, 3, 3, 3], [4, 3, 3, 3], [4, 3, 2, 2], [4, 3, 2, 1], [4, 4, 3, 3]]
    targets = ["b", "d", "c", "d", "z"]
    # user 0: group {1, 2, 3} starts within k=2 and holds the last slot -> flagged
    # user 1: the same group, target at the end -> flagged too (the group is what counts)
    # user 2: group {2, 3} starts after k=2 -> its credit at k <= 2 is 0 however long it runs
    # user 3: the target alone at the last slot is no evidence of a tie; user 4: a miss
    assert tie_group_at_list_end(lists, targets, scores, 2).tolist() == [True, True, False, False, False]
    assert tie_group_at_list_end(lists, targets, scores, 3).tolist() == [True, True, True, False, False]


def test_list_matrix_widens_to_the_longest_list_and_keeps_user_order():
    recs = pd.DataFrame({"user_id": ["u2", "u2", "u2", "u1", "ghost"], "rank": [1, 2, 3, 1, 1],
                         "item_id": ["a", "b", "c", "d", "x"], "score": [3.0, 2.0, 2.0, 5.0, 9.0]})
    items, scores = list_matrix(recs, pd.Series(["u1", "u2", "u3"]), min_width=2)
    # width 3, not 2: the tie between b and c straddles K = 2 and must stay visible to the tie rule
    assert items.tolist() == [["d", None, None], ["a", "b", "c"], [None, None, None]]
    assert scores[1].tolist() == [3.0, 2.0, 2.0] and np.isneginf(scores[2]).all()
    np.testing.assert_allclose(recall_at_k(items, ["z", "c", "z"], 2, scores), [0, 0.5, 0])
    assert list_matrix(recs.iloc[:0], pd.Series(["u1"]), min_width=4)[0].shape == (1, 4)
