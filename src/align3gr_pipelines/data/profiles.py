"""User profile text: given by the source (demo, demographics), else tags plus a history summary, else a
history summary alone.

Only what the user did in the *training period* (before their valid position) may feed a profile, so a
profile never leaks a valid or test target.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import pandas as pd

from .splitting import period_of_interactions


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _top_categories(rows: pd.DataFrame, base_share: pd.Series, k: int) -> dict[str, list[str]]:
    """user → up to k categories, ranked by count / sqrt(global share): distinctive, not just popular
    (otherwise Drama and Comedy top every MovieLens profile)."""
    if rows.empty:
        return {}
    counts = rows.groupby(["user_id", "category"]).size().rename("n").reset_index()
    counts["score"] = counts["n"] / np.sqrt(counts["category"].map(base_share).fillna(1.0).to_numpy())
    counts = counts.sort_values(["user_id", "score", "category"], ascending=[True, False, True], kind="stable")
    top = counts.groupby("user_id", sort=False).head(k)
    return top.groupby("user_id", sort=False)["category"].agg(list).to_dict()


def history_summaries(train: pd.DataFrame, items: pd.DataFrame, liked_min: float, max_categories: int) -> dict[str, str]:
    """One sentence or two per user from their training-period interactions."""
    cats = items.set_index("item_id")["categories"].dropna().map(
        lambda c: [x.strip() for x in str(c).replace("|", ",").split(",") if x.strip()]
    )
    rows = train[["user_id", "item_id", "rating"]].copy()
    rows["category"] = rows["item_id"].map(cats)
    rows = rows.explode("category").dropna(subset=["category"])
    base_share = rows["category"].value_counts(normalize=True)

    rated_users = set(train.loc[train["rating"].notna(), "user_id"])
    liked = rows[rows["rating"] >= liked_min]
    liked_users = set(liked["user_id"])
    # users without a liked item (or without ratings) are summarised from everything they chose
    pool = pd.concat([liked, rows[~rows["user_id"].isin(liked_users)]])
    top = _top_categories(pool, base_share, max_categories)
    low = _top_categories(rows[rows["rating"] <= 2], base_share, 2)
    n_train = train.groupby("user_id").size().to_dict()

    out: dict[str, str] = {}
    for user in train["user_id"].unique():
        if user not in top:
            n = n_train.get(user, 0)
            out[user] = f"A user with {n} earlier interaction{'s' if n != 1 else ''}."
            continue
        rated = user in rated_users
        text = f"{'Rates highly' if rated and user in liked_users else 'Mostly chooses'}: {_join(top[user])}."
        dislikes = [c for c in low.get(user, []) if c not in top[user]]
        if rated and dislikes:
            text += f" Less keen on {_join(dislikes)}."
        out[user] = text
    return out


def build_user_profiles(
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    user_tags: pd.DataFrame,
    params: dict,
    holdout: tuple[int, int] = (1, 1),
) -> tuple[pd.DataFrame, dict]:
    """Fill missing profiles from the training period only (`holdout` = (k_valid, k_test) of the split);
    returns the users table and a count of where profiles came from."""
    liked_min = float(params.get("liked_min", 4.0))
    max_tags = int(params.get("max_tags", 8))
    max_cats = int(params.get("max_categories", 3))

    period = period_of_interactions(interactions, *holdout)
    train = interactions[period == "train"]
    held = interactions[period != "train"]
    # the training period ends at a user's first held-out interaction
    valid_time = interactions[period == "valid"].groupby("user_id", sort=False)["timestamp"].min()

    tags_by_user: dict[str, list[str]] = {}
    if user_tags is not None and len(user_tags):
        t = user_tags.copy()
        t["user_id"] = t["user_id"].astype(str)
        t["item_id"] = t["item_id"].astype(str)
        t = t[t["user_id"].isin(valid_time.index)]
        # drop tags on held-out items and tags written at or after the valid interaction
        held_keys = set(held["user_id"] + "\x00" + held["item_id"])
        t = t[~(t["user_id"] + "\x00" + t["item_id"]).isin(held_keys)]
        t = t[t["timestamp"].astype("int64").to_numpy() < valid_time.reindex(t["user_id"]).to_numpy()]
        for u, g in t.groupby("user_id"):
            counts = Counter(str(x).strip().lower() for x in g["tag"] if str(x).strip())
            tags_by_user[u] = [w for w, _ in counts.most_common(max_tags)]

    missing = users["profile"].isna() | (users["profile"].astype(str).str.strip() == "")
    summaries = history_summaries(train[train["user_id"].isin(set(users.loc[missing, "user_id"]))], items,
                                  liked_min, max_cats) if missing.any() else {}
    profiles, source = [], Counter()
    for u, given in zip(users["user_id"], users["profile"]):
        if isinstance(given, str) and given.strip():
            profiles.append(given.strip())
            source["given"] += 1
        elif tags_by_user.get(u):
            # tags say how the user talks about items; the history summary adds what they pick
            profiles.append(f"Tags used: {', '.join(tags_by_user[u])}. {summaries.get(u, '')}".strip())
            source["tags"] += 1
        else:
            profiles.append(summaries.get(u, "A new user."))
            source["history"] += 1
    return pd.DataFrame({"user_id": users["user_id"].astype(str), "profile": profiles}), dict(source)
