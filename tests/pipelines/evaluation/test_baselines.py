"""Baselines on hand-checkable data: popularity counts, item-kNN similarities, deterministic top-K."""
from __future__ import annotations

import math

import numpy as np

from align3gr_pipelines.cf.baselines import ItemKNN, MostPopular, SASRecScorer, recommend, top_k


def test_most_popular_counts_every_training_interaction():
    pop = MostPopular(["a", "b", "c", "d"], [["a", "b", "a"], ["b", "c"], ["b", "x"]])
    np.testing.assert_array_equal(pop.counts, [2, 3, 1, 0])
    idx, val = top_k(pop.score([[]]), 3)
    assert idx.tolist() == [[1, 0, 2]] and val.tolist() == [[3, 2, 1]]


def test_top_k_breaks_ties_by_index_and_pads():
    scores = np.array([[1.0, 5.0, 5.0, 5.0, 0.0], [2.0, -np.inf, -np.inf, -np.inf, -np.inf]])
    idx, val = top_k(scores, 2)
    assert idx.tolist() == [[1, 2], [0, -1]]
    assert val[1, 1] == -np.inf
    idx, _ = top_k(scores[:1], 7)
    assert idx.tolist() == [[1, 2, 3, 0, 4, -1, -1]]


def test_item_knn_cosine_by_hand():
    # users: {a,b}, {a,b,c}, {c,d}; |a|=2,|b|=2,|c|=2,|d|=1; co(a,b)=2, co(b,c)=1, co(a,c)=1, co(c,d)=1
    knn = ItemKNN(["a", "b", "c", "d"], [["a", "b"], ["a", "b", "c"], ["c", "d"]], neighbors=10, shrink=0.0)
    sim = knn.similarity.toarray()
    assert math.isclose(sim[0, 1], 1.0) and sim[0, 0] == 0.0
    assert math.isclose(sim[1, 2], 1 / 2) and math.isclose(sim[2, 3], 1 / math.sqrt(2))
    # history [a, d]: score_j = sim(a, j) + sim(d, j)
    np.testing.assert_allclose(knn.score([["a", "d"]])[0], [0, 1.0, 0.5 + 1 / math.sqrt(2), 0])
    pruned = ItemKNN(["a", "b", "c", "d"], [["a", "b"], ["a", "b", "c"], ["c", "d"]], neighbors=1, shrink=0.0)
    assert (pruned.similarity.getnnz(axis=1) <= 1).all()
    assert pruned.similarity[2, 3] > 0  # c keeps d (0.71 > 0.5), its nearest neighbour


def test_sasrec_scorer_maps_columns_and_batches():
    class Fake:
        item_ids = ["c", "a"]

        def score(self, histories):
            import torch

            return torch.tensor([[float(len(h)), 10.0] for h in histories])

    s = SASRecScorer(Fake(), ["a", "b", "c"])
    out = s.score([["x"], ["x", "y"]])
    assert out[0].tolist() == [10.0, -np.inf, 1.0]
    idx, _ = recommend(s, [["x"]] * 5, k=3, batch_size=2)
    assert idx.tolist() == [[0, 2, -1]] * 5
