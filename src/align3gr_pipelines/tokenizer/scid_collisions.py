"""Making item SCIDs unique.

Method (``tail_reassignment``): an item whose whole code tuple is shared keeps its leading codes and gets a
new *tail*. In each group of identical SCIDs the item that the shared codewords fit best keeps them; the
others move to tails that no item under the same prefix uses, by a minimum-total-distortion assignment
(Hungarian) between what the tail levels quantised for them and the sum of the candidate tail codewords.
The tail is first the last level alone; only collisions it cannot fix (a prefix with more items than the
last codebook has codes) are retried with the last two levels. Every SCID keeps L levels, stays inside the
trained codebooks and stays as close as possible to what the quantiser meant.

Only if that still leaves collisions does every item get one extra level: its rank among the items sharing
its SCID (0 for all others), so lengths stay equal. The report says how many items each step touched.

Method (``lowest_free_last_code``, ``resolve_fixed_collisions``): for codes with no quantiser behind them
(LC-Rec's released item index used as item SCIDs), so no distortion to minimise. In each group of identical
SCIDs the first item in table order keeps its codes; each other one takes the lowest last-level code that no
item under the same prefix uses. The extra level is again the last resort (a prefix whose last level is full).
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

# Tails of up to this many combinations are searched exhaustively (256 codes x 2 levels = 65,536).
MAX_TAIL_CANDIDATES = 1 << 17


def colliding_mask(codes: np.ndarray) -> np.ndarray:
    """True for every row whose code tuple also belongs to another row."""
    if len(codes) == 0:
        return np.zeros(0, dtype=bool)
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return counts[inverse.reshape(-1)] > 1


def collision_stats(codes: np.ndarray) -> dict[str, float]:
    mask = colliding_mask(codes)
    return {
        "colliding": float(mask.sum()),
        "collision_rate": float(mask.mean()) if len(mask) else 0.0,
        "unique_scids": float(len(np.unique(codes, axis=0))) if len(codes) else 0.0,
    }


def _group_ids(rows: np.ndarray) -> np.ndarray:
    if rows.shape[1] == 0:
        return np.zeros(len(rows), dtype=np.int64)
    return np.unique(rows, axis=0, return_inverse=True)[1].reshape(-1)


def _sq_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a**2).sum(-1)[:, None] - 2 * a @ b.T + (b**2).sum(-1)[None, :]


def _min_distortion_assignment(a: np.ndarray, b: np.ndarray, per_row: int = 32, chunk: int = 256) -> np.ndarray:
    """Row i of ``a`` -> a distinct row of ``b`` minimising the total squared distance (len(b) >= len(a)).

    Only each row's nearest few candidates (topped up to one per row) go to the Hungarian solver: an optimal
    assignment rarely reaches further, and it keeps a popular prefix with hundreds of moves fast and small.
    """
    m = min(per_row, len(b))
    near_sets, best = [], np.full(len(b), np.inf)
    for start in range(0, len(a), chunk):
        d = _sq_dist(a[start : start + chunk], b)
        near_sets.append(np.argpartition(d, m - 1, axis=1)[:, :m] if m < len(b) else np.tile(np.arange(len(b)), (len(d), 1)))
        best = np.minimum(best, d.min(0))
    near = np.unique(np.concatenate(near_sets))
    if len(near) < len(a):
        rest = np.setdiff1d(np.arange(len(b)), near)
        near = np.sort(np.concatenate([near, rest[np.argsort(best[rest], kind="stable")[: len(a) - len(near)]]]))
    rows, cols = linear_sum_assignment(_sq_dist(a, b[near]))
    out = np.empty(len(a), dtype=np.int64)
    out[rows] = near[cols]
    return out


def _reassign_tails(codes: np.ndarray, residuals: np.ndarray, codebooks: np.ndarray, tail: int) -> int:
    """One pass over the prefixes of length L - tail that hold collisions; edits codes in place."""
    n, levels = codes.shape
    k = codebooks.shape[1]
    j = levels - tail
    combos = np.array(list(itertools.product(range(k), repeat=tail)), dtype=np.int64)  # [M, tail]
    tail_vecs = codebooks[np.arange(j, levels)[None, :], combos].sum(1)  # [M, d]
    flat = lambda c: (c * (k ** np.arange(tail - 1, -1, -1))).sum(-1)  # noqa: E731 - tail tuple -> row of combos
    target = residuals[:, j]  # what levels j.. quantised, [n, d]
    prefix_of = _group_ids(codes[:, :j])
    clash = colliding_mask(codes)
    moved = 0
    for p in np.unique(prefix_of[clash]):
        members = np.flatnonzero(prefix_of == p)
        if len(members) > len(combos):
            continue  # more items than tails under this prefix
        member_tails = flat(codes[members, j:])
        keep, move = [], []
        for t in np.unique(member_tails):
            group = members[member_tails == t]
            cost = ((target[group] - tail_vecs[t]) ** 2).sum(-1)
            best = group[np.argmin(cost)]  # argmin: the lowest index wins ties
            keep.append(t)
            move.extend(int(i) for i in group if i != best)
        if not move:
            continue
        free = np.setdiff1d(np.arange(len(combos)), keep)
        codes[move, j:] = combos[free[_min_distortion_assignment(target[move], tail_vecs[free])]]
        moved += len(move)
    return moved


def resolve_collisions(
    codes: np.ndarray, residuals: np.ndarray, codebooks: np.ndarray, max_tail: int = 2
) -> tuple[np.ndarray, dict[str, Any]]:
    """codes [n, L] -> unique codes [n, L] (or [n, L+1] in the fallback) and a report.

    residuals [n, L, d]: what each level quantised for each item; codebooks [L, K, d].
    """
    original = np.asarray(codes, dtype=np.int64)
    codes = original.copy()
    residuals, codebooks = np.asarray(residuals, dtype=np.float64), np.asarray(codebooks, dtype=np.float64)
    n, levels = codes.shape
    k = codebooks.shape[1]
    report = _new_report("tail_reassignment", codes)
    for tail in range(1, min(max_tail, levels) + 1):
        if not colliding_mask(codes).any() or k**tail > MAX_TAIL_CANDIDATES:
            break
        moved = _reassign_tails(codes, residuals, codebooks, tail)
        report[f"items_reassigned_tail{tail}"] = moved
        report["items_reassigned"] += moved  # moves, an item moved at both depths counts twice
    return _finish(original, codes, report)


def _new_report(method: str, codes: np.ndarray) -> dict[str, Any]:
    return {"method": method, "colliding_items_before": int(colliding_mask(codes).sum()), "items_reassigned": 0,
            "extra_level_added": False, "items_with_extra_code": 0}


def _finish(original: np.ndarray, codes: np.ndarray, report: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The last resort (an extra level: rank among the items still sharing a SCID) and the report's totals."""
    n, levels = original.shape
    still = colliding_mask(codes)
    if still.any():
        inverse = _group_ids(codes)
        extra = np.zeros(n, dtype=np.int64)
        for g in np.unique(inverse[still]):
            members = np.flatnonzero(inverse == g)
            extra[members] = np.arange(len(members))
        codes = np.concatenate([codes, extra[:, None]], axis=1)
        report["extra_level_added"] = True
        report["items_with_extra_code"] = int((extra > 0).sum())
    report["colliding_items_after"] = int(colliding_mask(codes).sum())
    changed = (codes[:, :levels] != original).any(1)
    if report["extra_level_added"]:
        changed |= codes[:, levels] > 0
    report["items_touched"] = int(changed.sum())
    report["levels"] = int(codes.shape[1])
    return codes, report


