"""The `align3gr_cf` ranker behind the Python API and the served MLflow model: a request gets the list the
evaluation stage's `align3gr_cf` row ranks for the same history and weight, the logged model carries SASRec
and answers the same list, and `ranker: lm` leaves the recommender as it was."""
from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch

from align3gr_pipelines.cf.sasrec import SASRec
from align3gr_pipelines.evaluation.cases import eval_cases
from align3gr_pipelines.evaluation.hybrid_ranker import hybrid_recommendations
from align3gr_pipelines.pipelines.evaluation.nodes import build_eval_prompts, recommend_with_lm
from align3gr_pipelines.serving.recommend import PromptSettings, Recommender, build_recommender, read_settings, write_settings
from align3gr_pipelines.serving.recommender_model import log_recommender
from align3gr_pipelines.sft.tasks import build_seq_eval_prompts
from tests.pipelines.sp_dpo_curriculum.conftest import one_torch_thread  # noqa: F401  (autouse)
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_world

from .tiny_project import items_table, save_checkpoints

PROMPT = PromptSettings(max_history=5, template_id=1, inject_user_scid=True)


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def sasrec(world) -> SASRec:
    torch.manual_seed(3)
    return SASRec(world.item_scids["id"].tolist(), hidden_dim=16, n_layers=1, n_heads=1, max_len=20, dropout=0.0).eval()


def hybrid(world, sasrec, weight: float, **kwargs) -> Recommender:
    return Recommender(world.policy, world.item_scids, items_table(world), world.user_scids, PROMPT, beam_width=20, batch_size=1,
                       ranker="align3gr_cf", sasrec=sasrec, cf_weight=weight, cf_candidates=20, **kwargs)


@pytest.mark.parametrize("weight", [0.0, 1.5, math.inf])
def test_a_request_gets_the_evaluation_rows_list(world, sasrec, weight):
    sft_params = {"max_history": PROMPT.max_history, "eval_template_id": PROMPT.template_id, "inject_user_scid": True}
    seq = build_seq_eval_prompts(world.valid, world.test, world.item_scids, world.user_scids, sft_params)
    params = {"splits": ["test"], "max_history": 20, "template_id": PROMPT.template_id}
    cases = eval_cases(world.valid, world.test, ["test"], 20, None, 0)
    prompts = build_eval_prompts(cases, seq, world.item_scids, world.user_scids, params)
    lm_recs, _ = recommend_with_lm(world.policy, prompts, world.item_scids, {"top_k": 20, "beam_width": 20, "batch_size": 1},
                                   stage="sft_model")
    recs, info = hybrid_recommendations(world.policy, sasrec, prompts, cases, lm_recs, world.item_scids, weights=[weight],
                                        cf_candidates=20, top_k=10, select_k=10, batch_size=1)
    rec = hybrid(world, sasrec, weight)
    histories = dict(zip(world.test["user_id"], world.test["history"]))
    for user, part in recs.groupby("user_id"):
        mine = rec.recommend(list(histories[user]), user_id=user, k=10)
        assert [r["item_id"] for r in mine] == part.sort_values("rank")["item_id"].tolist()
        assert [r["score"] for r in mine] == pytest.approx(part.sort_values("rank")["score"].tolist(), abs=1e-5)
    # The hybrid's lists are not the LM's own, except at w = 0, where the beam's items keep the beam's order.
    lm_only = Recommender(world.policy, world.item_scids, None, world.user_scids, PROMPT, beam_width=20, batch_size=1)
    pairs = [([r["item_id"] for r in rec.recommend(list(h), user_id=u, k=10)],
              [r["item_id"] for r in lm_only.recommend(list(h), user_id=u, k=20)]) for u, h in histories.items()]
    if weight == 0.0:
        assert all([i for i in mine if i in beam] == [i for i in beam if i in mine] for mine, beam in pairs)
    else:
        assert any(mine != beam[:10] for mine, beam in pairs)


