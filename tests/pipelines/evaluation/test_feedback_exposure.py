"""RF exposure metrics (evaluation/feedback_exposure.py) on a hand-made suffix holdout: 3 users, known ratings
and known top lists, ties included; the skip path when the targets carry no rating; the evaluation node."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from align3gr_pipelines.evaluation.feedback_exposure import (
    ExposureSettings,
    case_feedback,
    exposure_settings,
    feedback_exposure,
    per_user_feedback_hits,
)
from align3gr_pipelines.pipelines.evaluation.nodes import compute_metrics, report_feedback_exposure

# (user, case, target, rating, level); b6 has no feedback row (neither liked nor disliked). Ratings <= 1.5 are
# disliked here even where data_prep's level says neutral (b5, c4).
TARGETS = [("A", 5, "a5", 5.0, "liked"), ("A", 6, "a6", 1.0, "disliked"),
           ("B", 4, "b4", 4.5, "liked"), ("B", 5, "b5", 1.5, "neutral"), ("B", 6, "b6", None, None),
           ("C", 3, "c3", 0.5, "disliked"), ("C", 4, "c4", 1.5, "neutral")]
# Per model and case: {rank: item} placed in a 12-long list of fillers; `ties` = ranks sharing one score.
LISTS = {
    "m1": {("A", 5): ({3: "a5"}, ()), ("A", 6): ({}, ()), ("B", 4): ({}, ()), ("B", 5): ({10: "b5"}, ()),
           ("B", 6): ({1: "b6"}, ()), ("C", 3): ({11: "c3"}, ()), ("C", 4): ({}, ())},
    "m2": {("A", 5): ({1: "a5"}, ()), ("A", 6): ({11: "a6"}, (10, 11)), ("B", 4): ({2: "b4"}, ()), ("B", 5): ({}, ()),
           ("B", 6): ({}, ()), ("C", 3): ({9: "c3"}, (9, 10, 11, 12)), ("C", 4): ({10: "c4"}, (10, 11))},
}


def _cases() -> pd.DataFrame:
    return pd.DataFrame({"split": "test", "user_id": [t[0] for t in TARGETS], "case": [t[1] for t in TARGETS],
                         "history": [[] for _ in TARGETS], "target": [t[2] for t in TARGETS]})


def _feedback(with_rating: bool = True) -> pd.DataFrame:
    rows = [t for t in TARGETS if t[4] is not None]
    fb = pd.DataFrame({"user_id": [t[0] for t in rows], "item_id": [t[2] for t in rows], "level": [t[4] for t in rows],
                       "source": "rating", "rating": [t[3] for t in rows], "timestamp": 0, "split": "test"})
    # training-period rows of the same users never count, even for an item that is a held-out target elsewhere
    fb = pd.concat([fb, pd.DataFrame({"user_id": ["A"], "item_id": ["b4"], "level": ["disliked"], "source": "rating",
                                      "rating": [0.5], "timestamp": 0, "split": "train"})], ignore_index=True)
    return fb if with_rating else fb.drop(columns="rating")


def _recs() -> pd.DataFrame:
    rows = []
    for model, lists in LISTS.items():
        for (user, case), (placed, ties) in lists.items():
            for rank in range(1, 13):
                score = 50.0 if rank in ties else 100.0 - rank
                rows.append((model, "test", user, case, rank, placed.get(rank, f"f{rank}"), score))
    return pd.DataFrame(rows, columns=["model", "split", "user_id", "case", "rank", "item_id", "score"])


SETTINGS = ExposureSettings(enabled=True, k=10, disliked_max_rating=1.5)


def test_per_user_hits_by_hand_with_ties():
    cases = _cases()
    fb = case_feedback(cases, _feedback())
    assert fb["rating"].isna().tolist() == [False, False, False, False, True, False, False]
    per_user = per_user_feedback_hits(_recs(), cases, fb, ["m1", "m2"], 10, 1.5).set_index(["model", "user_id"])
    # m1: a5 at rank 3 (liked hit), b5 at rank 10 (disliked hit), c3 at rank 11 (miss at k = 10), b6 unrated
    assert per_user.loc["m1", ["liked_hits", "disliked_hits"]].to_numpy().tolist() == [[1, 0], [0, 1], [0, 0]]
    assert per_user.loc["m1", "disliked_exposed"].tolist() == [0.0, 1.0, 0.0]
    assert per_user.loc["m1", ["liked_cases", "disliked_cases"]].to_numpy().tolist() == [[1, 1], [1, 1], [0, 2]]
    # m2: a6 ties ranks 10-11 -> 1/2; c3 ties ranks 9-12 -> 2/4; c4 ties ranks 10-11 -> 1/2
    m2 = per_user.loc["m2"]
    np.testing.assert_allclose(m2["liked_hits"], [1, 1, 0])
    np.testing.assert_allclose(m2["disliked_hits"], [0.5, 0, 1.0])
    # C: 1 - (1 - 1/2)(1 - 1/2) = 3/4 (two lists, independent tie-breaks)
    np.testing.assert_allclose(m2["disliked_exposed"], [0.5, 0.0, 0.75])


def test_summary_table_by_hand():
    table, info = feedback_exposure(_recs(), _cases(), _feedback(), ["m1", "m2"], SETTINGS, n_boot=200, conf=0.95, seed=0)
    v = table.set_index(["model", "metric"])
    expected = {
        ("m1", "liked_hits@10"): 1 / 3, ("m1", "disliked_hits@10"): 1 / 3, ("m1", "liked_recall@10"): 1 / 2,
        ("m1", "disliked_recall@10"): 1 / 3, ("m1", "disliked_exposure@10"): 1 / 3, ("m1", "disliked_to_liked_hits@10"): 1.0,
        ("m2", "liked_hits@10"): 2 / 3, ("m2", "disliked_hits@10"): 1.5 / 3, ("m2", "liked_recall@10"): 1.0,
        # per user disliked recall: A 0.5/1, B 0/1, C 1.0/2
        ("m2", "disliked_recall@10"): (0.5 + 0 + 0.5) / 3, ("m2", "disliked_exposure@10"): (0.5 + 0 + 0.75) / 3,
        ("m2", "disliked_to_liked_hits@10"): 1.5 / 2,
    }
    for key, value in expected.items():
        assert v.loc[key, "value"] == pytest.approx(value), key
        assert v.loc[key, "ci_low"] <= value + 1e-12 and value <= v.loc[key, "ci_high"] + 1e-12, key
    # who each figure averages over: all 3 users, the 2 with a liked target, the 3 with a disliked one
    assert v.loc[("m1", "liked_hits@10"), "n_users"] == 3 and v.loc[("m1", "liked_recall@10"), "n_users"] == 2
    assert v.loc[("m1", "disliked_exposure@10"), "n_users"] == 3 and v.loc[("m1", "disliked_exposure@10"), "n_cases"] == 4
    assert info["splits"]["test"] == {"users": 3, "cases": 7, "rated_cases": 6, "liked_cases": 2, "disliked_cases": 4,
                                      "users_with_liked": 2, "users_with_disliked": 3}
    # a stricter threshold: only a6 (1.0) and c3 (0.5) are disliked; b5 and c4 (1.5) no longer are
    strict, _ = feedback_exposure(_recs(), _cases(), _feedback(), ["m1"], ExposureSettings(True, 10, 1.0), 50, 0.95, 0)
    s = strict.set_index("metric")["value"]
    assert s["disliked_hits@10"] == 0.0 and s["disliked_exposure@10"] == 0.0 and s["disliked_to_liked_hits@10"] == 0.0
    # at k = 3 m1 keeps only a5 (rank 3) of the rated targets
    at3, _ = feedback_exposure(_recs(), _cases(), _feedback(), ["m1"], ExposureSettings(True, 3, 1.5), 50, 0.95, 0)
    a = at3.set_index("metric")["value"]
    assert a["liked_hits@3"] == pytest.approx(1 / 3) and a["disliked_exposure@3"] == 0.0


def test_no_ratings_is_skipped_with_a_reason(caplog):
    cases, recs = _cases(), _recs()
    for fb, says in ((_feedback(with_rating=False), "no rating column"),
                     (_feedback().assign(rating=np.nan), "no rating in 'feedback'"),
                     (_feedback().iloc[0:0], "no rating in 'feedback'"),  # Instruments: no rating, no review
                     (_feedback().assign(split="train"), "no evaluated held-out target has a rating")):
        table, info = feedback_exposure(recs, cases, fb, ["m1"], SETTINGS, 50, 0.95, 0)
        assert table.empty and list(table.columns)[:4] == ["model", "split", "metric", "value"]
        assert says in info["skipped"], info
    params = {"top_k": 20, "beam_width": 20, "bootstrap": {"n_resamples": 50}, "feedback_exposure": {"enabled": True, "k": 10,
                                                                                                      "disliked_max_rating": 1.5}}
    run_info = {"models": [{"model": "m1"}, {"model": "m2"}], "skipped": []}
    with caplog.at_level(logging.INFO):
        table, js, md = report_feedback_exposure(recs, cases, _feedback().iloc[0:0], run_info, params, seed=0)
    assert table.empty and js["scalars"] == {} and "no rating" in js["info"]["skipped"]
    assert md.startswith("## Feedback exposure (top 10)") and "Skipped: no rating" in md
    assert "feedback exposure skipped: no rating" in caplog.text
    _, js, md = report_feedback_exposure(recs, cases, _feedback(), run_info, {**params, "feedback_exposure": {"enabled": False}}, 0)
    assert "disabled in parameters" in js["info"]["skipped"] and "Skipped: disabled" in md


def test_node_outputs_and_the_metrics_md_section():
    cases, recs = _cases(), _recs()
    params = {"top_k": 20, "beam_width": 20, "ks": [1, 5, 10], "mrr_ks": [10], "bootstrap": {"n_resamples": 50},
              "paired_test": {"n_permutations": 50}, "feedback_exposure": {"enabled": True, "k": 10, "disliked_max_rating": 1.5}}
    run_info = {"models": [{"model": "m1"}, {"model": "m2"}], "skipped": []}
    table, js, section = report_feedback_exposure(recs, cases, _feedback(), run_info, params, seed=0)
    assert len(table) == 2 * 6 and list(dict.fromkeys(table["model"])) == ["m1", "m2"]
    assert js["scalars"]["test/m2/disliked_exposure_at_10"] == pytest.approx(1.25 / 3)
    assert not any("@" in key for key in js["scalars"])
    assert "### test (3 users; 2 liked cases of 2 users, 4 disliked of 3 users)" in section
    assert "| m1 | 0.5000 [" in section  # liked recall first
    _, md, _ = compute_metrics(recs, cases, run_info, params, 0, section)
    assert md.index("## test (7 users)") < md.index("## Feedback exposure (top 10)")
    # settings are checked, by name
    for bad, says in (({"k": 30}, r"feedback_exposure\.k must be an integer in \[1, evaluation\.top_k=20\]"),
                      ({"disliked_max_rating": "low"}, "disliked_max_rating must be a number"),
                      ({"k": 10, "cutoff": 2}, "unknown keys")):
        with pytest.raises(ValueError, match=says):
            exposure_settings(bad, 20)


def test_ratio_bootstrap_leaves_out_resamples_without_a_denominator():
    from align3gr_pipelines.evaluation.metrics import bootstrap_ratio_ci

    num = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 0.0]])
    den = np.array([[1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    low, high = bootstrap_ratio_ci(num, den, 500, 0.95, seed=1)
    # series 0: sum ratio 2/4 lies inside; every resampled ratio is in [0, 1]; series 1 has no denominator
    assert 0.0 <= low[0] <= 0.5 <= high[0] <= 1.0
    assert np.isnan(low[1]) and np.isnan(high[1])
    with pytest.raises(ValueError, match="equally shaped"):
        bootstrap_ratio_ci(num, den[:2], 10)
