"""Leave-one-out ranking metrics, bootstrap confidence intervals and a paired significance test.

One held-out target per user. A user's recommendation list is ranked best first; Recall@K (the hit rate,
since there is one target) and NDCG@K = 1 / log2(rank + 2) for a 0-based rank < K, else 0. A target
missing from the list counts as a miss.

Ties: when list scores are given and the target's score equals that of other listed items, the target's
credit is the mean over the positions its tie group occupies, i.e. the expected metric under a random
order of the tied items (McSherry & Najork, ECIR 2008). A recommender therefore gains nothing from an
arbitrary tie-break. Only listed items are seen, so a tie group running past the end of the list is
counted up to the list's end.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def _as_list_matrix(rec_items: Sequence[Sequence[object]] | np.ndarray) -> np.ndarray:
    arr = np.asarray(rec_items, dtype=object)
    if arr.ndim != 2:
        raise ValueError(f"rec_items must be a [n_users, list_length] matrix, got shape {arr.shape}")
    return arr


def case_key(frame: pd.DataFrame) -> pd.Series:
    """What identifies one evaluated case: the user, and with a `case` column (the held-out position; a
    suffix holdout has several per user) the user and that position."""
    users = frame["user_id"].astype(str)
    return users + "\x1f" + frame["case"].astype(str) if "case" in frame.columns else users


def case_lists(recs: pd.DataFrame, cases: pd.DataFrame, min_width: int) -> tuple[np.ndarray, np.ndarray]:
    """`list_matrix` of one model's lists in the order of the rows of `cases`, matched by `case_key`."""
    return list_matrix(recs.assign(user_id=case_key(recs)), case_key(cases).reset_index(drop=True), min_width)


def list_matrix(recs: pd.DataFrame, users: pd.Series, min_width: int) -> tuple[np.ndarray, np.ndarray]:
    """[n_users, width] item ids (None = empty) and scores (-inf) of one model's lists (columns user_id, rank,
    item_id, score), in `users` order; a user without rows keeps an empty list. width is the larger of
    min_width (the largest K) and the longest kept list: cutting the lists at K first would cut tie groups
    that straddle K, and the tie rule would then credit an arbitrary tie-break."""
    width = max(int(min_width), int(recs["rank"].max()) if len(recs) else 0)
    items = np.full((len(users), width), None, dtype=object)
    scores = np.full((len(users), width), -np.inf)
    row = pd.Series(np.arange(len(users)), index=users.to_numpy())
    where = row.reindex(recs["user_id"].to_numpy()).to_numpy()
    ok = ~np.isnan(where)
    rr, cc = where[ok].astype(int), recs["rank"].to_numpy()[ok] - 1
    items[rr, cc] = recs["item_id"].to_numpy()[ok]
    scores[rr, cc] = recs["score"].to_numpy()[ok]
    return items, scores


