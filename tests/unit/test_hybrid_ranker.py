"""The `align3gr_cf` hybrid ranker (evaluation.hybrid_ranker): the candidate union and the scores by hand;
w = 0 and w = inf give the LM's and SASRec's own lists with a tiny real Llama and a tiny SASRec; the weight is
the grid's best on the select half of the valid users and is reported with its confirm-half score."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from align3gr_pipelines.cf.baselines import SASRecScorer, recommend
from align3gr_pipelines.cf.sasrec import SASRec
from align3gr_pipelines.evaluation.cases import REC_COLUMNS, eval_cases
from align3gr_pipelines.evaluation.hybrid_ranker import (
    Candidates,
    candidate_union,
    hybrid_recommendations,
    log_softmax_rows,
    rank_candidates,
    score_candidates,
    select_weight,
)
from align3gr_pipelines.evaluation.valid_recall import confirm_half, sign_test_p
from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, decode_prompts
from align3gr_pipelines.pipelines.evaluation.nodes import build_eval_prompts, recommend_with_lm
from align3gr_pipelines.sft.tasks import build_seq_eval_prompts
from tests.pipelines.sp_dpo_curriculum.conftest import one_torch_thread  # noqa: F401  (autouse)
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_world

INF = math.inf


# ---- by hand ----


def test_union_keeps_the_beam_order_then_adds_sasrecs_new_items_in_its_order():
    lm = np.array([[3, 1, 4, -1], [0, 2, -1, -1]])
    cf = np.array([[4, 5, 3, 9], [7, 0, 2, 8]])
    union, n_beam = candidate_union(lm, cf)
    assert union.tolist() == [[3, 1, 4, 5, 9], [0, 2, 7, 8, -1]]
    assert n_beam.tolist() == [3, 2]
    with pytest.raises(ValueError, match="two \\[n, \\*\\] index matrices"):
        candidate_union(lm, cf[:1])


def test_log_softmax_rows_matches_torch_and_keeps_unknown_items_at_minus_inf():
    logits = np.array([[1.0, 2.0, -np.inf, 0.5], [3.0, 3.0, 3.0, 3.0]])
    got = log_softmax_rows(logits)
    want = torch.log_softmax(torch.tensor(logits[0, [0, 1, 3]]), dim=0).numpy()
    assert np.allclose(got[0, [0, 1, 3]], want) and got[0, 2] == -np.inf
    assert np.allclose(got[1], np.log(0.25))


def hand_candidates() -> Candidates:
    # one case, candidates 10, 11, 12 (beam) and 13 (SASRec only), one padding slot
    return Candidates(
        index=np.array([[10, 11, 12, 13, -1]]),
        lm=np.array([[-1.0, -2.0, -3.0, -0.5, -np.inf]]),
        cf=np.array([[-4.0, -1.0, -1.0, -6.0, -np.inf]]),
        n_beam=np.array([3]),
    )


def test_scores_and_ranks_by_hand():
    c = hand_candidates()
    # w = 0: the LM alone; 13 (SASRec's) outscores the beam's items under the LM
    idx, score = rank_candidates(c, 0.0, 4)
    assert idx.tolist() == [[13, 10, 11, 12]] and score.tolist() == [[-0.5, -1.0, -2.0, -3.0]]
    # w = 1: lm + cf = -5, -3, -4, -6.5
    idx, score = rank_candidates(c, 1.0, 4)
    assert idx.tolist() == [[11, 12, 10, 13]] and score.tolist() == [[-3.0, -4.0, -5.0, -6.5]]
    # w = 0.25: -2, -2.25, -3.25, -2  -> 10 and 13 tie at -2: candidate order (the beam's 10 first)
    idx, _ = rank_candidates(c, 0.25, 4)
    assert idx.tolist() == [[10, 13, 11, 12]]
    # w = inf: SASRec alone (11 and 12 tie at -1: the LM breaks it, 11 first); the score is SASRec's
    idx, score = rank_candidates(c, INF, 4)
    assert idx.tolist() == [[11, 12, 10, 13]] and score.tolist() == [[-1.0, -1.0, -4.0, -6.0]]
    # k beyond the candidates: padded, never a padding slot ranked as an item
    idx, score = rank_candidates(c, 1.0, 6)
    assert idx[0, 4:].tolist() == [-1, -1] and np.isneginf(score[0, 4:]).all()
    with pytest.raises(ValueError, match="must be a number >= 0"):
        rank_candidates(c, -1.0, 3)


def test_an_item_sasrec_does_not_know_ranks_last_but_before_padding_and_w0_ignores_it():
    c = Candidates(index=np.array([[1, 2, -1]]), lm=np.array([[-0.1, -2.0, -np.inf]]), cf=np.array([[-np.inf, -3.0, -np.inf]]),
                   n_beam=np.array([2]))
    assert rank_candidates(c, 0.0, 3)[0].tolist() == [[1, 2, -1]]
    assert rank_candidates(c, 2.0, 3)[0].tolist() == [[2, 1, -1]]
    assert rank_candidates(c, INF, 3)[0].tolist() == [[2, 1, -1]]


def test_weight_selection_picks_the_select_halfs_best_and_reports_the_confirm_half():
    users = [f"u{i}" for i in range(8) for _ in range(2)]  # two cases per user: halves split users
    unique = sorted(set(users))
    confirm_users = {u for u, c in zip(unique, confirm_half(len(unique), 7)) if c}
    confirm = np.array([u in confirm_users for u in users])
    hits = {
        0.0: ~confirm & (np.arange(16) % 4 == 0),       # select 2/8
        1.0: ~confirm,                                   # select 8/8, confirm 0/8: chosen, and shown to fail
        2.0: ~confirm & (np.arange(16) % 2 == 0),       # select 4/8
        INF: confirm.copy(),                             # select 0/8, confirm 8/8
    }
    out = select_weight(hits, users, seed=7)
    assert out["chosen_w"] == "1" and out["weights"] == ["0", "1", "2", "inf"]
    assert out["valid_recall"]["1"] == {"select": 1.0, "confirm": 0.0}
    assert out["valid_recall"]["inf"] == {"select": 0.0, "confirm": 1.0}
    assert out["valid_recall"]["0"]["select"] == pytest.approx(hits[0.0][~confirm].mean())
    assert out["n_select_users"] + out["n_confirm_users"] == 8 and out["n_confirm_cases"] == 2 * out["n_confirm_users"]
    assert out["confirm_p_vs_sasrec"] == sign_test_p(hits[1.0][confirm], hits[INF][confirm]) == 1.0
    # a tie on the select half goes to the first weight of the grid
    tied = select_weight({2.0: ~confirm, 1.0: ~confirm}, users, seed=7)
    assert tied["chosen_w"] == "2"
    with pytest.raises(ValueError, match=">= 2 valid users"):
        select_weight({0.0: np.array([True]), 1.0: np.array([False])}, ["u1"], seed=0)


# ---- a tiny real Llama and a tiny SASRec ----


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def sasrec(world) -> SASRec:
    torch.manual_seed(3)
    return SASRec(world.item_scids["id"].tolist(), hidden_dim=16, n_layers=1, n_heads=1, max_len=20, dropout=0.0).eval()


@pytest.fixture(scope="module")
def catalog(world) -> SCIDCatalog:
    return SCIDCatalog.from_scids(world.item_scids, world.policy.tokenizer)


@pytest.fixture(scope="module")
def cases(world):
    """eval_cases and eval_prompts of every valid and test user, as the evaluation stage builds them."""
    params = {"splits": ["test", "valid"], "max_history": 20, "template_id": 0}
    ec = eval_cases(world.valid, world.test, params["splits"], 20, None, 0)
    seq = build_seq_eval_prompts(world.valid, world.test, world.item_scids, world.user_scids,
                                 {"max_history": 20, "eval_template_id": 0, "inject_user_scid": True})
    return ec, build_eval_prompts(ec, seq, world.item_scids, world.user_scids, params)


def test_w0_and_winf_give_the_lms_and_sasrecs_own_lists(world, sasrec, catalog, cases):
    ec, prompts = cases
    test = prompts["split"] == "test"
    texts, histories = prompts.loc[test, "prompt"].tolist(), ec.loc[test.to_numpy(), "history"].tolist()
    k = 10
    # A beam as wide as the catalogue is exhaustive: its list is the LM's ranking of every item.
    full_idx, full_score = decode_prompts(world.policy, texts, catalog, beam_width=catalog.n_items, top_k=k, batch_size=4)
    cands = score_candidates(world.policy, sasrec, catalog, texts, histories, full_idx.numpy(), cf_candidates=k, batch_size=4)
    idx0, score0 = rank_candidates(cands, 0.0, k)
    assert idx0.tolist() == full_idx.tolist()
    assert np.allclose(score0, full_score.numpy(), atol=1e-4)  # exact scoring = the beam's token sums
    sas_idx, _ = recommend(SASRecScorer(sasrec, catalog.item_ids), histories, k)
    assert rank_candidates(cands, INF, k)[0].tolist() == sas_idx.tolist()
    # A narrow beam: w = 0 keeps the beam's order on the beam's items; w = inf is still SASRec's list.
    beam, _ = decode_prompts(world.policy, texts, catalog, beam_width=5, top_k=5, batch_size=4)
    narrow = score_candidates(world.policy, sasrec, catalog, texts, histories, beam.numpy(), cf_candidates=k, batch_size=4)
    ranked = rank_candidates(narrow, 0.0, narrow.index.shape[1])[0]
    for row, beam_row in zip(ranked, beam.numpy()):
        assert [i for i in row if i in set(beam_row)] == beam_row.tolist()
    assert rank_candidates(narrow, INF, k)[0].tolist() == sas_idx.tolist()
    # And in between, the hybrid is neither (on this seed): the weight does something.
    mid = rank_candidates(narrow, 1.0, k)[0].tolist()
    assert mid != sas_idx.tolist() and mid != rank_candidates(narrow, 0.0, k)[0].tolist()


def test_hybrid_recommendations_is_a_recommendations_table_with_w_chosen_on_valid(world, sasrec, cases):
    ec, prompts = cases
    lm_recs, _ = recommend_with_lm(world.policy, prompts, world.item_scids, {"top_k": 20, "beam_width": 20, "batch_size": 8},
                                   stage="sft_model")
    recs, info = hybrid_recommendations(world.policy, sasrec, prompts, ec, lm_recs, world.item_scids, cf_candidates=20, top_k=20,
                                        select_k=10, seed=1, batch_size=8)
    assert list(recs.columns) == REC_COLUMNS and set(recs["model"]) == {"align3gr_cf"}
    assert len(recs) == 20 * len(prompts) and not recs.duplicated(["split", "user_id", "case", "item_id"]).any()
    assert recs.groupby(["split", "user_id", "case"])["rank"].apply(list).map(lambda r: r == list(range(1, 21))).all()
    sel = info["selection"]
    assert info["cf_weight"] == sel["chosen_w"] and set(sel["valid_recall"]) == set(sel["weights"])
    best = max(v["select"] for v in sel["valid_recall"].values())
    assert sel["valid_recall"][sel["chosen_w"]]["select"] == best
    assert sel["n_select_users"] + sel["n_confirm_users"] == world.valid["user_id"].nunique()
    assert "confirm_p_vs_lm" in sel and "confirm_p_vs_sasrec" in sel
    assert 20 <= info["mean_candidates"] <= 40 and info["mean_beam_candidates"] == 20
    # One weight: used as given. w = inf is the `sasrec` row's list; w = 0 on the beam's items the LM row's.
    sas, _ = hybrid_recommendations(world.policy, sasrec, prompts, ec, lm_recs, world.item_scids, weights=[INF], top_k=10, select_k=10)
    sas_idx, _ = recommend(SASRecScorer(sasrec, world.item_scids["id"].tolist()), ec["history"].tolist(), 10)
    got = sas.sort_values(["split", "user_id", "case", "rank"]).groupby(["split", "user_id", "case"], sort=False)["item_id"].apply(list)
    ids = np.asarray(world.item_scids["id"].tolist(), dtype=object)
    want = pd.Series([list(ids[r]) for r in sas_idx], index=pd.MultiIndex.from_frame(ec[["split", "user_id", "case"]]))
    assert got.to_dict() == want.to_dict()
    lm_only, _ = hybrid_recommendations(world.policy, sasrec, prompts, ec, lm_recs, world.item_scids, weights=[0.0], top_k=20, select_k=10)
    for key, part in lm_only.groupby(["split", "user_id", "case"]):
        beam = lm_recs.set_index(["split", "user_id", "case"]).loc[[key]].sort_values("rank")["item_id"].tolist()
        mine = part.sort_values("rank")["item_id"].tolist()
        assert [i for i in mine if i in set(beam)] == beam[: sum(i in set(beam) for i in mine)]


def test_hybrid_recommendations_skips_without_sasrec_and_refuses_a_bad_grid(world, sasrec, cases):
    ec, prompts = cases
    recs, info = hybrid_recommendations(world.policy, None, prompts, ec, pd.DataFrame({"rank": [1]}), world.item_scids)
    assert recs.empty and info["skipped"] == "no sasrec_model checkpoint"
    lm_recs = pd.DataFrame({"model": "sft", "split": "test", "user_id": "u0", "case": 0, "rank": [1], "item_id": "it0", "score": -1.0})
    with pytest.raises(ValueError, match="duplicates"):
        hybrid_recommendations(world.policy, sasrec, prompts, ec, lm_recs, world.item_scids, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="must be a number >= 0"):
        hybrid_recommendations(world.policy, sasrec, prompts, ec, lm_recs, world.item_scids, weights=[0.0, -2.0])
