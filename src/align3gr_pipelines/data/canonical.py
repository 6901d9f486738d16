"""The canonical tables every loader produces, and their validation / cleaning.

Loaders only parse; everything that must hold for all sources (string ids, int64 seconds, ratings in range,
unique item ids, one interaction per user–item pair, k-core, at least ``min_interactions`` per user,
chronological order) is enforced here, once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import DataPrepError

log = logging.getLogger(__name__)

ITEM_COLUMNS = ["item_id", "title", "description", "brand", "categories", "text"]
USER_COLUMNS = ["user_id", "profile"]
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "rating", "review"]
TAG_COLUMNS = ["user_id", "item_id", "tag", "timestamp"]


@dataclass
class RawTables:
    """What a loader returns. ``users.profile`` may be missing (filled later from tags or history)."""

    items: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    user_tags: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TAG_COLUMNS))
    has_ratings: bool = True
    report: dict = field(default_factory=dict)


def require_columns(df: pd.DataFrame, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DataPrepError(f"{where}: missing column(s) {missing}; expected columns {columns}, found {list(df.columns)}")


def item_text(items: pd.DataFrame) -> pd.Series:
    """What the semantic encoder reads: title, then brand and categories, then the description."""
    parts = []
    for row in items[["title", "brand", "categories", "description"]].itertuples(index=False):
        title, brand, cats, desc = (x if isinstance(x, str) and x.strip() else "" for x in row)
        text = title
        if brand:
            text += f". Brand: {brand}"
        if cats:
            text += f". Categories: {cats}"
        if desc:
            text += f". {desc}"
        parts.append(text.strip(". ") + ".")
    return pd.Series(parts, index=items.index, dtype=object)


def _normalise_items(items: pd.DataFrame, where: str) -> pd.DataFrame:
    require_columns(items, ["item_id"], where)
    items = items.copy()
    items["item_id"] = items["item_id"].astype(str)
    for col in ("title", "description", "brand", "categories"):
        if col not in items.columns:
            items[col] = None
        items[col] = items[col].astype(object).where(items[col].notna(), None)
    dup = items["item_id"][items["item_id"].duplicated()]
    if len(dup):
        raise DataPrepError(
            f"{where}: column item_id must be unique, found {dup.nunique()} duplicated id(s), e.g. {dup.iloc[:3].tolist()}"
        )
    if "text" not in items.columns or items["text"].isna().any():
        items["text"] = item_text(items)
    return items[ITEM_COLUMNS]


def canonicalize(raw: RawTables, params: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """Validate and clean a loader's tables.

    Returns ``(items, users_raw, interactions, report)``; ``items`` keeps only items that still have an
    interaction, ``users_raw`` only users that survive filtering (profile possibly missing).
    """
    report = dict(raw.report)
    where_i = report.get("interactions_file", "interactions")
    where_m = report.get("items_file", "items")
    inter = raw.interactions.copy()
    require_columns(inter, ["user_id", "item_id", "timestamp"], where_i)
    if len(inter) == 0:
        raise DataPrepError(f"{where_i}: no interactions found; expected at least one user–item row")
    for col in ("rating", "review"):
        if col not in inter.columns:
            inter[col] = None
    inter["user_id"] = inter["user_id"].astype(str)
    inter["item_id"] = inter["item_id"].astype(str)

    ts = pd.to_numeric(inter["timestamp"], errors="coerce")
    if ts.isna().any():
        bad = inter.loc[ts.isna(), "timestamp"].iloc[:3].tolist()
        raise DataPrepError(f"{where_i}: column timestamp must be integer seconds, found unparsable values {bad}")
    inter["timestamp"] = ts.astype("int64")

    lo, hi = (float(x) for x in params.get("rating_range", [0.5, 5.0]))
    rating = pd.to_numeric(inter["rating"], errors="coerce").astype("float64")
    if raw.has_ratings:
        if rating.isna().any():
            n = int(rating.isna().sum())
            raise DataPrepError(f"{where_i}: column rating has {n} missing/NaN value(s); expected numbers in [{lo}, {hi}]")
        out = (rating < lo) | (rating > hi)
        if out.any():
            bad = rating[out].iloc[:3].tolist()
            raise DataPrepError(
                f"{where_i}: column rating has {int(out.sum())} value(s) outside [{lo}, {hi}] "
                f"(parameter data_prep.rating_range), e.g. {bad}"
            )
    inter["rating"] = rating
    inter["review"] = inter["review"].astype(object).where(inter["review"].notna(), None)

    items = _normalise_items(raw.items, where_m)
    known = inter["item_id"].isin(set(items["item_id"]))
    n_unknown = int((~known).sum())
    if n_unknown:
        # Interactions whose item has no metadata row (common in Amazon dumps): keep them, with empty text.
        extra = pd.DataFrame({"item_id": inter.loc[~known, "item_id"].unique()})
        log.warning("%d interaction(s) refer to %d item(s) with no metadata in %s; they get placeholder text",
                    n_unknown, len(extra), where_m)
        items = _normalise_items(pd.concat([items, extra], ignore_index=True), where_m)
    report["items_without_metadata"] = int(n_unknown and len(extra))

    # Chronological with ties kept in file order, then one interaction per user–item pair (the first).
    inter["_order"] = np.arange(len(inter))
    inter = inter.sort_values(["user_id", "timestamp", "_order"], kind="stable")
    before = len(inter)
    inter = inter.drop_duplicates(["user_id", "item_id"], keep="first")
    report["duplicate_interactions_removed"] = before - len(inter)

    k = int(report.get("k_core", params.get("k_core", 0)) or 0)
    report["k_core"] = k
    n0_users, n0_inter = inter["user_id"].nunique(), len(inter)
    if k > 1:
        while True:
            u_cnt = inter.groupby("user_id")["item_id"].transform("size")
            i_cnt = inter.groupby("item_id")["user_id"].transform("size")
            keep = (u_cnt >= k) & (i_cnt >= k)
            if keep.all():
                break
            inter = inter[keep]
        report["k_core_users_removed"] = n0_users - inter["user_id"].nunique()
        report["k_core_interactions_removed"] = n0_inter - len(inter)
        if len(inter) == 0:
            raise DataPrepError(
                f"{where_i}: nothing left after {k}-core filtering (parameter data_prep.k_core={k}); "
                "expected a denser dataset or a smaller k_core"
            )

    min_n = int(params.get("min_interactions", 3))
    if min_n < 3:
        raise DataPrepError(f"parameter data_prep.min_interactions must be >= 3 (train/valid/test), got {min_n}")
    n_per_user = inter.groupby("user_id")["item_id"].transform("size")
    short_users = inter.loc[n_per_user < min_n, "user_id"].nunique()
    inter = inter[n_per_user >= min_n]
    report["users_dropped_short"] = int(short_users)
    if len(inter) == 0:
        raise DataPrepError(
            f"{where_i}: no user has at least {min_n} interactions (parameter data_prep.min_interactions) "
            "after filtering; expected at least one such user"
        )
    inter = inter.drop(columns="_order").reset_index(drop=True)[INTERACTION_COLUMNS]

    used = set(inter["item_id"])
    report["items_dropped_unused"] = int((~items["item_id"].isin(used)).sum())
    items = items[items["item_id"].isin(used)].sort_values("item_id", kind="stable").reset_index(drop=True)

    users = raw.users.copy() if raw.users is not None else pd.DataFrame(columns=USER_COLUMNS)
    require_columns(users, ["user_id"], report.get("users_file", "users"))
    users["user_id"] = users["user_id"].astype(str)
    dup = users["user_id"][users["user_id"].duplicated()]
    if len(dup):
        raise DataPrepError(
            f"{report.get('users_file', 'users')}: column user_id must be unique, found duplicated id(s) {dup.iloc[:3].tolist()}"
        )
    if "profile" not in users.columns:
        users["profile"] = None
    kept = pd.DataFrame({"user_id": inter["user_id"].unique()})
    users = kept.merge(users[USER_COLUMNS], on="user_id", how="left")
    users["profile"] = users["profile"].astype(object).where(users["profile"].notna(), None)
    return items, users, inter, report