def resolve_fixed_collisions(codes: np.ndarray, codebook_size: int) -> tuple[np.ndarray, dict[str, Any]]:
    """codes [n, L] given from outside (no residuals, no codebooks) -> unique codes [n, L] (or [n, L+1] in the
    fallback) and a report with the keys of ``resolve_collisions``' report.

    The first item of each group of identical SCIDs (table order) keeps its codes; every other one moves to the
    lowest last-level code in [0, codebook_size) unused under its prefix (the first L-1 codes).
    """
    original = np.asarray(codes, dtype=np.int64)
    if original.ndim != 2 or original.shape[1] < 1:
        raise ValueError(f"resolve_fixed_collisions: expected codes of shape [n_items, levels >= 1], got {original.shape}")
    if len(original) and (original.min() < 0 or original.max() >= codebook_size):
        raise ValueError(f"resolve_fixed_collisions: codes must lie in [0, {codebook_size}), got "
                         f"[{int(original.min())}, {int(original.max())}]")
    codes = original.copy()
    report = _new_report("lowest_free_last_code", codes)
    clash = colliding_mask(codes)
    if clash.any():
        prefix_of = _group_ids(codes[:, :-1])
        used: dict[int, set[int]] = {}
        for p, last in zip(prefix_of, codes[:, -1]):
            used.setdefault(int(p), set()).add(int(last))
        kept: set[tuple[int, ...]] = set()
        for row in np.flatnonzero(clash):
            key = tuple(int(c) for c in codes[row])
            if key not in kept:
                kept.add(key)  # the first item of the group keeps its SCID
                continue
            taken = used[int(prefix_of[row])]
            free = next((c for c in range(codebook_size) if c not in taken), None)
            if free is None:
                continue  # this prefix's last level is full: left to the extra level
            codes[row, -1] = free
            taken.add(free)
            report["items_reassigned"] += 1
    return _finish(original, codes, report)
