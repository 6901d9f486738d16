"""Demo generator, leave-one-out splitter and feedback levels."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from align3gr_pipelines.data.canonical import canonicalize
from align3gr_pipelines.data.demo_generator import generate_demo
from align3gr_pipelines.data.errors import DataPrepError
from align3gr_pipelines.data.feedback import build_feedback
from align3gr_pipelines.data.feedback_levels import ratings_to_levels, review_sentiment_levels
from align3gr_pipelines.data.splitting import leave_one_out

from .conftest import params


@pytest.fixture(scope="module")
def demo():
    return generate_demo(n_users=120, n_items=80, mean_interactions=10, seed=7)


def test_generator_is_deterministic_under_the_seed(demo):
    again = generate_demo(n_users=120, n_items=80, mean_interactions=10, seed=7)
    other = generate_demo(n_users=120, n_items=80, mean_interactions=10, seed=8)
    for name in ("items", "users", "interactions"):
        pd.testing.assert_frame_equal(getattr(demo, name), getattr(again, name))
    assert not demo.interactions.equals(other.interactions)


def test_generator_tables_are_consistent(demo):
    items, users, inter = demo.items, demo.users, demo.interactions
    assert items["item_id"].is_unique and items["title"].is_unique
    assert set(inter["item_id"]) <= set(items["item_id"])
    assert set(inter["rating"]) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert not inter.duplicated(["user_id", "item_id"]).any()
    assert (inter.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    assert users["profile"].str.startswith("Age ").all()
    assert 6 <= inter.groupby("user_id").size().mean() <= 14
    # the text an encoder reads names the item's category and brand
    row = items.iloc[0]
    assert row["brand"] in row["text"] and row["categories"] in row["text"]


def test_generator_has_content_and_collaborative_signal(demo):
    inter = demo.interactions
    cat = inter["item_id"].map(demo.items.set_index("item_id")["categories"])
    prev = cat.groupby(inter["user_id"]).shift()
    same = (cat == prev)[prev.notna()].mean()
    chance = (demo.items["categories"].value_counts(normalize=True) ** 2).sum()
    assert same > 3 * chance  # next item is often in the last item's subcategory


def test_reviews_agree_with_ratings(demo):
    levels = review_sentiment_levels(demo.interactions["review"])
    r = demo.interactions["rating"]
    assert (levels[r == 5] == "liked").mean() > 0.9
    assert (levels[r == 1] == "disliked").mean() > 0.9


def test_leave_one_out_invariants(demo):
    items, users, inter, report = canonicalize(demo, params())
    train, valid, test = leave_one_out(inter, max_history=4)
    seqs = inter.groupby("user_id")["item_id"].agg(list)
    n = seqs.map(len)
    assert (n >= 3).all()
    assert len(valid) == len(test) == len(seqs) == valid["user_id"].nunique()
    assert len(train) == int((n - 3).sum())
    for df in (train, valid, test):
        assert df["history"].map(len).max() <= 4
        assert df["history"].map(len).min() >= 1
        for u, h, t, p in df.itertuples(index=False):
            s = seqs[u]
            assert s[p] == t and t not in h
            assert list(h) == s[max(0, p - 4):p]
    assert (valid["position"] == n[valid["user_id"]].to_numpy() - 2).all()
    assert (test["position"] == n[test["user_id"]].to_numpy() - 1).all()
    # valid/test items never in a training row of the same user
    held = {(u, t) for u, t in zip(valid["user_id"], valid["target"])} | {(u, t) for u, t in zip(test["user_id"], test["target"])}
    for u, h, t, _ in train.itertuples(index=False):
        assert (u, t) not in held and not any((u, x) in held for x in h)
    # test history ends with the valid item
    v = valid.set_index("user_id")["target"]
    assert all(h[-1] == v[u] for u, h in zip(test["user_id"], test["history"]))


def test_short_users_are_dropped_and_counted():
    inter = pd.DataFrame({"user_id": ["a", "a", "b", "b", "b"], "item_id": ["1", "2", "1", "2", "3"],
                          "timestamp": [1, 2, 1, 2, 3], "rating": [5.0] * 5, "review": [None] * 5})
    from align3gr_pipelines.data.canonical import RawTables

    items = pd.DataFrame({"item_id": ["1", "2", "3"], "title": ["x", "y", "z"]})
    _, users, clean, report = canonicalize(RawTables(items, pd.DataFrame(columns=["user_id"]), inter), params())
    assert report["users_dropped_short"] == 1 and list(users["user_id"]) == ["b"]
    train, valid, test = leave_one_out(clean)
    assert len(train) == 0 and valid["target"].tolist() == ["2"] and test["target"].tolist() == ["3"]


def test_feedback_levels_and_half_stars():
    r = pd.Series([0.5, 1.0, 1.5, 2.0, 3.0, 3.5, 4.0, 5.0, np.nan])
    up = ratings_to_levels(r, 1, 4, "up").tolist()
    assert up == ["disliked", "disliked", "neutral", "neutral", "neutral", "liked", "liked", "liked", None]
    down = ratings_to_levels(r, 1, 4, "down").tolist()
    assert down[:8] == ["disliked", "disliked", "disliked", "neutral", "neutral", "neutral", "liked", "liked"]
    assert ratings_to_levels(pd.Series([2.0, 3.0]), 2, 3).tolist() == ["disliked", "liked"]
    with pytest.raises(DataPrepError, match="disliked_max < liked_min"):
        ratings_to_levels(r, 4, 4)
    with pytest.raises(DataPrepError, match="half_star"):
        ratings_to_levels(r, 1, 4, "sideways")


def test_feedback_table_marks_periods():
    inter = pd.DataFrame({"user_id": ["a"] * 4, "item_id": list("wxyz"), "timestamp": [1, 2, 3, 4],
                          "rating": [1.0, 3.0, np.nan, 5.0], "review": [None, None, "Terrible, it broke.", None]})
    fb = build_feedback(inter, {})
    assert fb["split"].tolist() == ["train", "train", "valid", "test"]
    assert fb["level"].tolist() == ["disliked", "neutral", "disliked", "liked"]
    assert fb["source"].tolist() == ["rating", "rating", "review_sentiment", "rating"]