def test_ranker_lm_is_todays_recommender_and_the_hybrid_needs_sasrec(world, sasrec):
    lm = Recommender(world.policy, world.item_scids, None, world.user_scids, PROMPT)
    assert lm.ranker == "lm" and lm.sasrec is None and lm.label == "lm"
    assert set(lm.settings()) == {"prompt", "beam_width", "batch_size", "unknown_user", "stage", "limits"}
    assert hybrid(world, sasrec, 2.0, stage="sft").label == "sft+align3gr_cf"
    with pytest.raises(ValueError, match="ranker 'align3gr_cf' needs the SASRec model"):
        Recommender(world.policy, world.item_scids, None, world.user_scids, PROMPT, ranker="align3gr_cf")
    with pytest.raises(ValueError, match="ranker must be one of"):
        Recommender(world.policy, world.item_scids, None, world.user_scids, PROMPT, ranker="cf")
    with pytest.raises(ValueError, match="cf_weight must be a number >= 0"):
        hybrid(world, sasrec, -1.0)
    params = {"models_dir": "nowhere", "beam_width": 20, "batch_size": 4, "ranker": "align3gr_cf", "cf_weight": 1.0}
    with pytest.raises(ValueError, match="inference.ranker is 'align3gr_cf' but there is no sasrec_model checkpoint"):
        build_recommender(world.item_scids, None, world.user_scids, {"max_history": 5}, params, sasrec=None)


def test_settings_round_trip_an_infinite_weight(world, sasrec, tmp_path: Path):
    write_settings(hybrid(world, sasrec, math.inf), tmp_path / "s.json")
    back = read_settings(tmp_path / "s.json")
    assert back["ranker"] == "align3gr_cf" and back["cf_weight"] == math.inf and back["cf_candidates"] == 20
    write_settings(Recommender(world.policy, world.item_scids, None, world.user_scids, PROMPT), tmp_path / "lm.json")
    assert read_settings(tmp_path / "lm.json")["ranker"] == "lm"


def test_the_served_model_carries_sasrec_and_answers_the_python_apis_list(world, sasrec, tmp_path: Path):
    save_checkpoints(world, tmp_path / "06_models", {"sft_model": 1})
    rec = Recommender.from_checkpoint(tmp_path / "06_models" / "sft_model", world.item_scids, items_table(world), world.user_scids,
                                      PROMPT, device="cpu", stage="sft", ranker="align3gr_cf", sasrec=sasrec, cf_weight=1.5,
                                      cf_candidates=20)
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)  # earlier tests' experiment is another store's
        for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        threads = torch.get_num_threads()
        try:
            mlflow.set_experiment("hybrid-serving")
            uri = log_recommender(rec)
            served = mlflow.pyfunc.load_model(uri)
            artifacts = mlflow.artifacts.download_artifacts(f"{uri}/artifacts")
        finally:
            mlflow.set_tracking_uri(before)
            torch.set_num_threads(threads)
    assert (Path(artifacts) / "sasrec" / "sasrec_config.json").is_file()
    inner = served.unwrap_python_model().recommender
    assert inner.ranker == "align3gr_cf" and inner.cf_weight == 1.5 and inner.sasrec is not None
    requests = [{"history": ["it1", "it2", "it3"], "user_id": "u1", "k": 5}, {"history": ["it7"], "k": 8}]
    answers = [[i.model_dump() for i in a.items] for a in served.predict(requests)]
    for got, want in zip(answers, [rec.recommend(**r) for r in requests]):
        # The same items in the same order; scores to float32 rounding (the served model sets its own thread count).
        assert [{**i, "score": 0} for i in got] == [{**i, "score": 0} for i in want]
        assert [i["score"] for i in got] == pytest.approx([i["score"] for i in want], abs=1e-5)
    lm_only = Recommender(rec.rec_lm, world.item_scids, None, world.user_scids, PROMPT, batch_size=rec.batch_size)
    assert [r["item_id"] for r in rec.recommend(**requests[1])] != [r["item_id"] for r in lm_only.recommend(**requests[1])]
