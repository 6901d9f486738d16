"""`rf_dpo.hard_stage` (issue 25): the paper's liked-vs-neutral hard stage stays the default and builds exactly the
pairs it built before the parameter existed; `disliked_hard` rejects the later-rated disliked items the input
policy scores highest, in score order; values that cannot work on the supported sources fail naming the parameter.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner

from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, item_logprobs
from align3gr_pipelines.lm.rec_lm import encode_prompt
from align3gr_pipelines.pipelines.rf_dpo import create_pipeline, nodes
from align3gr_pipelines.preference import feedback_pairs as fp

from ..pipelines.sp_dpo_curriculum.tiny_world import KeptMemoryDataset, make_world
from . import rf_golden_world as golden


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- the default: today's pairs, bit for bit ------------------------------------------------------------------

@pytest.mark.parametrize("stage,n,pad", golden.CASES)
def test_every_existing_rule_builds_the_pairs_it_built_before(stage, n, pad):
    expected = json.loads(golden.GOLDEN.read_text())[f"{stage}/{n}/{pad}"]
    prompts, recs, levels = golden.world()
    got = golden.as_json(*fp.build_feedback_pairs(prompts, recs, levels, stage, n, pad, golden.TOKENS, golden.CODES))
    assert got["pairs"] == expected["pairs"]
    assert {k: got["stats"][k] for k in expected["stats"]} == expected["stats"]  # new stats keys only add


def _recommendations() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The golden world as the rf_dpo nodes see it: one row per prompt with its ``recommended`` list."""
    prompts, recs, levels = golden.world()
    lists = recs.sort_values(["user_id", "rank"]).groupby("user_id")["item_id"].apply(list).to_dict()
    return prompts.assign(recommended=[lists.get(u, []) for u in prompts["user_id"]]), levels


def _item_scids() -> pd.DataFrame:
    return pd.DataFrame({"id": golden.ITEMS, "codes": [golden.CODES[i] for i in golden.ITEMS],
                         "tokens": [golden.TOKENS[i] for i in golden.ITEMS]})


@pytest.mark.parametrize("params", [{}, {"hard_stage": "neutral"}, {"hard_stage": "neutral", "disliked_hard": {"max_rejected": 1}}])
def test_the_hard_slot_is_the_papers_liked_vs_neutral_by_default(params):
    recommendations, levels = _recommendations()
    pairs = nodes.build_rf_pairs(recommendations, levels, _item_scids(), {"n_rejected": 20, **params}, "hard")
    expected = json.loads(golden.GOLDEN.read_text())["hard/20/False"]["pairs"]
    assert golden.as_json(pairs, {})["pairs"] == expected and len(expected) > 0
    assert {lv for lvs in pairs["rejected_level"] for lv in lvs} == {"neutral"}


# ---- disliked_hard on a hand-made user ------------------------------------------------------------------------

# u rated h (disliked, before the prompt, not in its history), a, i (disliked, in the history), b (the target),
# then c (disliked), d (neutral), e (disliked), f (disliked), g (liked); c is rated twice.
LEVELS = pd.DataFrame({"user_id": "u", "item_id": list("haibcdefg"),
                       "level": ["disliked", "liked", "disliked", "liked", "disliked", "neutral", "disliked", "disliked", "liked"]})
PROMPT = {"user_id": "u", "prompt": "p", "history": ["a", "i"], "target": "b", "position": 3,
          "future": ["c", "d", "e", "f", "g", "c"]}
RECS = pd.DataFrame({"user_id": "u", "item_id": ["x", "f", "h", "d", "i", "y"], "rank": range(6)})
ITEMS = list("abcdefghixy")
TOKENS = {i: f"<a_{k}><b_0>" for k, i in enumerate(ITEMS)}
CODES = {i: [k, 0] for k, i in enumerate(ITEMS)}


def policy_scores(items: list[str]) -> list[float]:
    """The stand-in for the policy's log-probabilities: the neutral d and the pre-prompt h score highest (neither
    may be rejected); e and f tie, e is the nearer."""
    table = {"c": -3.0, "d": 5.0, "e": -1.0, "f": -1.0, "h": 0.0, "i": 1.0}
    return [table[i] for i in items]


def _hard(n: int = 20, pad: bool = False, prompt: dict | None = None) -> tuple[pd.Series, dict[str, float]]:
    prompts = pd.DataFrame([prompt or PROMPT])
    candidates = fp.disliked_candidates(prompts, LEVELS)
    prompts = prompts.assign(scored_items=candidates, scored_logp=[policy_scores(c) for c in candidates])
    pairs, stats = fp.build_feedback_pairs(prompts, RECS, LEVELS, "disliked_hard", n, pad, TOKENS, CODES)
    assert len(pairs) == 1
    return pairs.iloc[0], stats


