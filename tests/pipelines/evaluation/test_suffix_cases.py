"""Several held-out cases per user (data_prep.holdout.mode: suffix): evaluation keys every case by (user,
position), so two cases of one user are scored separately, and leave-one-out tables still work."""
from __future__ import annotations

import pandas as pd
import pytest

from align3gr_pipelines.data.splitting import leave_one_out
from align3gr_pipelines.evaluation.report import metric_table
from align3gr_pipelines.pipelines.evaluation.nodes import build_eval_cases, build_eval_prompts


def _split():
    rows = [(u, f"{u}{p}", p) for u, n in (("a", 7), ("b", 6)) for p in range(n)]
    return leave_one_out(pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]), 20, k_valid=1, k_test=2)


def test_each_case_of_a_user_is_scored_on_its_own():
    _, valid, test = _split()
    cases = build_eval_cases(valid, test, {"splits": ["test"], "max_history": 20, "max_users": {"test": None}}, 0)
    assert cases[["user_id", "case", "target"]].values.tolist() == [["a", 5, "a5"], ["a", 6, "a6"], ["b", 4, "b4"], ["b", 5, "b5"]]
    # the model lists a6 first for both of a's cases: it hits a's second case at rank 1 and misses the first
    recs = pd.DataFrame({"model": "m", "split": "test", "user_id": ["a", "a", "b", "b"], "case": [5, 6, 4, 5],
                         "rank": 1, "item_id": ["a6", "a6", "b4", "zz"], "score": 1.0})
    table, _ = metric_table(recs, cases, ["m"], [1], n_boot=10, conf=0.95, n_perm=10, seed=0)
    r1 = table[table["metric"] == "recall@1"].iloc[0]
    assert r1["value"] == pytest.approx(2 / 4) and r1["n_users"] == 4


def test_prompts_are_matched_per_case():
    _, valid, test = _split()
    cases = build_eval_cases(valid, test, {"splits": ["test"], "max_history": 20, "max_users": {"test": None}}, 0)
    prompts = pd.DataFrame({"user_id": ["a", "a", "b", "b"], "split": "test", "prompt": ["pa5", "pa6", "pb4", "pb5"],
                            "target": ["a5", "a6", "b4", "b5"], "target_tokens": "", "position": [5, 6, 4, 5]})
    out = build_eval_prompts(cases, prompts, pd.DataFrame({"id": [], "tokens": []}), pd.DataFrame({"id": [], "tokens": []}),
                             {"max_history": 20})
    assert out["prompt"].tolist() == ["pa5", "pa6", "pb4", "pb5"] and out["case"].tolist() == [5, 6, 4, 5]
