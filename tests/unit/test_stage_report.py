"""Per preference stage: changed top-K lists, Recall@K by the target's feedback level, paired deltas."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from align3gr_pipelines.preference.stage_report import report_markdown, stage_report

CASES = pd.DataFrame({"split": "test", "user_id": ["u1", "u2", "u3", "u4"], "target": ["a", "b", "c", "d"]})
FEEDBACK = pd.DataFrame(
    {"user_id": ["u1", "u2", "u3", "u4", "u1"], "item_id": ["a", "b", "c", "d", "z"],
     "level": ["liked", "neutral", "disliked", "liked", "disliked"], "split": ["test", "test", "test", "test", "train"]}
)


def _recs(model, lists):
    rows = [(model, "test", u, r + 1, item, 1.0 - r / 10) for u, items in lists.items() for r, item in enumerate(items)]
    return pd.DataFrame(rows, columns=["model", "split", "user_id", "rank", "item_id", "score"])


def test_changed_share_levels_and_paired_deltas():
    sft = _recs("sft", {"u1": ["a", "x"], "u2": ["x", "y"], "u3": ["c", "y"], "u4": ["x", "y"]})
    # easy: u2 gains its (neutral) target, u3 loses its (disliked) one, u4 is reordered only
    easy = _recs("sp_dpo_easy", {"u1": ["a", "x"], "u2": ["b", "y"], "u3": ["x", "y"], "u4": ["y", "x"]})
    rep = stage_report(pd.concat([sft, easy]), CASES, FEEDBACK, k=2, n_bootstrap=200, n_permutations=200)["test"]
    assert set(rep) == {"sft", "sp_dpo_easy"} and "changed_share" not in rep["sft"]
    e = rep["sp_dpo_easy"]
    assert e["input"] == "sft" and e["changed_share"] == 0.75 and e["changed_set_share"] == 0.5
    assert rep["sft"]["recall@2"] == 0.5 and e["recall@2"] == 0.5
    assert (e["recall@2_liked"], e["recall@2_neutral"], e["recall@2_disliked"]) == (0.5, 1.0, 0.0)
    assert (rep["sft"]["recall@2_neutral"], rep["sft"]["recall@2_disliked"]) == (0.0, 1.0)
    assert (e["n_liked"], e["n_neutral"], e["n_disliked"]) == (2, 1, 1)
    assert e["delta_vs_input"]["mean"] == 0.0 and e["delta_vs_input"]["ci_low"] <= 0 <= e["delta_vs_input"]["ci_high"]
    assert "| sp_dpo_easy | sft | 75.0% |" in report_markdown({"test": rep}, k=2)


def test_a_level_without_targets_is_nan():
    sft = _recs("sft", {"u1": ["a"], "u4": ["d"]})
    cases = CASES[CASES["user_id"].isin(["u1", "u4"])]
    rep = stage_report(sft, cases, FEEDBACK, k=1)["test"]["sft"]
    assert rep["recall@1_liked"] == 1.0 and math.isnan(rep["recall@1_neutral"])
    with pytest.raises(ValueError, match="feedback"):
        stage_report(sft, cases, FEEDBACK.drop(columns="level"), k=1)


def test_a_tie_group_straddling_k_gets_its_share_as_in_evaluation():
    """u1's target 'a' (rank 2) ties with 'x' (rank 3) across K=2: credit 1/2, as evaluation's metrics give.
    An arbitrary tie-break would give 1, or 0 with the order swapped."""
    rows = [("sft", "test", "u1", 1, "y", 0.9), ("sft", "test", "u1", 2, "a", 0.5), ("sft", "test", "u1", 3, "x", 0.5),
            ("sft", "test", "u4", 1, "d", 0.9), ("sft", "test", "u4", 2, "z", 0.1)]
    recs = pd.DataFrame(rows, columns=["model", "split", "user_id", "rank", "item_id", "score"])
    cases = CASES[CASES["user_id"].isin(["u1", "u4"])]
    rep = stage_report(recs, cases, FEEDBACK, k=2)["test"]["sft"]
    assert rep["recall@2"] == pytest.approx(0.75) and rep["recall@2_liked"] == pytest.approx(0.75)


def test_users_without_a_list_score_zero_and_count():
    sft = _recs("sft", {"u1": ["a"]})
    rep = stage_report(sft, CASES, FEEDBACK, k=1)["test"]["sft"]
    assert rep["n_users"] == 4 and rep["recall@1"] == 0.25
