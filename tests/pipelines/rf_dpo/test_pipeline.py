"""The rf_dpo pipeline end to end on a tiny world, through a DataCatalog and SequentialRunner."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner

from align3gr_pipelines.pipelines.rf_dpo import create_pipeline
from align3gr_pipelines.preference.dpo_trainer import weights_fingerprint

from ..sp_dpo_curriculum.tiny_world import KeptMemoryDataset, make_world


def _params(mode: str) -> dict:
    return {
        "mode": mode,
        "n_rejected": 4,
        "prompts": {"max_users": None, "position": "random_liked"},
        "recommend": {"beam_width": 8, "top_k": 8, "batch_size": 8, "show_progress": False},
        "sentiment": {"check_on_rated": 20},
        "training": {"beta": 0.5, "learning_rate": 2e-3, "batch_size": 4, "show_progress": False},
    }


@pytest.fixture(scope="module")
def world():
    w = make_world(n_users=12, seed=4)
    # a few training rows carry only a review: the sentiment scorer labels them
    fb = w.feedback
    review_only = fb.index[(fb["split"] == "train")][::7]
    w.feedback = fb.assign(level=fb["level"].astype(object))
    w.feedback.loc[review_only, ["level", "rating"]] = None
    w.interactions.loc[review_only, "review"] = "Absolutely love it, superb quality."
    return w


def run(world, mode: str, feedback: pd.DataFrame | None = None, policy="from_world") -> DataCatalog:
    pipe = create_pipeline()
    inputs = {
        "sp_dpo_model_hard": world.policy if policy == "from_world" else policy,
        "feedback": world.feedback if feedback is None else feedback,
        "interactions": world.interactions,
        "train_sequences": world.train_sequences,
        "sft_examples": world.sft_examples,
        "item_scids": world.item_scids,
        "user_scids": world.user_scids,
        "seq_eval_prompts": world.seq_eval_prompts,
        "params:rf_dpo": _params(mode),
        "params:seed": 5,
    }
    catalog = DataCatalog({k: KeptMemoryDataset(v) for k, v in inputs.items()} | {k: KeptMemoryDataset() for k in pipe.all_outputs()})
    SequentialRunner().run(pipe, catalog)
    return catalog


@pytest.fixture(scope="module")
def progressive(world):
    return run(world, "progressive")


def test_progressive_chains_stages(world, progressive):
    easy, hard = progressive.load("rf_dpo_model_easy"), progressive.load("rf_dpo_model_hard")
    assert easy.meta["dpo"]["reference_fingerprint"] == weights_fingerprint(world.policy.model)
    assert hard.meta["dpo"]["reference_fingerprint"] == weights_fingerprint(easy.model) == easy.meta["dpo"]["policy_fingerprint"]
    assert weights_fingerprint(hard.model) != weights_fingerprint(easy.model)
    assert not easy.meta["skipped"] and not hard.meta["skipped"]
    for s in ("easy", "hard"):
        m = progressive.load(f"rf_dpo_metrics_{s}")
        assert m["curves"]["loss"] and m["curves"]["reward_margin"] and progressive.load(f"rf_dpo_plot_{s}").axes


def test_level_report(world, progressive):
    report = progressive.load("rf_dpo_metrics_feedback")
    info = report["info"]
    n_train = int((world.feedback["split"] == "train").sum())
    assert sum(info["level_counts"].values()) == n_train
    assert info["n_review_sentiment"] > 0 and info["source_counts"]["review_sentiment"] == info["n_review_sentiment"]
    # the scorer was checked on the training-period reviews that carry a rating (at most check_on_rated)
    agree = info["sentiment"]["agreement_with_ratings"]
    inter, fb = world.interactions, world.feedback
    train_pairs = set(zip(fb.loc[fb["split"] == "train", "user_id"], fb.loc[fb["split"] == "train", "item_id"]))
    rated = inter[inter["rating"].notna() & inter["review"].notna()]
    n_rated = sum((u, i) in train_pairs for u, i in zip(rated["user_id"], rated["item_id"]))
    assert agree["n_reviews"] == min(20, n_rated) > 0
    cells = [n for row in agree["confusion"].values() for n in row.values()]
    diagonal = sum(agree["confusion"][lv][lv] for lv in agree["confusion"])
    assert sum(cells) == agree["n_reviews"] and agree["accuracy"] == pytest.approx(diagonal / agree["n_reviews"])
    levels = progressive.load("rf_dpo_feedback_levels")
    assert levels[levels["source"] == "review_sentiment"]["level"].eq("liked").all()


def test_pairs_per_stage_use_training_labels_only(world, progressive):
    train = world.feedback[world.feedback["split"] == "train"]
    levels = progressive.load("rf_dpo_feedback_levels")
    label = {(u, i): lv for u, i, lv in zip(levels["user_id"], levels["item_id"], levels["level"])}
    held_out = {(u, i) for u, i in zip(world.feedback["user_id"], world.feedback["item_id"]) if (u, i) not in set(zip(train["user_id"], train["item_id"]))}
    expected = {"easy": {"disliked"}, "hard": {"neutral"}}
    for stage, rejected_levels in expected.items():
        pairs = progressive.load(f"rf_dpo_pairs_{stage}")
        assert len(pairs) > 0
        for row in pairs.itertuples():
            assert label[(row.user_id, row.chosen)] == "liked" and (row.user_id, row.chosen) not in held_out
            for item, level in zip(row.rejected, row.rejected_level):
                if level == "unrated":
                    assert (row.user_id, item) not in label
                else:
                    assert level in rejected_levels and label[(row.user_id, item)] == level
            assert row.chosen not in row.rejected and len(row.rejected) <= 4
    recs = progressive.load("rf_dpo_recommendations_easy")
    valid_items = dict(zip(world.valid["user_id"], world.valid["target"]))
    for row in recs.itertuples():  # prompts come from training prefixes only
        assert valid_items[row.user_id] not in row.history and row.target != valid_items[row.user_id]


def test_chosen_and_rejected_come_from_the_prompts_future(world, progressive):
    """Never a prompt-history item, never an item the user rated before the prompt's target."""
    fb = world.feedback[world.feedback["split"] == "train"]
    when = {(u, i): t for u, i, t in zip(fb["user_id"], fb["item_id"], fb["timestamp"])}
    for stage in ("easy", "hard"):
        recs = progressive.load(f"rf_dpo_recommendations_{stage}").set_index("user_id")
        for row in progressive.load(f"rf_dpo_pairs_{stage}").itertuples():
            prompt = recs.loc[row.user_id]
            assert row.prompt == prompt.prompt
            history = set(prompt.history)
            t0 = when[(row.user_id, prompt.target)]
            assert row.chosen not in history and when[(row.user_id, row.chosen)] >= t0
            assert row.chosen == prompt.target and row.chosen_source == "target"
            for item in row.rejected:
                assert item not in history and when[(row.user_id, item)] > t0


