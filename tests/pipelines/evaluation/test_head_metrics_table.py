"""HR@1, NDCG@10 and MRR@K (MRR@50 included) in the evaluation table, by hand and with ties, for every model
row; the cut-offs checked against top_k by parameter name; the shipped parameters reach them."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from align3gr_pipelines.evaluation.report import check_cutoffs
from align3gr_pipelines.pipelines.evaluation.nodes import compute_metrics

REPO = Path(__file__).resolve().parents[3]
PARAMS = {"ks": [1, 5, 10], "mrr_ks": [10, 50], "top_k": 50, "beam_width": 20, "bootstrap": {"n_resamples": 100},
          "paired_test": {"n_permutations": 100}}


def _list(model: str, user: str, target_rank: int, tied: range = range(0)) -> list[tuple]:
    """A 50-long list of fillers with the target at target_rank; the ranks in `tied` share one score."""
    return [(model, "test", user, 0, r, "t" if r == target_rank else f"x{r}", 1.0 if r in tied else 100.0 - r)
            for r in range(1, 51)]


def _recs() -> pd.DataFrame:
    rows = (_list("sft", "u1", 1) + _list("sft", "u2", 2, range(1, 3)) + _list("sft", "u3", 30)
            # a baseline whose scores all tie (a popularity list with equal counts): the target anywhere in it
            + [row for u in ("u1", "u2", "u3") for row in _list("most_popular", u, 40, range(1, 51))])
    return pd.DataFrame(rows, columns=["model", "split", "user_id", "case", "rank", "item_id", "score"])


def test_head_metrics_by_hand_for_every_row_ties_included():
    cases = pd.DataFrame({"split": "test", "user_id": ["u1", "u2", "u3"], "case": 0, "history": [[], [], []], "target": "t"})
    info = {"models": [{"model": "sft"}, {"model": "most_popular"}], "skipped": []}
    table, md, js = compute_metrics(_recs(), cases, info, PARAMS, seed=0)
    v = table.set_index(["model", "metric"])["value"]
    # sft: u1 at rank 1; u2 tied with rank 1 (group of ranks 1-2); u3 at rank 30 (beyond 10, within 50)
    assert v["sft", "recall@1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert v["sft", "ndcg@10"] == pytest.approx((1 + (1 + 1 / math.log2(3)) / 2 + 0) / 3)
    assert v["sft", "mrr@10"] == pytest.approx((1 + (1 + 1 / 2) / 2 + 0) / 3)
    assert v["sft", "mrr@50"] == pytest.approx((1 + (1 + 1 / 2) / 2 + 1 / 30) / 3)
    # most_popular: one 50-item tie group, so each metric is its mean over the 50 positions
    assert v["most_popular", "recall@1"] == pytest.approx(1 / 50)
    assert v["most_popular", "ndcg@10"] == pytest.approx(sum(1 / math.log2(r + 1) for r in range(1, 11)) / 50)
    assert v["most_popular", "mrr@10"] == pytest.approx(sum(1 / r for r in range(1, 11)) / 50)
    assert v["most_popular", "mrr@50"] == pytest.approx(sum(1 / r for r in range(1, 51)) / 50)
    wanted = ["recall@1", "recall@5", "recall@10", "ndcg@5", "ndcg@10", "mrr@10", "mrr@50"]
    for model in ("sft", "most_popular"):
        assert table.loc[table["model"] == model, "metric"].tolist() == wanted
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert header.startswith("| model | HR@1 | recall@5 | recall@10 | ndcg@5 | ndcg@10 | mrr@10 | mrr@50 | p HR@1 |")
    assert "recall@1 " not in md and "| sft |" in md and "| most_popular |" in md
    assert {"test/sft/recall_at_1", "test/sft/ndcg_at_10", "test/most_popular/mrr_at_50"} <= set(js["scalars"])
    assert js["info"]["mrr_ks"] == [10, 50]


def test_cutoffs_are_checked_against_top_k_by_name():
    assert check_cutoffs([1, 5, 10], [10, 50], 50, 20) == ([1, 5, 10], [10, 50])
    with pytest.raises(ValueError, match=r"evaluation\.mrr_ks \[50\] exceed evaluation\.top_k=20.*top_k >= 50"):
        check_cutoffs([1, 5, 10], [10, 50], 20, 20)
    with pytest.raises(ValueError, match=r"evaluation\.mrr_ks: each must be >= 1"):
        check_cutoffs([1], [0], 20, 20)
    with pytest.raises(ValueError, match=r"evaluation\.ks must be non-empty, each in \[1, evaluation\.top_k=20\]"):
        check_cutoffs([1, 30], [], 20, 20)
    with pytest.raises(ValueError, match=r"evaluation\.ks must be a list of integers"):
        check_cutoffs([True, 5], [], 20, 20)
    cases = pd.DataFrame({"split": "test", "user_id": ["u1"], "case": 0, "history": [[]], "target": "t"})
    with pytest.raises(ValueError, match=r"evaluation\.mrr_ks"):
        compute_metrics(_recs(), cases, {"models": [{"model": "sft"}], "skipped": []}, {**PARAMS, "top_k": 20}, seed=0)


@pytest.mark.parametrize("env", ["base", "ml_latest_small", "instruments_cpu"])
def test_shipped_parameters_give_hr1_ndcg10_and_mrr(env):
    """Each env's evaluation parameters (over base) pass the check and ask for HR@1, NDCG@10 and an MRR."""
    merged = yaml.safe_load((REPO / "conf/base/parameters_evaluation.yml").read_text())["evaluation"]
    own = REPO / f"conf/{env}/parameters_evaluation.yml"
    if env != "base" and own.exists():
        merged = {**merged, **(yaml.safe_load(own.read_text()) or {}).get("evaluation", {})}
    ks, mrr_ks = check_cutoffs(merged["ks"], merged["mrr_ks"], merged["top_k"], merged["beam_width"])
    assert 1 in ks and 10 in ks and mrr_ks
    assert merged["feedback_exposure"] == {"enabled": True, "k": 10, "disliked_max_rating": 1.5}
