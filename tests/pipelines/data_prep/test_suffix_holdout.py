"""The suffix holdout: each of a user's last k items is its own next-item case with its true prefix as
history; no held-out item is ever a training target or in a training history, none is in its own
history, and leave-one-out is the k = 1 case, unchanged."""
from __future__ import annotations

import pandas as pd
import pytest

from align3gr_pipelines.data.errors import DataPrepError
from align3gr_pipelines.data.splitting import holdout_sizes, leave_one_out, period_of_interactions


def _interactions(lengths: dict[str, int]) -> pd.DataFrame:
    rows = [(u, f"{u}-i{p}", p) for u, n in lengths.items() for p in range(n)]
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])


def test_suffix_cases_by_hand():
    train, valid, test = leave_one_out(_interactions({"a": 8}), max_history=3, k_valid=2, k_test=3)
    assert test["position"].tolist() == [5, 6, 7] and valid["position"].tolist() == [3, 4]
    assert train["position"].tolist() == [1, 2]
    assert list(test.iloc[0]["history"]) == ["a-i2", "a-i3", "a-i4"]  # its true prefix, held-out items included
    assert test.iloc[2]["target"] == "a-i7" and list(test.iloc[2]["history"]) == ["a-i4", "a-i5", "a-i6"]


def test_no_heldout_item_reaches_training_or_its_own_history():
    inter = _interactions({"a": 12, "b": 9, "c": 4})  # c is too short for 2 + 3: leave-one-out
    train, valid, test = leave_one_out(inter, max_history=20, k_valid=2, k_test=3)
    held = pd.concat([valid, test])
    held_by_user = held.groupby("user_id")["target"].apply(set).to_dict()
    for r in train.itertuples():
        assert r.target not in held_by_user[r.user_id]
        assert not set(r.history) & held_by_user[r.user_id]
    for r in held.itertuples():
        assert r.target not in set(r.history)
    assert held.groupby("user_id").size().to_dict() == {"a": 5, "b": 5, "c": 2}
    # the periods used by feedback and profiles agree with the split, case for case
    period = period_of_interactions(inter, 2, 3)
    by_item = dict(zip(inter["item_id"], period))
    assert all(by_item[t] == "test" for t in test["target"]) and all(by_item[t] == "valid" for t in valid["target"])
    assert all(by_item[t] == "train" for t in train["target"])
    assert sum(p == "train" for p in period) == len(train) + train["user_id"].nunique()  # + each first item


def test_leave_one_out_is_the_default_and_unchanged():
    inter = _interactions({"a": 6, "b": 3})
    loo = leave_one_out(inter, max_history=20)
    same = leave_one_out(inter, max_history=20, k_valid=1, k_test=1)
    for x, y in zip(loo, same):
        pd.testing.assert_frame_equal(x, y)
    assert loo[2]["position"].tolist() == [5, 2] and loo[1]["position"].tolist() == [4, 1]
    assert period_of_interactions(inter).tolist() == period_of_interactions(inter, 1, 1).tolist()
    assert holdout_sizes(None) == (1, 1) == holdout_sizes({"mode": "leave_one_out", "k_test": 5})


@pytest.mark.parametrize("bad, message", [
    ({"mode": "last_k"}, "holdout.mode must be one of"),
    ({"mode": "suffix", "k_test": 0}, "holdout.k_test must be an integer >= 1"),
    ({"mode": "suffix", "k_valid": 2.5}, "holdout.k_valid must be an integer >= 1"),
    ({"mode": "suffix", "k_tests": 5}, "unknown keys"),
])
def test_bad_holdout_parameters_name_the_key(bad, message):
    with pytest.raises(DataPrepError, match=message):
        holdout_sizes(bad)