def test_each_stage_recommends_with_its_own_input_policy(world, progressive):
    from align3gr_pipelines.preference.self_play import decode_candidates, item_code_table

    ids, _, _ = item_code_table(world.item_scids)
    for stage, policy in (("easy", world.policy), ("hard", progressive.load("rf_dpo_model_easy"))):
        recs = progressive.load(f"rf_dpo_recommendations_{stage}")
        top = decode_candidates(policy, recs["prompt"].tolist(), world.item_scids, ids, 8, 8, 8, show_progress=False)
        assert [list(r) for r in recs["recommended"]] == [[ids[i] for i in row if i >= 0] for row in top]
    # the hard stage's input policy was trained, so its lists differ from the easy stage's
    easy, hard = (progressive.load(f"rf_dpo_recommendations_{s}")["recommended"].map(list).tolist() for s in ("easy", "hard"))
    assert easy != hard


def test_outputs_do_not_depend_on_valid_or_test_feedback(world, progressive):
    fb = world.feedback.copy()
    held_out = fb["split"] != "train"
    fb.loc[held_out, "level"] = fb.loc[held_out, "level"].map({"liked": "disliked", "disliked": "liked", "neutral": "liked"})
    fb.loc[held_out, "rating"] = 6 - fb.loc[held_out, "rating"]
    other = run(world, "progressive", feedback=fb)
    for name in ("rf_dpo_feedback_levels", "rf_dpo_pairs_easy", "rf_dpo_pairs_hard"):
        pd.testing.assert_frame_equal(progressive.load(name), other.load(name))
    assert weights_fingerprint(progressive.load("rf_dpo_model_hard").model) == weights_fingerprint(other.load("rf_dpo_model_hard").model)


def test_mixed_mode(world):
    catalog = run(world, "mixed")
    easy = catalog.load("rf_dpo_model_easy")
    assert easy.meta["skipped"] is True and len(catalog.load("rf_dpo_pairs_easy")) == 0
    hard = catalog.load("rf_dpo_model_hard")
    assert hard.meta["skipped"] is False and hard.meta["dpo"]["reference_fingerprint"] == weights_fingerprint(world.policy.model)
    levels = {lv for lvs in catalog.load("rf_dpo_pairs_hard")["rejected_level"] for lv in lvs}
    assert {"disliked", "neutral"} <= levels


def test_missing_sp_dpo_model_is_a_clear_error(world):
    with pytest.raises(Exception, match="sp_dpo_model_hard.*sp_dpo_curriculum"):
        run(world, "progressive", policy=None)


@pytest.mark.parametrize("case", ["empty", "no_liked"])
def test_no_real_feedback_skips_both_stages_with_the_reason(world, case):
    """LC-Rec's JSON releases have no ratings or reviews: `feedback` is empty. RF-DPO is then not an error; both
    stages pass sp_dpo_model_hard through, marked skipped (evaluation leaves them out), and every rf_dpo metrics
    JSON says why."""
    if case == "empty":
        fb = world.feedback.iloc[0:0]
        expect, detail = "no real feedback", "the 'feedback' table is empty"
    else:
        fb = world.feedback.assign(level=world.feedback["level"].replace({"liked": "neutral"}), rating=2.0)
        expect = detail = "no liked training-period feedback"
    plt.close("all")  # the module's earlier runs keep their figures open (KeptMemoryDataset)
    catalog = run(world, "progressive", feedback=fb)
    feedback_info = catalog.load("rf_dpo_metrics_feedback")["info"]
    assert feedback_info["skip_reason"].startswith(expect) and detail in feedback_info["skip_reason"]
    for stage in ("easy", "hard"):
        model = catalog.load(f"rf_dpo_model_{stage}")
        assert model.meta["skipped"] is True and model.meta["skip_reason"].startswith(expect)
        assert weights_fingerprint(model.model) == weights_fingerprint(world.policy.model)
        metrics = catalog.load(f"rf_dpo_metrics_{stage}")
        assert metrics["info"]["skipped"] is True and metrics["info"]["no_feedback"] is True
        assert metrics["scalars"]["skipped"] == 1.0 and metrics["info"]["reason"].startswith(expect)
        assert len(catalog.load(f"rf_dpo_pairs_{stage}")) == 0
        assert len(catalog.load(f"rf_dpo_recommendations_{stage}")) == 0
        fig = catalog.load(f"rf_dpo_plot_{stage}")
        assert fig.axes
        plt.close(fig)