def test_disliked_candidates_are_the_later_rated_disliked_items_once_each():
    assert fp.disliked_candidates(pd.DataFrame([PROMPT]), LEVELS) == [["c", "e", "f"]]


def test_disliked_hard_rejects_the_highest_scored_disliked_items_in_order():
    row, stats = _hard()
    assert row.chosen == "b"
    assert list(row.rejected) == ["e", "f", "c"]  # by score; the tie e = f keeps the nearer e first
    assert list(row.rejected_level) == ["disliked"] * 3
    assert list(row.rejected_source) == ["later_rated", "recommended", "later_rated"]  # f is in the policy's top-K
    assert (row.n_from_recommendations, row.n_from_later_rated, row.n_from_unrated) == (1, 2, 0)
    assert stats["pool_later_rated"] == 3 and stats["pool_recommended"] == 1 and stats["n_pool_not_kept"] == 0
    assert stats["pool_unrated_recommended"] == 2 and stats["n_pairs"] == 1 and stats["n_prompts"] == 1


def test_the_cap_keeps_the_top_scored_where_the_easy_rule_keeps_the_recommended_then_the_nearest():
    hard, stats = _hard(n=2)
    assert list(hard.rejected) == ["e", "f"] and stats["n_pool_not_kept"] == 1
    easy, _ = fp.build_feedback_pairs(pd.DataFrame([PROMPT]), RECS, LEVELS, "easy", 2, False, TOKENS, CODES)
    assert list(easy.iloc[0].rejected) == ["f", "c"]
    scores = dict(zip("cef", policy_scores(list("cef"))))
    assert min(scores[i] for i in hard.rejected) >= max(scores[i] for i in "cef" if i not in hard.rejected)


def test_disliked_hard_tops_up_with_unrated_recommendations_only_behind_the_switch():
    row, _ = _hard(n=5, pad=True)
    assert list(row.rejected) == ["e", "f", "c", "x", "y"] and row.n_from_unrated == 2
    row, _ = _hard(n=5, pad=False)
    assert list(row.rejected) == ["e", "f", "c"]


def test_disliked_hard_needs_a_score_for_every_candidate():
    prompts = pd.DataFrame([PROMPT]).assign(scored_items=[["c", "e"]], scored_logp=[[0.0, 1.0]])
    with pytest.raises(ValueError, match="no policy score for item.*'f'.*scored_items"):
        fp.build_feedback_pairs(prompts, RECS, LEVELS, "disliked_hard", 3, False, TOKENS, CODES)
    with pytest.raises(ValueError, match="disliked_hard stage: missing column.*scored_items"):
        fp.build_feedback_pairs(pd.DataFrame([PROMPT]), RECS, LEVELS, "disliked_hard", 3, False, TOKENS, CODES)


# ---- parameters -------------------------------------------------------------------------------------------------

def test_the_parameter_selects_the_hard_slots_rule():
    assert nodes._stage_kind("hard", {}) == "hard"
    assert nodes._stage_kind("hard", {"hard_stage": "disliked_hard"}) == "disliked_hard"
    assert nodes._stage_kind("easy", {"hard_stage": "disliked_hard"}) == "easy"
    assert nodes._stage_kind("hard", {"mode": "mixed"}) == "mixed"
    assert nodes._n_rejected({"n_rejected": 20, "disliked_hard": {"max_rejected": 5}}, "disliked_hard") == 5
    assert nodes._n_rejected({"n_rejected": 20, "disliked_hard": {"max_rejected": 5}}, "hard") == 20
    assert nodes._n_rejected({"n_rejected": 3, "disliked_hard": {"max_rejected": 5}}, "disliked_hard") == 3


@pytest.mark.parametrize(
    "params,message",
    [
        ({"hard_stage": "liked_vs_nothing"}, r"rf_dpo\.hard_stage: expected one of \['disliked_hard', 'neutral'\]"),
        ({"hard_stage": "unrated_shown"}, r"rf_dpo\.hard_stage: 'unrated_shown' needs impressions.*no supported data source"),
        ({"hard_stage": "disliked_hard", "mode": "mixed"}, r"rf_dpo\.hard_stage: 'disliked_hard' applies to mode progressive only"),
    ],
)
def test_unsupported_hard_stages_fail_naming_the_parameter(params, message):
    with pytest.raises(ValueError, match=message):
        nodes._stage_kind("hard", params)
    # the stage's first node already refuses, before any feedback is read
    with pytest.raises(ValueError, match=message):
        nodes.resolve_feedback_levels(pd.DataFrame(), pd.DataFrame(), params, 0)


