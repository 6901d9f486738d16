"""What the evaluation stage scores, as tables: the held-out cases (one per user under leave-one-out, one
per held-out position under a suffix holdout; the test split never sampled) and every recommender's top-K
lists (`recommendations`: model, split, user_id, case, rank, item_id, score)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

REC_COLUMNS = ["model", "split", "user_id", "case", "rank", "item_id", "score"]
REC_DTYPES = {"model": "str", "split": "str", "user_id": "str", "case": "int64", "rank": "int64", "item_id": "str",
              "score": "float64"}


def eval_cases(valid: pd.DataFrame, test: pd.DataFrame, splits: list[str], max_history: int,
               max_users: Any, seed: int) -> pd.DataFrame:
    """One row per held-out case: split, user_id, case (its position in the user's sequence: one case per
    user under leave-one-out, several under a suffix holdout), history (the last max_history items), target."""
    frames = {"valid": valid, "test": test}
    unknown = [s for s in splits if s not in frames]
    if unknown or not splits:
        raise ValueError(f"evaluation.splits must be a non-empty subset of ['test', 'valid'], got {splits}")
    keep = int(max_history)
    out = []
    for split in splits:
        df = frames[split]
        case = df["position"].astype("int64").to_numpy() if "position" in df.columns else np.zeros(len(df), "int64")
        if pd.DataFrame({"u": df["user_id"].astype(str).to_numpy(), "c": case}).duplicated().any():
            raise ValueError(f"evaluation: {split} has several rows for one (user_id, position); expected one per held-out case")
        out.append(pd.DataFrame({
            "split": split,
            "user_id": df["user_id"].astype(str).to_numpy(),
            "case": case,
            "history": [[str(i) for i in list(h)[-keep:]] if keep > 0 else [] for h in df["history"]],
            "target": df["target"].astype(str).to_numpy(),
        }))
    cases = pd.concat(out, ignore_index=True)
    limits = max_users
    if not isinstance(limits, dict):  # one number (or null) for every split
        limits = {s: limits for s in splits}
    if limits.get("test") is not None:
        raise ValueError(
            f"evaluation.max_users.test must be null, got {limits['test']!r}: the test split is always scored "
            "over every test user, never a sample (only valid may be sampled, e.g. max_users: {test: null, valid: 200})"
        )
    keep_rows = np.ones(len(cases), dtype=bool)
    for split, limit in limits.items():
        if split not in splits or limit is None:
            continue
        if int(limit) < 1:
            raise ValueError(f"evaluation.max_users.{split} must be >= 1 or null, got {limit}")
        in_split = (cases["split"] == split).to_numpy()
        users = np.sort(cases.loc[in_split, "user_id"].unique())
        if int(limit) < len(users):
            # Seeded by the global seed alone, so every split with the same limit samples the same users.
            picked = np.random.default_rng(seed).choice(users, size=int(limit), replace=False)
            keep_rows &= ~in_split | cases["user_id"].isin(picked).to_numpy()
            log.info("evaluation: %s on a seeded sample of %d of %d users (max_users)", split, int(limit), len(users))
    return cases[keep_rows].reset_index(drop=True)


def empty_recs() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=REC_DTYPES[c]) for c in REC_COLUMNS})


def _case_of(cases: pd.DataFrame) -> np.ndarray:
    """Each row's held-out position: `case` of eval cases, `position` of seq_eval_prompts, else 0."""
    column = "case" if "case" in cases.columns else "position" if "position" in cases.columns else None
    return cases[column].to_numpy().astype("int64") if column else np.zeros(len(cases), "int64")


def recs_frame(model: str, cases: pd.DataFrame, item_ids: list[str], idx: np.ndarray, scores: np.ndarray) -> pd.DataFrame:
    k = idx.shape[1]
    valid = idx >= 0
    rows, cols = np.nonzero(valid)
    items = np.asarray(item_ids, dtype=object)
    return pd.DataFrame(
        {
            "model": model,
            "split": cases["split"].to_numpy()[rows],
            "user_id": cases["user_id"].to_numpy()[rows],
            "case": _case_of(cases)[rows],
            "rank": (cols + 1).astype("int64") if k else np.zeros(0, "int64"),
            "item_id": items[idx[rows, cols]],
            "score": scores[rows, cols].astype("float64"),
        }
    )


def as_recommendations(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with the `recommendations` columns, in order and typed."""
    return table.astype(REC_DTYPES)[REC_COLUMNS]