def tie_group_positions(
    rec_items: Sequence[Sequence[object]] | np.ndarray,
    targets: Sequence[object],
    rec_scores: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> np.ndarray:
    """BoolTensor-like [n_users, list_length]: the list positions the target may occupy (its own
    position, plus those of items tied with it when scores are given); all False for a miss."""
    items = _as_list_matrix(rec_items)
    tgt = np.asarray(list(targets), dtype=object)
    if len(tgt) != items.shape[0]:
        raise ValueError(f"{len(tgt)} targets for {items.shape[0]} recommendation lists")
    hit = items == tgt[:, None]
    if rec_scores is None:
        return hit
    scores = np.asarray(rec_scores, dtype=np.float64)
    if scores.shape != items.shape:
        raise ValueError(f"rec_scores shape {scores.shape} != rec_items shape {items.shape}")
    found = hit.any(axis=1)
    pos = hit.argmax(axis=1)
    target_score = scores[np.arange(len(pos)), pos]
    listed = ~pd.isna(items)  # -1 padding (no item) never ties
    return (scores == target_score[:, None]) & listed & found[:, None]


def tie_group_at_list_end(
    rec_items: Sequence[Sequence[object]] | np.ndarray,
    targets: Sequence[object],
    rec_scores: Sequence[Sequence[float]] | np.ndarray | None,
    k: int,
) -> np.ndarray:
    """Bool [n_users]: the target ties with other listed items, its tie group starts within the top k and
    holds the list's last position. Only then can items cut from the list (tied with the last one) change
    the credit at some k' <= k: the module's tie rule counts the listed part of the group only, so such a
    user's credit may be too high. A caller reports how many users that concerns rather than hide it."""
    group = tie_group_positions(rec_items, targets, rec_scores)
    if group.shape[1] == 0:
        return np.zeros(group.shape[0], dtype=bool)
    return (group.sum(axis=1) > 1) & group[:, -1] & group[:, :k].any(axis=1)


def recall_at_k(
    rec_items: Sequence[Sequence[object]] | np.ndarray,
    targets: Sequence[object],
    k: int,
    rec_scores: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-user Recall@k (hit rate) in [0, 1]; fractional only for a tie group straddling position k."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    group = tie_group_positions(rec_items, targets, rec_scores)
    size = group.sum(axis=1)
    inside = group[:, :k].sum(axis=1)
    return np.where(size > 0, inside / np.maximum(size, 1), 0.0)


def ndcg_at_k(
    rec_items: Sequence[Sequence[object]] | np.ndarray,
    targets: Sequence[object],
    k: int,
    rec_scores: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-user NDCG@k with a single relevant item (the ideal DCG is 1)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    group = tie_group_positions(rec_items, targets, rec_scores)
    width = group.shape[1]
    gain = np.where(np.arange(width) < k, 1.0 / np.log2(np.arange(width) + 2.0), 0.0)
    size = group.sum(axis=1)
    return np.where(size > 0, (group * gain).sum(axis=1) / np.maximum(size, 1), 0.0)


def mrr_at_k(
    rec_items: Sequence[Sequence[object]] | np.ndarray,
    targets: Sequence[object],
    k: int,
    rec_scores: Sequence[Sequence[float]] | np.ndarray | None = None,
) -> np.ndarray:
    """Per-user reciprocal rank of the target, 0 beyond position k; a tie group gets the mean of 1/rank over
    its positions (those beyond k count 0), the expectation over a random tie-break, as for Recall/NDCG."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    group = tie_group_positions(rec_items, targets, rec_scores)
    width = group.shape[1]
    gain = np.where(np.arange(width) < k, 1.0 / (np.arange(width) + 1.0), 0.0)
    size = group.sum(axis=1)
    return np.where(size > 0, (group * gain).sum(axis=1) / np.maximum(size, 1), 0.0)


def ranking_metrics(
    rec_items: Sequence[Sequence[object]] | np.ndarray,
    targets: Sequence[object],
    ks: Sequence[int] = (5, 10),
    rec_scores: Sequence[Sequence[float]] | np.ndarray | None = None,
    mrr_ks: Sequence[int] = (),
) -> dict[str, np.ndarray]:
    """{"recall@k": per-user array, "ndcg@k": ..., "mrr@m": ...} for every k in ks and m in mrr_ks. With one
    target per case Recall@1 is HR@1 and NDCG@1 equals it, so ndcg@1 is not repeated."""
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(rec_items, targets, k, rec_scores)
    for k in ks:
        if k > 1:
            out[f"ndcg@{k}"] = ndcg_at_k(rec_items, targets, k, rec_scores)
    for k in mrr_ks:
        out[f"mrr@{k}"] = mrr_at_k(rec_items, targets, k, rec_scores)
    return out


def _resample_counts(n: int, n_resamples: int, seed: int, chunk: int = 250):
    """Bootstrap resamples of n users as count vectors [m, n], in chunks."""
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_resamples:
        m = min(chunk, n_resamples - done)
        flat = rng.integers(0, n, size=(m, n)) + n * np.arange(m)[:, None]
        yield np.bincount(flat.ravel(), minlength=m * n).reshape(m, n).astype(np.float64)
        done += m


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Percentile bootstrap CI of the mean over users, for per-user values [n] or several series [n, S]
    at once (then arrays [S]). The same seed resamples the same users for every series, so intervals of
    models evaluated on the same user list are comparable."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"bootstrap_ci needs per-user values [n] or [n, S] with n > 0, got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    means = np.concatenate([c @ x / x.shape[0] for c in _resample_counts(x.shape[0], n_resamples, seed)])
    alpha = (1.0 - confidence) / 2
    low, high = np.quantile(means, alpha, axis=0), np.quantile(means, 1 - alpha, axis=0)
    return (float(low), float(high)) if x.ndim == 1 else (low, high)


def bootstrap_ratio_ci(
    numerator: Sequence[float] | np.ndarray, denominator: Sequence[float] | np.ndarray, n_resamples: int = 1000,
    confidence: float = 0.95, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap CI of sum(numerator) / sum(denominator) over users, per-user values [n, S] (one
    column per series); users are resampled as in `bootstrap_ci` (same seed, same resamples). A resample
    whose denominator sums to 0 has no ratio and is left out; NaN bounds when every resample is."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    if num.shape != den.shape or num.ndim != 2 or num.shape[0] == 0:
        raise ValueError(f"bootstrap_ratio_ci needs two equally shaped [n, S] arrays with n > 0, got {num.shape} and {den.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    top = np.concatenate([c @ num for c in _resample_counts(num.shape[0], n_resamples, seed)])
    bottom = np.concatenate([c @ den for c in _resample_counts(den.shape[0], n_resamples, seed)])
    ratios = np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)
    alpha = (1.0 - confidence) / 2
    defined = ~np.isnan(ratios).all(axis=0)
    low, high = np.full(num.shape[1], np.nan), np.full(num.shape[1], np.nan)
    if defined.any():
        low[defined] = np.nanquantile(ratios[:, defined], alpha, axis=0)
        high[defined] = np.nanquantile(ratios[:, defined], 1 - alpha, axis=0)
    return low, high


def paired_permutation_test(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, n_permutations: int = 10000, seed: int = 0
) -> float | np.ndarray:
    """Two-sided p-value of H0 "a and b have the same mean" for paired per-user values (same users, same
    order), [n] or several series [n, S]: the observed mean difference against random sign flips of the
    per-user differences (a flip of a zero difference changes nothing). Add-one smoothed, so never 0;
    1.0 when every difference is 0."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ValueError(f"paired test needs two equally shaped [n] or [n, S] arrays, got {x.shape} and {y.shape}")
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be >= 1, got {n_permutations}")
    d = (x - y).reshape(x.shape[0], -1)
    n = d.shape[0]
    observed = np.abs(d.mean(axis=0))
    tol = 1e-12 * np.maximum(1.0, observed)
    rng = np.random.default_rng(seed)
    extreme = np.zeros(d.shape[1])
    done = 0
    while done < n_permutations:
        m = min(500, n_permutations - done)
        signs = (rng.integers(0, 2, size=(m, n)) * 2 - 1).astype(np.float64)
        extreme += (np.abs(signs @ d / n) >= observed - tol).sum(axis=0)
        done += m
    p = (extreme + 1) / (n_permutations + 1)
    p = np.where(np.all(d == 0, axis=0), 1.0, p)
    return float(p[0]) if x.ndim == 1 else p
