"""The canonical tables every loader produces, and their validation / cleaning.

Loaders only parse; everything that must hold for all sources (string ids, int64 seconds, ratings in range,
unique item ids, one interaction per user–item pair, k-core, at least ``min_interactions`` per user,
chronological order) is enforced here, once.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

import numpy as np
import pandas as pd

from .errors import DataPrepError

log = logging.getLogger(__name__)

ITEM_COLUMNS = ["item_id", "title", "description", "brand", "categories", "text"]
USER_COLUMNS = ["user_id", "profile"]
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "rating", "review"]
TAG_COLUMNS = ["user_id", "item_id", "tag", "timestamp"]

# data_prep.timestamps defaults: fixed dates rather than "now", so a rerun on the same file gives the same
# tables whatever the day. They catch the usual breakage: negative or sentinel values, years like 2100,
# milliseconds read as seconds (which land tens of thousands of years ahead).
TIMESTAMP_MIN = "1970-01-01"
TIMESTAMP_MAX = "2100-01-01"
OUT_OF_RANGE_POLICIES = ("raise", "drop")
CONFLICT_RULES = ("first", "last", "raise")


@dataclass
class RawTables:
    """What a loader returns. ``users.profile`` may be missing (filled later from tags or history)."""

    items: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    user_tags: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=TAG_COLUMNS))
    has_ratings: bool = True
    # False where the source keeps only the order (LC-Rec: timestamp = position); no date range applies.
    has_timestamps: bool = True
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


def timestamp_bound(value: object, name: str) -> int | None:
    """A ``data_prep.timestamps`` bound as unix seconds: an int, or an ISO date / date-time string (UTC unless
    it carries an offset); None means no bound."""
    parameter = f"data_prep.timestamps.{name}"
    if value is None:
        return None
    if isinstance(value, bool):
        raise DataPrepError(f"parameter {parameter} must be a date like '2100-01-01', unix seconds or null, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        try:
            value = datetime.fromisoformat(text)
        except ValueError as exc:
            raise DataPrepError(
                f"parameter {parameter} must be a date like '2100-01-01', a date-time like '2018-09-24T14:27:30', "
                f"unix seconds or null, got {text!r}"
            ) from exc
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return int(value.timestamp())
    raise DataPrepError(f"parameter {parameter} must be a date like '2100-01-01', unix seconds or null, got {value!r}")


def timestamp_settings(params: dict) -> tuple[int | None, int | None, str]:
    """``data_prep.timestamps`` → (min inclusive, max exclusive, policy), checked."""
    ts = params.get("timestamps")
    ts = {} if ts is None else ts
    if not isinstance(ts, dict):
        raise DataPrepError(f"parameter data_prep.timestamps must be a mapping with min, max, on_out_of_range, got {ts!r}")
    lo = timestamp_bound(ts.get("min", TIMESTAMP_MIN), "min")
    hi = timestamp_bound(ts.get("max", TIMESTAMP_MAX), "max")
    if lo is not None and hi is not None and lo >= hi:
        raise DataPrepError(
            f"parameters data_prep.timestamps.min < max expected, got min={ts.get('min')!r}, max={ts.get('max')!r}"
        )
    policy = ts.get("on_out_of_range", "raise")
    if policy not in OUT_OF_RANGE_POLICIES:
        raise DataPrepError(
            f"parameter data_prep.timestamps.on_out_of_range must be one of {list(OUT_OF_RANGE_POLICIES)}, got {policy!r}"
        )
    return lo, hi, policy


def _utc(seconds: int) -> str:
    try:
        return datetime.fromtimestamp(int(seconds), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return "beyond the calendar"


def timestamps_in_range(inter: pd.DataFrame, params: dict, where: str) -> tuple[pd.DataFrame, int]:
    """Rows whose timestamp lies in [min, max) of ``data_prep.timestamps``; the others raise or are dropped.

    The split is chronological, so a handful of far-future rows would otherwise become most test targets.
    Returns the kept rows and how many were dropped.
    """
    lo, hi, policy = timestamp_settings(params)
    ts = inter["timestamp"]
    out = pd.Series(False, index=inter.index)
    if lo is not None:
        out |= ts < lo
    if hi is not None:
        out |= ts >= hi
    n = int(out.sum())
    if n == 0:
        return inter, 0
    bounds = f"[{_utc(lo) if lo is not None else '-inf'}, {_utc(hi) if hi is not None else '+inf'})"
    examples = [f"user {u}, item {i}: {t} ({_utc(t)})" for u, i, t in
                inter.loc[out, ["user_id", "item_id", "timestamp"]].head(3).itertuples(index=False)]
    if policy == "raise":
        ms = " (values this large look like milliseconds; expected unix seconds)" if int(ts[out].max()) > 10**11 else ""
        raise DataPrepError(
            f"{where}: column timestamp has {n} of {len(inter)} value(s) outside {bounds} (parameter "
            f"data_prep.timestamps.min/max), e.g. {'; '.join(examples)}{ms}; expected unix seconds in that range. "
            "Set data_prep.timestamps.on_out_of_range: drop to drop such rows and count them"
        )
    log.warning("%s: dropped %d of %d interaction(s) with a timestamp outside %s (data_prep.timestamps), e.g. %s",
                where, n, len(inter), bounds, "; ".join(examples))
    # A copy: canonicalize assigns columns next (pandas 2 would warn about a chained assignment).
    return inter[~out].copy(), n


def drop_duplicate_interactions(inter: pd.DataFrame, rule: str, where: str) -> tuple[pd.DataFrame, dict]:
    """One row per user–item pair. ``inter`` must be sorted by user, timestamp and file order (``_order``).

    Rows with the same user, item and timestamp are *exact* duplicates when rating and review agree, else
    *conflicting*: ``rule`` keeps the first or the last of them in file order, or raises. Of a pair seen at
    different times the first is kept (*repeated*: the standard Amazon preprocessing). Returns the rows and
    the counts of removed rows by kind.
    """
    if rule not in CONFLICT_RULES:
        raise DataPrepError(
            f"parameter data_prep.conflicting_duplicates must be one of {list(CONFLICT_RULES)}, got {rule!r}"
        )
    key = ["user_id", "item_id", "timestamp"]
    same = inter.duplicated(key, keep=False)
    counts = {"exact": 0, "conflicting": 0, "repeated": 0, "conflict_rule": rule}
    if same.any():
        group = inter.loc[same, [*key, "rating", "review"]].copy()
        # NaN != NaN and None review cells: compare a filled copy so "both missing" counts as agreeing.
        group["rating"] = group["rating"].fillna(-np.inf)
        group["review"] = group["review"].fillna("\0")
        variants = group.drop_duplicates().groupby(key, sort=False).size()
        conflicted = variants[variants > 1].index
        in_conflict = pd.MultiIndex.from_frame(inter[key]).isin(conflicted) & same.to_numpy()
        sizes = inter.loc[same].groupby(key, sort=False).size()
        n_conflict_rows = int(in_conflict.sum())
        counts["conflicting"] = n_conflict_rows - len(conflicted)
        counts["exact"] = int((sizes - 1).sum()) - counts["conflicting"]
        if len(conflicted):
            rows = inter.loc[in_conflict]
            examples = [
                f"user {u}, item {i}, timestamp {t}: ratings {g['rating'].tolist()}"
                for (u, i, t), g in rows.groupby(key, sort=False)
            ][:3]
            if rule == "raise":
                raise DataPrepError(
                    f"{where}: {len(conflicted)} user–item–timestamp triple(s) appear more than once with a different "
                    f"rating or review (columns user_id, item_id, timestamp), e.g. {'; '.join(examples)}; expected one "
                    "row each. Set data_prep.conflicting_duplicates: first or last to keep one of them"
                )
            log.warning("%s: %d interaction(s) repeat a user, item and timestamp with a different rating or review; "
                        "kept the %s of each in file order (data_prep.conflicting_duplicates), e.g. %s",
                        where, counts["conflicting"], rule, "; ".join(examples))
            if rule == "last":
                drop = in_conflict & inter.duplicated(key, keep="last").to_numpy()
                inter = inter[~drop]
    before = len(inter)
    inter = inter.drop_duplicates(["user_id", "item_id"], keep="first")
    removed = before - len(inter)
    if rule == "last":
        counts["repeated"] = removed - counts["exact"]
    else:
        counts["repeated"] = removed - counts["exact"] - counts["conflicting"]
    if counts["exact"] or counts["repeated"]:
        log.info("%s: removed %d exact duplicate interaction(s) and %d repeat(s) of a user–item pair at a later time",
                 where, counts["exact"], counts["repeated"])
    return inter, counts


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
    report["timestamps_out_of_range_dropped"] = None  # not applicable: positions, not times
    if raw.has_timestamps:
        inter, report["timestamps_out_of_range_dropped"] = timestamps_in_range(inter, params, where_i)
        if len(inter) == 0:
            raise DataPrepError(f"{where_i}: no interactions left after dropping out-of-range timestamps "
                                "(parameter data_prep.timestamps)")

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

    # Chronological with ties kept in file order, then one interaction per user–item pair.
    inter["_order"] = np.arange(len(inter))
    inter = inter.sort_values(["user_id", "timestamp", "_order"], kind="stable")
    before = len(inter)
    inter, report["duplicate_interactions"] = drop_duplicate_interactions(
        inter, str(params.get("conflicting_duplicates", "first")), where_i)
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
