"""The leave-one-out splitter on a hand-computed case with training rows, and the feedback table's `split`
column agreeing with the splitter's targets (the real-feedback DPO reads only split == 'train')."""
from __future__ import annotations

import pandas as pd

from align3gr_pipelines.data.canonical import canonicalize
from align3gr_pipelines.data.demo_generator import generate_demo
from align3gr_pipelines.data.feedback import build_feedback
from align3gr_pipelines.data.splitting import leave_one_out

from .conftest import params


def test_leave_one_out_by_hand():
    # user a: p q r s t (5 items), user b: x y z (3 items); rows in time order per user, users interleaved
    inter = pd.DataFrame({
        "user_id": ["a", "a", "a", "a", "a", "b", "b", "b"],
        "item_id": ["p", "q", "r", "s", "t", "x", "y", "z"],
        "timestamp": [1, 2, 3, 4, 5, 1, 2, 3],
    })
    train, valid, test = leave_one_out(inter, max_history=2)
    rows = lambda df: [(u, list(h), t, p) for u, h, t, p in df.itertuples(index=False)]  # noqa: E731
    assert rows(train) == [("a", ["p"], "q", 1), ("a", ["p", "q"], "r", 2)]
    assert rows(valid) == [("a", ["q", "r"], "s", 3), ("b", ["x"], "y", 1)]
    assert rows(test) == [("a", ["r", "s"], "t", 4), ("b", ["x", "y"], "z", 2)]
    # a longer history window keeps everything before the target
    train3, _, test3 = leave_one_out(inter, max_history=3)
    assert rows(train3) == rows(train)
    assert rows(test3)[0] == ("a", ["q", "r", "s"], "t", 4)


def test_feedback_split_agrees_with_the_leave_one_out_targets():
    demo = generate_demo(n_users=60, n_items=50, mean_interactions=8, seed=3)
    _, _, inter, _ = canonicalize(demo, params())
    train, valid, test = leave_one_out(inter, max_history=20)
    fb = build_feedback(inter, {"use_review_sentiment": False})
    assert len(fb) > 0
    by_split = {s: set(zip(g["user_id"], g["item_id"])) for s, g in fb.groupby("split")}
    rated = set(zip(fb["user_id"], fb["item_id"]))
    assert by_split["valid"] == set(zip(valid["user_id"], valid["target"])) & rated
    assert by_split["test"] == set(zip(test["user_id"], test["target"])) & rated
    # the training period is everything before the valid target: with an unbounded history window, the
    # valid row's history
    _, whole, _ = leave_one_out(inter, max_history=10_000)
    before_valid = {(u, i) for u, h in zip(whole["user_id"], whole["history"]) for i in h}
    assert by_split["train"] == before_valid & rated
    assert set(zip(train["user_id"], train["target"])) <= before_valid
