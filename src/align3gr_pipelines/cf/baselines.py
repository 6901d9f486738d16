"""Non-LM recommenders evaluated beside the LMs: most-popular, item-kNN, and SASRec (the model trained by
the tokenization stage with full-softmax CE, and the one evaluation trains with the paper's BCE loss). All
are fitted on training interactions only (the items of `train_sequences`), score every catalogue item for
a history, and share one top-K routine.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
from tqdm.auto import tqdm


class Scorer(Protocol):
    def score(self, histories: Sequence[Sequence[str]]) -> np.ndarray: ...


class MostPopular:
    """Every user gets the items with the most training interactions (repeats counted)."""

    def __init__(self, item_ids: Sequence[str], sequences: Iterable[Sequence[str]]):
        self.item_ids = [str(i) for i in item_ids]
        index = {iid: j for j, iid in enumerate(self.item_ids)}
        seen = [index[str(i)] for seq in sequences for i in seq if str(i) in index]
        self.counts = np.bincount(np.asarray(seen, dtype=np.int64), minlength=len(self.item_ids)).astype(np.float64)

    def score(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(histories), len(self.counts)))


class ItemKNN:
    """Item-based kNN (Sarwar et al., 2001; Deshpande & Karypis, 2004): cosine similarity of items over the
    users who interacted with them, `shrink` damping similarities built on few co-occurrences, each item
    keeping its `neighbors` most similar items. A history's score for item j is the sum of similarities
    between j and the history's items."""

    def __init__(
        self, item_ids: Sequence[str], sequences: Iterable[Sequence[str]], neighbors: int = 100, shrink: float = 10.0
    ):
        if neighbors < 1:
            raise ValueError(f"item_knn.neighbors must be >= 1, got {neighbors}")
        if shrink < 0:
            raise ValueError(f"item_knn.shrink must be >= 0, got {shrink}")
        self.item_ids = [str(i) for i in item_ids]
        self.index = {iid: j for j, iid in enumerate(self.item_ids)}
        n = len(self.item_ids)
        rows, cols = [], []
        for u, seq in enumerate(sequences):
            known = {self.index[str(i)] for i in seq if str(i) in self.index}
            rows += [u] * len(known)
            cols += sorted(known)
        users = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(max(rows, default=-1) + 1, n))
        co = (users.T @ users).tocsr()
        norm = np.sqrt(co.diagonal())
        co.setdiag(0.0)
        co.eliminate_zeros()
        coo = co.tocoo()
        sim = coo.data / (norm[coo.row] * norm[coo.col] + shrink)
        self.similarity = self._keep_top(sp.csr_matrix((sim, (coo.row, coo.col)), shape=(n, n)), neighbors)

    @staticmethod
    def _keep_top(sim: sp.csr_matrix, neighbors: int) -> sp.csr_matrix:
        """Row i keeps its `neighbors` largest entries (ties by column index); column j's scores then sum
        over the history items that count j among their neighbours."""
        data, indices, indptr = [], [], [0]
        for i in range(sim.shape[0]):
            lo, hi = sim.indptr[i], sim.indptr[i + 1]
            d, c = sim.data[lo:hi], sim.indices[lo:hi]
            if len(d) > neighbors:
                keep = np.lexsort((c, -d))[:neighbors]
                d, c = d[keep], c[keep]
            data.append(d)
            indices.append(c)
            indptr.append(indptr[-1] + len(d))
        cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt))
        return sp.csr_matrix((cat(data, np.float64), cat(indices, np.int64), np.asarray(indptr)), shape=sim.shape)

    def score(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        rows, cols = [], []
        for r, h in enumerate(histories):
            for i in h:
                if str(i) in self.index:
                    rows.append(r)
                    cols.append(self.index[str(i)])
        hist = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(histories), len(self.item_ids)))
        return np.asarray((hist @ self.similarity).todense())


class SASRecScorer:
    """A trained SASRec (`score(histories)` → logits over its `item_ids`), re-indexed to the evaluation
    catalogue; catalogue items SASRec does not know get -inf. `dataset` names the checkpoint in errors."""

    def __init__(self, model: Any, item_ids: Sequence[str], dataset: str = "sasrec_model"):
        self.model = model
        self.item_ids = [str(i) for i in item_ids]
        theirs = {str(i): j for j, i in enumerate(model.item_ids)}
        self.columns = np.array([theirs.get(i, -1) for i in self.item_ids])
        if (self.columns < 0).all():
            raise ValueError(f"SASRec baseline: none of the catalogue's item ids (item_scids.id) is in {dataset}.item_ids")

    def score(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        logits = np.asarray(self.model.score([list(map(str, h)) for h in histories]), dtype=np.float64)
        out = logits[:, np.maximum(self.columns, 0)]
        out[:, self.columns < 0] = -np.inf
        return out


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-first column indices and scores of each row's k highest finite scores (ties by column index;
    -1 / -inf past the finite ones)."""
    n = scores.shape[1]
    k_eff = min(k, n)
    cand = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff] if k_eff < n else np.tile(np.arange(n), (len(scores), 1))
    vals = np.take_along_axis(scores, cand, axis=1)
    order = np.lexsort((cand, -vals), axis=1)
    idx, vals = np.take_along_axis(cand, order, axis=1), np.take_along_axis(vals, order, axis=1)
    # argpartition may pick any of several items tied at the k-th score; re-pick them by column index.
    kth = vals[:, -1:]
    for r in np.nonzero((scores == kth).sum(axis=1) > (vals == kth).sum(axis=1))[0]:
        ranked = np.lexsort((np.arange(n), -scores[r]))[:k_eff]
        idx[r], vals[r] = ranked, scores[r, ranked]
    idx = np.where(np.isfinite(vals), idx, -1)
    if k_eff < k:
        idx = np.pad(idx, ((0, 0), (0, k - k_eff)), constant_values=-1)
        vals = np.pad(vals, ((0, 0), (0, k - k_eff)), constant_values=-np.inf)
    return idx, np.where(idx >= 0, vals, -np.inf)


def recommend(
    scorer: Scorer, histories: Sequence[Sequence[str]], k: int, batch_size: int = 1024, desc: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (indices into the scorer's item_ids, scores) for every history, in batches."""
    idx, val = [], []
    for s in tqdm(range(0, len(histories), batch_size), desc=desc, disable=desc is None):
        i, v = top_k(np.asarray(scorer.score(histories[s : s + batch_size]), dtype=np.float64), k)
        idx.append(i)
        val.append(v)
    if not idx:
        return np.zeros((0, k), dtype=np.int64), np.zeros((0, k))
    return np.concatenate(idx), np.concatenate(val)
