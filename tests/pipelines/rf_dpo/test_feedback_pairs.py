"""Feedback levels, training-period-only labels, and the pairs of each RF-DPO stage."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from align3gr_pipelines.preference.feedback_pairs import build_feedback_pairs, rating_to_level, training_feedback, user_prompts


def test_rating_to_level_whole_and_half_stars():
    assert rating_to_level(pd.Series([1, 2, 3, 4, 5])).tolist() == ["disliked", "neutral", "neutral", "liked", "liked"]
    half = pd.Series(np.arange(0.5, 5.01, 0.5))
    assert rating_to_level(half).tolist() == ["disliked"] * 3 + ["neutral"] * 4 + ["liked"] * 3
    assert rating_to_level(pd.Series([2.5, None])).tolist() == ["neutral", None]
    # a 10-point scale with its own thresholds
    assert rating_to_level(pd.Series([3, 4, 7.5, 8]), neutral_min=4, liked_min=8).tolist() == ["disliked", "neutral", "neutral", "liked"]
    with pytest.raises(ValueError, match="neutral_min < liked_min"):
        rating_to_level(pd.Series([1.0]), neutral_min=4, liked_min=4)


class KeywordScorer:
    """Test double for the sentiment scorer (the real one is tested in test_sentiment.py)."""

    calls: list[list[str]] = []

    def predict(self, texts):
        KeywordScorer.calls.append(list(texts))
        return ["liked" if "good" in t else "disliked" for t in texts]


def _feedback():
    return pd.DataFrame(
        {
            "user_id": ["u", "u", "u", "u", "u", "u", "v"],
            "item_id": ["a", "b", "c", "d", "e", "f", "a"],
            "level": ["liked", None, None, "neutral", "liked", "disliked", None],
            "source": "rating",
            "rating": [5.0, 1.5, None, 3.0, 4.0, 1.0, None],
            "timestamp": [1, 2, 3, 4, 5, 6, 1],
            "split": ["train", "train", "train", "train", "valid", "test", "train"],
        }
    )


def test_training_feedback_levels_and_sources():
    inter = pd.DataFrame({"user_id": ["u", "v"], "item_id": ["c", "a"], "timestamp": [3, 1], "review": ["good stuff", "  "]})
    KeywordScorer.calls = []
    levels, report = training_feedback(_feedback(), inter, {}, KeywordScorer)
    assert dict(zip(levels["item_id"] + levels["user_id"], levels["level"])) == {"au": "liked", "bu": "disliked", "cu": "liked", "du": "neutral"}
    assert dict(zip(levels["item_id"], levels["source"]))["c"] == "review_sentiment"
    assert KeywordScorer.calls == [["good stuff"]]  # only the review-only training row; blank reviews are not scored
    assert report["n_excluded_valid_test"] == 2 and report["n_unlabelled_dropped"] == 1 and report["n_review_sentiment"] == 1
    assert report["level_counts"] == {"disliked": 1, "neutral": 1, "liked": 2}


def test_training_feedback_recompute_and_errors():
    levels, _ = training_feedback(_feedback(), None, {"recompute_from_rating": True, "neutral_min": 3.5, "liked_min": 4.5})
    assert dict(zip(levels["item_id"], levels["level"])) == {"a": "liked", "b": "disliked", "d": "disliked"}
    bad = _feedback().assign(level="meh")
    with pytest.raises(ValueError, match="feedback.level"):
        training_feedback(bad, None, {})
    with pytest.raises(ValueError, match="feedback: missing column"):
        training_feedback(_feedback().drop(columns="split"), None, {})
    with pytest.raises(ValueError, match="feedback.split"):
        training_feedback(_feedback().assign(split="later"), None, {})


def test_valid_and_test_feedback_is_never_read():
    fb = _feedback()
    levels, _ = training_feedback(fb, None, {}, KeywordScorer)
    mutated = fb.copy()
    held_out = mutated["split"] != "train"
    mutated.loc[held_out, "level"] = "this would fail validation"
    mutated.loc[held_out, "item_id"] = "b"
    again, _ = training_feedback(mutated, None, {}, KeywordScorer)
    pd.testing.assert_frame_equal(levels, again)


LEVELS = pd.DataFrame(
    {
        "user_id": "u",
        "item_id": ["a", "b", "c", "d", "e", "g", "h"],
        "level": ["liked", "liked", "disliked", "disliked", "neutral", "liked", "disliked"],
        "timestamp": [1, 2, 3, 4, 5, 6, 0],
    }
)
TOKENS = {i: f"<i0_{n}><i1_0>" for n, i in enumerate("abcdefghxyz")}
CODES = {i: [n, 0] for n, i in enumerate("abcdefghxyz")}
# The user rated h (disliked), a, then b (the prompt's target), c, d, e, g. The prompt shows [a]; h was
# rated before the prompt but is not in its history (cut by max_history).
PROMPTS = pd.DataFrame(
    {"user_id": ["u"], "prompt": ["p"], "history": [["a"]], "target": ["b"], "position": [2], "future": [["c", "d", "e", "g"]]}
)
RECS = pd.DataFrame({"user_id": "u", "item_id": ["a", "x", "d", "g", "h", "e", "y"], "rank": range(7)})


def _pairs(stage, n=4, pad=False, recs=RECS, prompts=PROMPTS):
    pairs, stats = build_feedback_pairs(prompts, recs, LEVELS, stage, n, pad, TOKENS, CODES)
    assert len(pairs) == 1
    return pairs.iloc[0], stats


def test_easy_pairs_liked_target_vs_later_disliked():
    row, stats = _pairs("easy")
    # chosen = the prompt's target (the true next item), never the recommended liked 'g' or 'a' (history).
    # rejected = later-rated disliked items the policy recommended ('d'), then the other later-rated
    # disliked ones ('c'); never 'h' (disliked, recommended, but rated before the prompt).
    assert row.chosen == "b" and row.chosen_source == "target"
    assert list(row.rejected) == ["d", "c"]
    assert list(row.rejected_level) == ["disliked", "disliked"]
    assert list(row.rejected_source) == ["recommended", "later_rated"]
    assert (row.n_from_recommendations, row.n_from_later_rated, row.n_from_unrated, row.filled) == (1, 1, 0, 1)
    assert stats["chosen_target"] == 1
    assert list(row.rejected_tokens) == [TOKENS[i] for i in row.rejected]


def test_hard_pairs_liked_vs_later_neutral():
    row, _ = _pairs("hard")
    assert row.chosen == "b" and list(row.rejected) == ["e"] and list(row.rejected_level) == ["neutral"]


def test_mixed_pairs_and_the_unrated_switch():
    row, _ = _pairs("mixed", n=3)
    assert list(row.rejected) == ["d", "e", "c"]
    row, _ = _pairs("easy", pad=True)
    # only behind the switch: recommendations the user never rated ('x', 'y'), after the rated ones
    assert list(row.rejected) == ["d", "c", "x", "y"] and row.n_from_unrated == 2


def test_chosen_is_a_later_liked_item_when_the_target_is_not_liked():
    prompts = PROMPTS.assign(target=["c"], future=[["d", "e", "g"]], history=[["a", "b"]])
    row, stats = _pairs("easy", prompts=prompts)
    assert row.chosen == "g" and row.chosen_source == "later_liked" and stats["chosen_later_liked"] == 1
    assert list(row.rejected) == ["d"]


def test_never_a_history_or_pre_prompt_item_as_chosen_or_rejected():
    # Every recommendation is liked and in the history, or disliked but rated before the prompt.
    recs = pd.DataFrame({"user_id": "u", "item_id": ["a", "h"], "rank": [0, 1]})
    prompts = PROMPTS.assign(target=["e"], future=[[]])  # target neutral, no future: nothing to choose
    pairs, stats = build_feedback_pairs(prompts, recs, LEVELS, "easy", 4, True, TOKENS, CODES)
    assert len(pairs) == 0 and stats["dropped_no_liked_future"] == 1
    pairs, stats = build_feedback_pairs(PROMPTS.assign(future=[["g"]]), recs, LEVELS, "easy", 4, True, TOKENS, CODES)
    assert len(pairs) == 0 and stats["dropped_no_rejected"] == 1


def test_user_prompts_latest_and_random_liked_positions():
    seqs = pd.DataFrame(
        {"user_id": "u", "history": [["a"], ["a", "b"], ["a", "b", "c"], ["a", "b", "c", "d"], ["a", "b", "c", "d", "e"]],
         "target": ["b", "c", "d", "e", "g"], "position": [1, 2, 3, 4, 5]}
    )
    prompts, stats = user_prompts(seqs, LEVELS, TOKENS, {"u": "<u0_1>"}, 0, None, 0)
    assert prompts.iloc[0].target == "g" and list(prompts.iloc[0].future) == []  # latest liked
    prompts, _ = user_prompts(seqs, LEVELS, TOKENS, {"u": "<u0_1>"}, 0, None, 0, position="random_liked")
    # the only liked transition with a later non-liked item is b's
    assert prompts.iloc[0].target == "b" and list(prompts.iloc[0].future) == ["c", "d", "e", "g"]
    assert prompts.iloc[0].history == ["a"]
    assert prompts.iloc[0].prompt.startswith("User <u0_1> has interacted with items <i0_0><i1_0> in order.")
    none, stats = user_prompts(seqs, LEVELS.assign(level="neutral"), TOKENS, None, 0, None, 0)
    assert len(none) == 0 and stats["n_users_without_liked_train_item"] == 1
    with pytest.raises(ValueError, match="rf_dpo.prompts.position"):
        user_prompts(seqs, LEVELS, TOKENS, None, 0, None, 0, position="first")


def test_resolve_node_calibrates_the_scorer_on_rated_reviews():
    from align3gr_pipelines.pipelines.rf_dpo.nodes import resolve_feedback_levels

    words = {1.0: ["awful", "broken", "terrible", "useless"], 3.0: ["okay", "average", "passable", "so-so"],
             5.0: ["superb", "wonderful", "excellent", "brilliant"]}
    rows = [(f"u{k}", f"i{r}_{k}", r, f"A {w} purchase, number {k}.") for r, ws in words.items() for k, w in enumerate(ws * 5)]
    rows += [("x", "j1", None, "A brilliant purchase, would buy again."), ("x", "j2", None, "An awful purchase, it broke.")]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "review"]).assign(timestamp=0)
    fb = inter.assign(level=rating_to_level(inter["rating"]), source="rating", split="train").drop(columns="review")
    params = {"sentiment": {"calibrate_on_rated": True, "check_on_rated": 30}}
    levels, report = resolve_feedback_levels(fb, inter, params, seed=0)
    scored = levels[levels["source"] == "review_sentiment"].set_index("item_id")["level"].to_dict()
    assert scored == {"j1": "liked", "j2": "disliked"}
    info = report["info"]["sentiment"]
    assert info["calibrated"] is True and info["agreement_with_ratings"]["n_reviews"] == 30
    assert report["scalars"]["sentiment_accuracy_on_rated"] >= 0.8


def test_user_prompts_cut_history_to_the_sft_prompt_length():
    seqs = pd.DataFrame(
        {"user_id": ["u"], "history": [["a", "c", "d"]], "target": ["b"], "position": [3]}
    )
    tokens = {**TOKENS, "c": "<i0_2><i1_2>", "d": "<i0_3><i1_3>"}
    prompts, _ = user_prompts(seqs, LEVELS, tokens, None, 0, None, 0, max_history=2)  # b is liked
    assert prompts.iloc[0].history == ["a", "c", "d"]  # the record keeps the full prefix
    assert "<i0_0><i1_0>" not in prompts.iloc[0].prompt and "<i0_3><i1_3>" in prompts.iloc[0].prompt
