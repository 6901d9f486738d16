"""Leave-one-out split of chronological user sequences.

For a user with items s[0..n-1] (oldest first): the test target is s[n-1], the valid target s[n-2], and
every earlier position p in 1..n-3 is one training target. The history of a target at position p is
s[max(0, p-H):p] (H = ``max_history``), so it only ever holds items consumed *before* the target — which,
with one interaction per user–item pair, means the target never appears in its own history, and valid/test
items never appear in a training row.
"""
from __future__ import annotations

import pandas as pd
from tqdm.auto import tqdm

from .errors import DataPrepError

SPLIT_COLUMNS = ["user_id", "history", "target", "position"]


def user_sequences(interactions: pd.DataFrame) -> dict[str, list[str]]:
    """user_id → item ids in chronological order (``interactions`` is sorted by user, time)."""
    return {u: g.tolist() for u, g in interactions.groupby("user_id", sort=True)["item_id"]}


def leave_one_out(
    interactions: pd.DataFrame, max_history: int = 20
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    if int(max_history) < 1:
        raise DataPrepError(f"parameter data_prep.max_history must be >= 1, got {max_history}")
    h = int(max_history)
    train, valid, test = [], [], []
    seqs = user_sequences(interactions)
    for user, seq in tqdm(seqs.items(), total=len(seqs), desc="leave-one-out", leave=False, mininterval=1.0):
        n = len(seq)
        if n < 3:
            continue  # no room for train + valid + test
        for p in range(1, n - 2):
            train.append((user, seq[max(0, p - h) : p], seq[p], p))
        valid.append((user, seq[max(0, n - 2 - h) : n - 2], seq[n - 2], n - 2))
        test.append((user, seq[max(0, n - 1 - h) : n - 1], seq[n - 1], n - 1))

    def frame(rows: list) -> pd.DataFrame:
        df = pd.DataFrame(rows, columns=SPLIT_COLUMNS)
        df["position"] = df["position"].astype("int64")
        df["user_id"] = df["user_id"].astype(str)
        df["target"] = df["target"].astype(str)
        return df

    return frame(train), frame(valid), frame(test)


def period_of_interactions(interactions: pd.DataFrame) -> pd.Series:
    """'train' / 'valid' / 'test' per interaction row, by its position in the user's sequence."""
    pos = interactions.groupby("user_id", sort=False).cumcount()
    n = interactions.groupby("user_id", sort=False)["item_id"].transform("size")
    period = pd.Series("train", index=interactions.index, dtype=object)
    period[pos == n - 2] = "valid"
    period[pos == n - 1] = "test"
    return period