def test_a_bad_cap_fails_naming_the_parameter():
    with pytest.raises(ValueError, match=r"rf_dpo\.disliked_hard\.max_rejected must be an integer >= 1, got 0"):
        nodes._n_rejected({"disliked_hard": {"max_rejected": 0}}, "disliked_hard")


# ---- with a tiny policy: the scores are the policy's exact log-probabilities ----------------------------------

PARAMS = {
    "hard_stage": "disliked_hard",
    "n_rejected": 2,
    "prompts": {"max_users": None, "position": "random_liked"},
    "recommend": {"beam_width": 8, "top_k": 8, "batch_size": 4, "show_progress": False},
    "sentiment": {"check_on_rated": 0},
    "training": {"beta": 0.5, "learning_rate": 2e-3, "batch_size": 4, "show_progress": False},
    "selection": {"enabled": False},
}


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=12, seed=4)


def test_the_hard_stage_ranks_by_the_input_policys_exact_log_probability(world):
    levels, _ = fp.training_feedback(world.feedback, None, {})
    recs = nodes.recommend_for_feedback(world.policy, world.train_sequences, levels, world.sft_examples,
                                        world.item_scids, world.user_scids, PARAMS, 5, "hard")
    assert [list(c) for c in recs["scored_items"]] == fp.disliked_candidates(recs, levels)
    tok = world.policy.tokenizer
    catalog = SCIDCatalog.from_scids(world.item_scids, tok)
    index = {iid: k for k, iid in enumerate(catalog.item_ids)}
    n_scored = 0
    for row in recs.itertuples():  # each prompt alone: no batching or padding shared with the node's call
        if len(row.scored_items):
            cand = torch.tensor([[index[i] for i in row.scored_items]])
            lp = item_logprobs(world.policy.model, [encode_prompt(tok, row.prompt)], catalog, cand, batch_size=1,
                               pad_token_id=tok.pad_token_id)
            assert lp[0].tolist() == pytest.approx(list(row.scored_logp), abs=1e-4)
            n_scored += len(row.scored_items)
    assert n_scored >= 10

    pairs = nodes.build_rf_pairs(recs, levels, world.item_scids, PARAMS, "hard")
    assert len(pairs) > 0
    by_user = recs.set_index("user_id")
    n_cut = 0
    for row in pairs.itertuples():
        score = dict(zip(by_user.loc[row.user_id, "scored_items"], by_user.loc[row.user_id, "scored_logp"]))
        kept = [score[i] for i in row.rejected]
        left = [s for i, s in score.items() if i not in row.rejected]
        assert kept == sorted(kept, reverse=True) and set(row.rejected_level) == {"disliked"}
        assert all(s <= min(kept) for s in left)
        n_cut += bool(left)
    assert n_cut > 0  # some user had more disliked later items than N = 2: the cap picked the policy's top ones


def test_the_pipeline_reports_each_stages_pairs_and_pools(world):
    pipe = create_pipeline()
    inputs = {"sp_dpo_model_hard": world.policy, "feedback": world.feedback, "interactions": world.interactions,
              "train_sequences": world.train_sequences, "sft_examples": world.sft_examples,
              "item_scids": world.item_scids, "user_scids": world.user_scids,
              "seq_eval_prompts": world.seq_eval_prompts, "params:rf_dpo": PARAMS, "params:seed": 5}
    catalog = DataCatalog({k: KeptMemoryDataset(v) for k, v in inputs.items()}
                          | {k: KeptMemoryDataset() for k in pipe.all_outputs()})
    SequentialRunner().run(pipe, catalog)
    for stage, rule in (("easy", "easy"), ("hard", "disliked_hard")):
        pairs, metrics = catalog.load(f"rf_dpo_pairs_{stage}"), catalog.load(f"rf_dpo_metrics_{stage}")
        s = metrics["scalars"]
        assert metrics["info"]["pairs"] == rule and len(pairs) > 0 and s["n_pairs"] == len(pairs)
        assert s["n_prompts"] == len(catalog.load(f"rf_dpo_recommendations_{stage}"))
        used = s["n_from_recommendations"] + s["n_from_later_rated"]
        assert used == sum(map(len, pairs["rejected"])) and s["pool_later_rated"] == used + s["n_pool_not_kept"]
        assert s["pool_recommended"] <= s["pool_later_rated"]
        assert {lv for lvs in pairs["rejected_level"] for lv in lvs} == {"disliked"}
    assert not catalog.load("rf_dpo_model_hard").meta["skipped"]
