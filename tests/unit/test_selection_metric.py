"""Selection and its gate on the stage's own goal (issue 25): per-user NDCG@K / MRR@K / HR@1 of decoded lists by
hand, the sign test on those scores, a stage selected on NDCG where Recall cannot see the gain, and the head
metrics of the stage report."""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from align3gr_pipelines.evaluation.valid_recall import head_scores, selection_key, sign_test_p
from align3gr_pipelines.preference.dpo_stage import train_stage
from align3gr_pipelines.preference.dpo_trainer import (
    DPOConfig,
    Selection,
    confirmed_on_other_half,
    valid_recall_evaluator,
    weights_fingerprint,
)
from align3gr_pipelines.preference.self_play import build_pairs, item_code_table, sample_prompts
from align3gr_pipelines.preference.stage_report import report_markdown, stage_report
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_world


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=8, seed=1)


def test_head_scores_by_hand():
    top = np.array([[5, 1, 2, 3], [1, 5, 2, 3], [3, 4, 5, 2], [7, 8, 9, 5], [1, -1, -1, -1]])
    s = head_scores(top, np.array([5, 5, 5, 5, 5]), k=3)
    assert s["recall@3"].dtype == bool and s["recall@3"].tolist() == [True, True, True, False, False]  # rank 4 > k
    assert s["ndcg@3"] == pytest.approx([1.0, 1 / math.log2(3), 1 / math.log2(4), 0.0, 0.0])
    assert s["mrr@3"] == pytest.approx([1.0, 1 / 2, 1 / 3, 0.0, 0.0])
    assert s["hr@1"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert head_scores(top, np.array([5, 5, 5, 5, 5]), k=4)["mrr@4"][3] == pytest.approx(1 / 4)
    assert selection_key("ndcg", 10) == "ndcg@10"
    with pytest.raises(ValueError, match="selection metric"):
        selection_key("auc", 10)
    with pytest.raises(ValueError, match="decoded lists"):
        head_scores(top, np.array([5, 5]), k=3)


def test_sign_test_counts_users_whose_score_rose_vs_fell():
    base = np.array([1.0, 0.5, 0.5, 0.0, 0.25])
    better = np.array([1.0, 1.0, 0.6, 0.5, 0.25])  # 3 rose, none fell, 2 tied
    assert sign_test_p(better, base) == pytest.approx(1 / 8)
    assert sign_test_p(base, better) == 1.0  # P(X >= 0)
    mixed = np.array([0.0, 1.0, 0.6, 0.5, 0.25])  # 3 rose, 1 fell: P(X >= 3 | n = 4) = 5/16
    assert sign_test_p(mixed, base) == pytest.approx(5 / 16)
    # hits as bool: the same counts as the McNemar rule before issue 25
    hb, hs = np.array([1, 1, 0, 1], dtype=bool), np.array([0, 1, 1, 0], dtype=bool)
    assert sign_test_p(hb, hs) == pytest.approx(sum(math.comb(3, i) for i in range(2, 4)) / 8)
    # confirm_half on the score: a higher mean without max_p_value, the sign test with it
    assert confirmed_on_other_half(better, base, None)["confirmed"] is True
    assert confirmed_on_other_half(mixed, base, 0.05) == {"p": pytest.approx(5 / 16), "confirmed": False}


def test_selection_metric_parameter():
    assert Selection.from_params({}, "x").metric == "recall"
    assert Selection.from_params({"metric": "mrr"}, "x").metric == "mrr"
    with pytest.raises(ValueError, match=r"params y\.selection\.metric"):
        Selection.from_params({"metric": "hr"}, "params y.selection")


def _pairs(world, n=12, n_neg=4):
    ids, codes, tokens = item_code_table(world.item_scids)
    prompts, _ = sample_prompts(world.sft_examples, ids, 0)
    return build_pairs(prompts.head(n), ids, codes, tokens, None, None, n_neg, np.random.default_rng(0))[0]


class ListEvaluator:
    """Per call the next hand-made decoded lists; returns the selection score and leaves `last_head`, as
    `valid_recall_evaluator` does."""

    def __init__(self, lists, targets, k, metric):
        self.lists, self.targets, self.k, self.metric, self.last_head = iter(lists), targets, k, metric, None
        self.key = "the-sample"  # what dpo_stage records the selected score under, for the next stage

    def __call__(self, model):
        self.last_head = head_scores(next(self.lists), self.targets, self.k)
        return self.last_head[selection_key(self.metric, self.k)]


def _lists(n, rank_of_target, users):
    """[n, 10] lists of items 1..; the target 0 at 1-based `rank_of_target` for `users`, absent for the rest."""
    top = np.tile(np.arange(1, 11), (n, 1))
    for u in users:
        top[u, rank_of_target - 1] = 0
    return top


def _stage(world, metric, steps, **selection):
    cfg = DPOConfig(beta=0.5, learning_rate=5e-3, batch_size=4, show_progress=False)
    sel = Selection.from_params({"enabled": True, "eval_every": 1, "max_p_value": 0.05, "metric": metric, **selection}, "t")
    evaluate = ListEvaluator(steps, np.zeros(40, dtype=np.int64), 10, metric)
    return train_stage(world.policy, _pairs(world), cfg, 0, "sp_dpo_easy", "sft_model", evaluate=evaluate, selection=sel)


def test_ndcg_selection_keeps_a_checkpoint_that_lifts_targets_recall_cannot_see(world):
    """Step 1 lifts 10 users' targets from rank 5 to rank 1: the same hits, so Recall@10 keeps the input
    policy, while NDCG@10 rises for all 10 (sign test p = 1/1024) and keeps step 1."""
    base, lifted = _lists(40, 5, range(10)), _lists(40, 1, range(10))
    steps = [base, lifted, base, base]
    model, m = _stage(world, "recall", steps)
    s = m["scalars"]
    assert s["selected_step"] == 0 and weights_fingerprint(model.model) == weights_fingerprint(world.policy.model)
    assert "valid_ndcg" not in m["curves"] and s["valid_recall_selected"] == 0.25
    assert model.meta["valid_recall"] == {"key": "the-sample", "score": 0.25}
    model, m = _stage(world, "ndcg", steps)
    s = m["scalars"]
    assert s["selected_step"] == 1 and s["selected_p_vs_input"] == pytest.approx(1 / 1024)
    assert [v for _, v in m["curves"]["valid_ndcg"]] == pytest.approx([10 / 40 / math.log2(6), 0.25, 10 / 40 / math.log2(6), 10 / 40 / math.log2(6)])
    assert s["valid_ndcg_selected"] == pytest.approx(0.25) and "valid_recall_selected" not in s and "valid_recall" not in m["curves"]
    # the four head metrics of the input policy and the kept checkpoint, side by side, from the same lists
    assert (s["valid_input_recall@10"], s["valid_selected_recall@10"]) == (0.25, 0.25)
    assert (s["valid_input_hr@1"], s["valid_selected_hr@1"]) == (0.0, 0.25)
    assert (s["valid_input_mrr@10"], s["valid_selected_mrr@10"]) == pytest.approx((0.25 / 5, 0.25))
    assert s["valid_input_ndcg@10"] == pytest.approx(0.25 / math.log2(6))
    assert not model.meta.get("valid_recall")  # an NDCG score is never handed on as the next stage's recall


def test_confirm_half_on_mrr(world):
    from align3gr_pipelines.evaluation.valid_recall import confirm_half

    conf = confirm_half(40, 0)
    sel_users, conf_users = np.flatnonzero(~conf), np.flatnonzero(conf)
    base = _lists(40, 4, range(40))
    only_select = _lists(40, 4, range(40))
    only_select[sel_users[:8]] = _lists(8, 1, range(8))
    both = only_select.copy()
    both[conf_users[:8]] = _lists(8, 1, range(8))
    _, m = _stage(world, "mrr", [base, only_select, base, base], confirm_half=True)
    s = m["scalars"]
    assert s["confirmed"] == 0.0 and s["selected_step"] == 0 and "valid_mrr_confirm" in m["curves"]
    _, m = _stage(world, "mrr", [base, both, base, base], confirm_half=True)
    s = m["scalars"]
    assert s["selected_step"] == 1 and s["confirmed"] == 1.0 and s["confirm_p_vs_input"] == pytest.approx(1 / 256)
    assert s["valid_mrr_confirm_selected"] == pytest.approx((8 + 12 / 4) / 20)


def test_the_real_evaluator_decodes_once_for_every_head_metric(world):
    tok = world.policy.tokenizer
    rec = Selection.from_params({"enabled": True, "n_users": 6, "beam_width": 8, "batch_size": 8, "k": 5}, "x")
    ndcg = Selection.from_params({"enabled": True, "n_users": 6, "beam_width": 8, "batch_size": 8, "k": 5, "metric": "ndcg"}, "x")
    e_rec = valid_recall_evaluator(world.seq_eval_prompts, world.item_scids, tok, rec, 0)
    e_ndcg = valid_recall_evaluator(world.seq_eval_prompts, world.item_scids, tok, ndcg, 0)
    hits, scores = e_rec(world.policy.model), e_ndcg(world.policy.model)
    assert hits.dtype == bool and scores.dtype == np.float64 and len(hits) == len(scores) == 6
    assert np.array_equal(hits, e_ndcg.last_head["recall@5"]) and np.array_equal(scores, e_rec.last_head["ndcg@5"])
    assert set(e_rec.last_head) == {"recall@5", "ndcg@5", "mrr@5", "hr@1"}
    assert np.all((scores > 0) == hits)
    # a recall evaluator's key is the one before issue 25; an NDCG one differs (never reused as a recall)
    from align3gr_pipelines.evaluation import valid_recall

    sample = valid_recall.build_valid_sample(valid_recall.sample_valid_prompts(world.seq_eval_prompts, 6, 0), world.item_scids, tok)
    old = hashlib.sha256(json.dumps([sample.prompts, sample.target_index.tolist(), 5, 8]).encode()).hexdigest()
    assert e_rec.key == old != e_ndcg.key


CASES = pd.DataFrame({"split": "test", "user_id": ["u1", "u2", "u3", "u4"], "target": ["a", "b", "c", "d"]})
FEEDBACK = pd.DataFrame({"user_id": ["u1", "u2", "u3", "u4"], "item_id": ["a", "b", "c", "d"],
                         "level": ["liked", "neutral", "disliked", "liked"], "split": "test"})


def _recs(model, lists):
    rows = [(model, "test", u, r + 1, item, 1.0 - r / 10) for u, items in lists.items() for r, item in enumerate(items)]
    return pd.DataFrame(rows, columns=["model", "split", "user_id", "rank", "item_id", "score"])


def test_stage_report_shows_head_metrics_beside_recall():
    sft = _recs("sft", {"u1": ["x", "a", "y"], "u2": ["x", "y", "b"], "u3": ["c", "x", "y"], "u4": ["x", "y", "z"]})
    easy = _recs("sp_dpo_easy", {"u1": ["a", "x", "y"], "u2": ["b", "x", "y"], "u3": ["c", "x", "y"], "u4": ["x", "y", "z"]})
    rep = stage_report(pd.concat([sft, easy]), CASES, FEEDBACK, k=3, n_bootstrap=200, n_permutations=200)["test"]
    s, e = rep["sft"], rep["sp_dpo_easy"]
    assert s["recall@3"] == e["recall@3"] == 0.75  # the same hits: recall sees nothing
    assert s["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4) + 1) / 4) and e["ndcg@3"] == 0.75
    assert s["mrr@3"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 4) and e["mrr@3"] == 0.75
    assert (s["hr@1"], e["hr@1"]) == (0.25, 0.75)
    assert e["delta_ndcg_vs_input"]["mean"] == pytest.approx(e["ndcg@3"] - s["ndcg@3"]) and e["delta_vs_input"]["mean"] == 0.0
    md = report_markdown({"test": rep}, k=3)
    assert "| N@3 | MRR@3 | HR@1 |" in md and "| 0.7500 | 0.7500 | 0.7500 | 0.7500 |" in md
