"""Chronological holdout splits of user sequences: leave-one-out (the paper's) or a suffix of k cases.

For a user with items s[0..n-1] (oldest first) and a holdout of k_valid + k_test cases: the test targets are
the last k_test items, the valid targets the k_valid before them, and every earlier position p in
1..n-k_valid-k_test-1 is one training target. Leave-one-out is k_valid = k_test = 1. Each held-out item is its
own next-item case, with its true prefix as history. The history of a target at position p is
s[max(0, p-H):p] (H = ``max_history``), so it only ever holds items consumed *before* the target — which,
with one interaction per user–item pair, means the target never appears in its own history, and valid/test
items never appear in a training row (a later case's history does hold the earlier held-out items: they
are its true past).
"""
from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from .errors import DataPrepError

SPLIT_COLUMNS = ["user_id", "history", "target", "position"]


def user_sequences(interactions: pd.DataFrame) -> dict[str, list[str]]:
    """user_id → item ids in chronological order (``interactions`` is sorted by user, time)."""
    return {u: g.tolist() for u, g in interactions.groupby("user_id", sort=True)["item_id"]}


HOLDOUT_MODES = ("leave_one_out", "suffix")


def holdout_sizes(params: dict | None) -> tuple[int, int]:
    """(k_valid, k_test) from ``data_prep.holdout``: leave_one_out (default, the paper's) = (1, 1); suffix =
    the given counts."""
    cfg = dict(params or {})
    mode = cfg.get("mode", "leave_one_out")
    if mode not in HOLDOUT_MODES:
        raise DataPrepError(f"parameter data_prep.holdout.mode must be one of {HOLDOUT_MODES}, got {mode!r}")
    unknown = set(cfg) - {"mode", "k_valid", "k_test"}
    if unknown:
        raise DataPrepError(f"parameter data_prep.holdout: unknown keys {sorted(unknown)}; expected mode, k_valid, k_test")
    if mode == "leave_one_out":
        return 1, 1
    kv, kt = cfg.get("k_valid", 1), cfg.get("k_test", 1)
    for name, k in (("k_valid", kv), ("k_test", kt)):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise DataPrepError(f"parameter data_prep.holdout.{name} must be an integer >= 1, got {k!r}")
    return kv, kt


def user_holdout(n: int, k_valid: int, k_test: int) -> tuple[int, int]:
    """(k_valid, k_test) for a user with n items: the asked ones when at least one training target (two
    training items) is left, else leave-one-out; (0, 0) when n < 3 (the user is dropped)."""
    if n < 3:
        return 0, 0
    return (k_valid, k_test) if n >= k_valid + k_test + 2 else (1, 1)


def leave_one_out(
    interactions: pd.DataFrame, max_history: int = 20, k_valid: int = 1, k_test: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split every user's sequence (see the module docstring); the defaults are leave-one-out."""
    if int(max_history) < 1:
        raise DataPrepError(f"parameter data_prep.max_history must be >= 1, got {max_history}")
    h = int(max_history)
    train, valid, test = [], [], []
    seqs = user_sequences(interactions)
    desc = "leave-one-out" if (k_valid, k_test) == (1, 1) else f"suffix split ({k_valid} valid, {k_test} test)"
    for user, seq in tqdm(seqs.items(), total=len(seqs), desc=desc, leave=False, mininterval=1.0):
        n = len(seq)
        kv, kt = user_holdout(n, k_valid, k_test)
        if kv == 0:
            continue  # no room for train + valid + test
        first_valid, first_test = n - kt - kv, n - kt
        for p in range(1, n):
            split = train if p < first_valid else valid if p < first_test else test
            split.append((user, seq[max(0, p - h) : p], seq[p], p))

    def frame(rows: list) -> pd.DataFrame:
        df = pd.DataFrame(rows, columns=SPLIT_COLUMNS)
        df["position"] = df["position"].astype("int64")
        df["user_id"] = df["user_id"].astype(str)
        df["target"] = df["target"].astype(str)
        return df

    return frame(train), frame(valid), frame(test)


def period_of_interactions(interactions: pd.DataFrame, k_valid: int = 1, k_test: int = 1) -> pd.Series:
    """'train' / 'valid' / 'test' per interaction row, by its position in the user's sequence (the same rule
    as `leave_one_out`, including its leave-one-out fallback for short sequences)."""
    pos = interactions.groupby("user_id", sort=False).cumcount()
    n = interactions.groupby("user_id", sort=False)["item_id"].transform("size")
    suffix = n >= k_valid + k_test + 2
    kt = k_test * suffix + 1 * ~suffix
    kv = k_valid * suffix + 1 * ~suffix
    period = pd.Series("train", index=interactions.index, dtype=object)
    period[(pos >= n - kt - kv) & (n >= 3)] = "valid"
    period[(pos >= n - kt) & (n >= 3)] = "test"
    return period
