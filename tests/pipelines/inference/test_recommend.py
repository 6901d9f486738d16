"""The Python API (`recommend.Recommender`): valid constrained top-K, the evaluation stage's prompts and
lists for the same history, request checks, checkpoint resolution, atomic output."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from align3gr_pipelines.datasets.atomic_parquet import AtomicParquetDataset
from align3gr_pipelines.pipelines.evaluation.nodes import recommend_with_lm
from align3gr_pipelines.serving.recommend import (
    COMPLETE_MARKER,
    PromptSettings,
    Recommender,
    Request,
    RequestError,
    resolve_checkpoint,
)
from align3gr_pipelines.sft.tasks import build_seq_eval_prompts
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_world

from .tiny_project import items_table

PROMPT = PromptSettings(max_history=5, template_id=1, inject_user_scid=True)


@pytest.fixture(scope="module")
def world():
    return make_world()


@pytest.fixture(scope="module")
def rec(world) -> Recommender:
    return Recommender(world.policy, world.item_scids, items_table(world), world.user_scids, PROMPT, beam_width=20, batch_size=8)


def test_top_k_is_distinct_valid_catalogue_items_best_first(rec, world):
    out = rec.recommend(["it1", "it2", "it3"], user_id="u2", k=7)
    assert [r["rank"] for r in out] == list(range(1, 8))
    ids = [r["item_id"] for r in out]
    assert len(set(ids)) == 7 and set(ids) <= set(world.item_scids["id"])
    assert all(r["title"] == f"Title of {r['item_id']}" for r in out)
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    assert rec.recommend(["it1", "it2", "it3"], user_id="u2", k=7) == out  # deterministic
    # The prompt, and so the list, depends on the history and on the user's SCID.
    assert [r["item_id"] for r in rec.recommend(["it4", "it9"], user_id="u2", k=7)] != ids
    other = next(u for u, t in rec.user_tokens.items() if t != rec.user_tokens["u2"])
    assert [r["item_id"] for r in rec.recommend(["it1", "it2", "it3"], user_id=other, k=7)] != ids


def test_prompts_and_lists_equal_the_evaluation_stage(rec, world):
    """For an evaluation user's history, the request's prompt is the one sft_data wrote to seq_eval_prompts
    (same cut, phrasing, user SCID) and its list is the one the evaluation stage decodes from it."""
    sft_params = {"max_history": PROMPT.max_history, "eval_template_id": PROMPT.template_id, "inject_user_scid": True}
    prompts = build_seq_eval_prompts(world.valid, world.test, world.item_scids, world.user_scids, sft_params)
    test_prompts = prompts[prompts["split"] == "test"].reset_index(drop=True)
    assert PromptSettings.from_sft_data(sft_params) == PROMPT
    histories = dict(zip(world.test["user_id"], world.test["history"]))
    assert max(len(h) for h in histories.values()) > PROMPT.max_history  # the cut is exercised
    for row in test_prompts.itertuples():
        assert rec.prompt_for(Request(history=list(histories[row.user_id]), k=10, user_id=row.user_id)) == row.prompt
    # batch_size 1: each prompt is decoded alone, as a single request is
    eval_params = {"top_k": 10, "beam_width": 20, "batch_size": 1, "show_progress": False}
    recs, info = recommend_with_lm(world.policy, test_prompts, world.item_scids, eval_params, stage="sft_model")
    assert info["invalid_generations"] == 0
    for user, part in recs.groupby("user_id"):
        mine = rec.recommend(list(histories[user]), user_id=user, k=10)
        assert [r["item_id"] for r in mine] == part.sort_values("rank")["item_id"].tolist()
        assert [r["score"] for r in mine] == pytest.approx(part.sort_values("rank")["score"].tolist(), abs=1e-5)


def _ids(lst):
    return [r["item_id"] for r in lst]


def test_a_list_does_not_depend_on_the_other_requests(world):
    """k above the beam width widens the beam, for that request only. Scores may differ in the last float
    bits between a batch and a lone prompt (left padding), never the items."""
    narrow = Recommender(world.policy, world.item_scids, None, world.user_scids, PROMPT, beam_width=1)  # greedy
    histories = [[f"it{i}", f"it{i + 7}"] for i in range(0, 30, 3)]
    alone = [narrow.recommend(h, user_id="u1", k=1) for h in histories]
    exhaustive = [narrow.recommend(h, user_id="u1", k=narrow.n_items)[:1] for h in histories]
    assert any(_ids(a) != _ids(e) for a, e in zip(alone, exhaustive))  # the width matters for these prompts
    mixed = narrow.recommend_many([{"history": h, "user_id": "u1", "k": 1} for h in histories]
                                  + [{"history": ["it0"], "user_id": "u4", "k": narrow.n_items}])
    assert [_ids(m) for m in mixed[:-1]] == [_ids(a) for a in alone]
    for m, a in zip(mixed, alone):
        assert [r["score"] for r in m] == pytest.approx([r["score"] for r in a], abs=1e-5)
    assert len(mixed[-1]) == narrow.n_items


def test_k_equal_to_the_catalogue_ranks_every_item_once(rec, world):
    out = rec.recommend(["it0"], k=rec.n_items)
    assert sorted(r["item_id"] for r in out) == sorted(world.item_scids["id"])
    scores = [r["score"] for r in out]
    assert scores == sorted(scores, reverse=True)


def test_unknown_user(rec, world):
    anonymous = rec.recommend(["it1", "it2"], user_id=None, k=5)
    assert rec.recommend(["it1", "it2"], user_id="not-a-user", k=5) == anonymous
    assert rec.recommend(["it1", "it2"], user_id="u1", k=5) != anonymous
    strict = Recommender(world.policy, world.item_scids, None, world.user_scids, PROMPT, unknown_user="error")
    with pytest.raises(RequestError, match="unknown user_id 'not-a-user'"):
        strict.recommend(["it1"], user_id="not-a-user", k=5)
    assert strict.recommend(["it1"], k=2)[0]["title"] == ""  # no items table: no titles


BAD = [
    ({"history": ["it1", "nope", "it2", "gone"], "k": 3}, r"request 1: unknown item id\(s\) \['nope', 'gone'\]"),
    ({"history": [], "k": 3}, r"request 1: 'history' is empty"),
    ({"history": ["it1"], "k": 41}, r"request 1: 'k' = 41 is outside 1..40 \(the catalogue holds 40 items\)"),
    ({"history": ["it1"], "k": 0}, r"'k' = 0 is outside 1..40"),
    ({"history": ["it1"], "k": "5"}, r"request 1: 'k' must be an integer >= 1, got '5'"),
    ({"history": ["it1"], "k": 2.5}, r"'k' must be an integer"),
    ({"history": ["it1"]}, r"'k' must be an integer >= 1, got None"),
    ({"history": "it1", "k": 3}, r"request 1: 'history' must be a list of item ids, got 'it1'"),
    ({"k": 3}, r"'history' must be a list of item ids, got None"),
    ({"history": [["it1"]], "k": 3}, r"request 1.history\[0\]: item ids must be non-empty strings or integers"),
    ({"history": ["it1"], "k": 3, "user": "u1"}, r"request 1: unknown field\(s\) \['user'\]"),
    ({"history": ["it1"], "k": 3, "user_id": 1.5}, r"'user_id' must be a string, an integer or null"),
    (["it1"], r"request 1: expected an object with 'history'"),
]


@pytest.mark.parametrize("bad, message", BAD, ids=[m.split(":")[-1][:30] for _, m in BAD])
def test_bad_requests_name_the_problem(rec, bad, message):
    with pytest.raises(RequestError, match=message):
        rec.recommend_many([{"history": ["it1"], "k": 2}, bad])


def test_integer_item_ids_are_catalogue_ids(world):
    scids = world.item_scids.assign(id=[str(100 + i) for i in range(len(world.item_scids))])
    rec = Recommender(world.policy, scids, None, None, PROMPT)
    assert rec.recommend([100, 101], k=3) == rec.recommend(["100", "101"], k=3)


def _mark(path):
    path.mkdir(parents=True)
    (path / COMPLETE_MARKER).write_text(json.dumps({}))


def test_resolve_checkpoint(tmp_path):
    models = tmp_path / "06_models"
    with pytest.raises(FileNotFoundError, match="no complete LM checkpoint in .*run sft_train first"):
        resolve_checkpoint(models)
    _mark(models / "sft_model")
    assert resolve_checkpoint(models) == ("sft", models / "sft_model")
    _mark(models / "sp_dpo_easy")
    (models / "rf_dpo_hard").mkdir()  # an interrupted save: no completion marker
    assert resolve_checkpoint(models) == ("sp_dpo_easy", models / "sp_dpo_easy")
    assert resolve_checkpoint(models, "sft") == ("sft", models / "sft_model")
    assert resolve_checkpoint(models, "sft_model") == ("sft", models / "sft_model")
    assert resolve_checkpoint(models, str(models / "sp_dpo_easy")) == ("sp_dpo_easy", models / "sp_dpo_easy")
    with pytest.raises(FileNotFoundError, match="checkpoint 'rf_dpo_hard': no complete checkpoint"):
        resolve_checkpoint(models, "rf_dpo_hard")


def test_atomic_parquet_keeps_the_previous_file_on_a_failed_save(tmp_path):
    ds = AtomicParquetDataset(filepath=str(tmp_path / "out" / "recs.parquet"))
    good = pd.DataFrame({"a": [1, 2]})
    ds.save(good)
    before = (tmp_path / "out" / "recs.parquet").read_bytes()
    with pytest.raises(Exception):
        ds.save(pd.DataFrame({"a": [object()]}))  # pyarrow cannot write it: fails after opening the file
    assert (tmp_path / "out" / "recs.parquet").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["recs.parquet"]
    pd.testing.assert_frame_equal(ds.load(), good)
