"""The evaluation pipeline through a DataCatalog + SequentialRunner, with and without DPO checkpoints:
checkpoints load through the real CheckpointDataset (optional: a stage never run loads as None). The stage
also trains the BCE SASRec (`sasrec_bce`) and reuses the rows of a DPO stage that kept its input policy."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure

from align3gr_pipelines.cf.sasrec import SASRec, fit_sasrec, training_sequences
from align3gr_pipelines.datasets import CheckpointDataset
from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, constrained_beam_search
from align3gr_pipelines.lm.rec_lm import encode_prompt
from align3gr_pipelines.pipelines.evaluation import create_pipeline
from align3gr_pipelines.pipelines.evaluation.nodes import LM_STAGES, compute_metrics

from .conftest import make_rec_lm

PARAMS = {
    "splits": ["test", "valid"], "max_users": None, "max_history": 20, "template_id": 0, "ks": [5, 10],
    "top_k": 20, "beam_width": 20, "batch_size": 16, "show_progress": False,
    "baselines": {"most_popular": True, "sasrec": True, "item_knn": {"enabled": True, "neighbors": 20, "shrink": 1.0}},
    "sasrec_bce": {"epochs": 3, "lr": None},
    "bootstrap": {"n_resamples": 200, "confidence": 0.95}, "paired_test": {"n_permutations": 500},
}
TOKENIZATION = {"device": "cpu", "num_threads": None, "collaborative_encoder": {
    "hidden_dim": 16, "n_layers": 1, "n_heads": 1, "max_len": 20, "dropout": 0.0, "epochs": 2, "batch_size": 64, "lr": 1e-2}}
# What a DPO stage records in meta["dpo"]: sp_dpo_easy moved away from its input (decoded); sp_dpo_hard's
# selection kept its input policy (fingerprints equal), which is sp_dpo_easy's since medium is a pass-through.
DPO_META = {
    "sp_dpo_model_easy": {"dpo": {"stage": "sp_dpo_easy", "reference_fingerprint": "f-sft", "policy_fingerprint": "f-easy",
                                  "selected_step": 4}},
    "sp_dpo_model_medium": {"skipped": True},
    "sp_dpo_model_hard": {"dpo": {"stage": "sp_dpo_hard", "reference_fingerprint": "f-easy", "policy_fingerprint": "f-easy",
                                  "selected_step": 0}},
}
class KeptDataset(MemoryDataset):
    """An output the runner must not release after its last consumer, so the test can read it."""

    def _release(self) -> None:
        pass


BASELINES = ("most_popular", "item_knn", "sasrec", "sasrec_bce")
OUTPUTS = ["recommendations", "evaluation_metrics", "evaluation_metrics_md", "evaluation_metrics_json", "evaluation_comparison_plot",
           "evaluation_stage_report", "sasrec_bce_model"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tiny_data):
    """Every LM stage and SASRec saved once; each test picks which ones its catalog can see."""
    root = tmp_path_factory.mktemp("ckpt")
    tok = tiny_data["tokenizer"]
    for k, (dataset, label) in enumerate(LM_STAGES.items()):
        meta = DPO_META.get(dataset, {})
        CheckpointDataset(str(root / dataset), "align3gr_pipelines.lm.rec_lm.RecLM").save(make_rec_lm(tok, 10 + k, label, **meta))
    sasrec = SASRec(tiny_data["items"]["item_id"].tolist(), hidden_dim=16, n_layers=1, max_len=20, dropout=0.0)
    fit_sasrec(sasrec, list(training_sequences(tiny_data["train_sequences"]).values()), epochs=2, batch_size=64, lr=1e-2, seed=0)
    CheckpointDataset(str(root / "sasrec"), "align3gr_pipelines.cf.sasrec.SASRec").save(sasrec)
    return root


def run(tiny_data, root, present: set[str], tmp_path, params=PARAMS):
    datasets = {name: MemoryDataset(tiny_data[name]) for name in
                ["items", "train_sequences", "valid", "test", "item_scids", "user_scids", "seq_eval_prompts"]}
    for dataset in LM_STAGES:
        path = root / dataset if dataset in present else tmp_path / f"never_run_{dataset}"
        datasets[dataset] = CheckpointDataset(str(path), "align3gr_pipelines.lm.rec_lm.RecLM", load_args={"device": "cpu"}, optional=True)
    datasets["sasrec_model"] = CheckpointDataset(str(root / "sasrec"), "align3gr_pipelines.cf.sasrec.SASRec", optional=True)
    # report_preference_stages reads the held-out targets' feedback levels (issue 15)
    held = [tiny_data[s].assign(split=s, level="liked") for s in ("valid", "test")]
    datasets["feedback"] = MemoryDataset(pd.concat(held).rename(columns={"target": "item_id"})[["user_id", "item_id", "split", "level"]])
    datasets["params:evaluation"] = MemoryDataset(params)
    datasets["params:tokenization"] = MemoryDataset(TOKENIZATION)
    datasets["params:seed"] = MemoryDataset(7)
    for name in OUTPUTS:
        datasets[name] = KeptDataset(copy_mode="assign")
    catalog = DataCatalog(datasets=datasets)
    SequentialRunner().run(create_pipeline(), catalog)
    return {name: catalog.load(name) for name in OUTPUTS}


def check_common(out, tiny_data, models: list[str]):
    recs, metrics = out["recommendations"], out["evaluation_metrics"]
    assert list(recs.columns) == ["model", "split", "user_id", "case", "rank", "item_id", "score"]
    assert list(metrics.columns) == ["model", "split", "metric", "value", "ci_low", "ci_high", "p_value_vs_sasrec", "n_users"]
    assert list(dict.fromkeys(metrics["model"])) == models
    assert len(metrics) == len(models) * 2 * 4
    assert (metrics["n_users"] == 40).all()
    assert ((metrics["ci_low"] <= metrics["value"] + 1e-12) & (metrics["value"] <= metrics["ci_high"] + 1e-12)).all()
    ref = metrics["model"] == "sasrec"
    assert metrics.loc[ref, "p_value_vs_sasrec"].isna().all()
    assert metrics.loc[~ref, "p_value_vs_sasrec"].between(0, 1).all()
    catalogue = set(tiny_data["item_scids"]["id"])
    assert recs["item_id"].isin(catalogue).all(), "0 invalid generations"
    per_list = recs.groupby(["model", "split", "user_id"])
    assert (per_list.size() == 20).all() and len(per_list) == len(models) * 80
    assert (per_list["rank"].apply(lambda r: sorted(r) == list(range(1, 21)))).all()
    assert per_list["item_id"].nunique().eq(20).all()
    assert "## test (40 users)" in out["evaluation_metrics_md"]
    scalars = out["evaluation_metrics_json"]["scalars"]
    assert len([k for k in scalars if not k.startswith("time/")]) == len(metrics) and not any("@" in k for k in scalars)
    assert scalars["time/sasrec_bce/train_seconds"] > 0 and "time/sft/ms_per_user" in scalars
    assert isinstance(out["evaluation_comparison_plot"], Figure)
    # a metric recomputed by hand from the recommendations table (LM scores have no ties)
    sft = recs[(recs["model"] == "sft") & (recs["split"] == "test") & (recs["rank"] <= 10)]
    hits = tiny_data["test"].apply(lambda r: r["target"] in set(sft.loc[sft["user_id"] == r["user_id"], "item_id"]), axis=1)
    got = metrics.query("model == 'sft' and split == 'test' and metric == 'recall@10'")["value"].item()
    assert got == pytest.approx(hits.mean())
    # the per-stage report's Recall@10 is the evaluation table's, stage by stage and split by split
    assert [m for m in out["evaluation_stage_report"]["test"]] == [m for m in models if m not in BASELINES]
    for split, stages in out["evaluation_stage_report"].items():
        for model, row in stages.items():
            table = metrics.query("model == @model and split == @split and metric == 'recall@10'")["value"].item()
            assert row["recall@10"] == pytest.approx(table), (split, model)


def test_pipeline_without_dpo_stages(tiny_data, checkpoints, tmp_path):
    out = run(tiny_data, checkpoints, {"sft_model"}, tmp_path)
    check_common(out, tiny_data, ["most_popular", "item_knn", "sasrec", "sasrec_bce", "sft"])
    # sasrec_bce: SASRec with the collaborative encoder's architecture, trained here with the BCE loss
    bce = out["sasrec_bce_model"]
    assert bce.config == {"hidden_dim": 16, "n_layers": 1, "n_heads": 1, "max_len": 20, "dropout": 0.0}
    info = {m["model"]: m for m in out["evaluation_metrics_json"]["info"]["models"]}
    assert info["sasrec_bce"]["loss"] == "bce" and info["sasrec"]["loss"] == "ce"
    assert info["sasrec_bce"]["train_settings"]["epochs"] == 3  # evaluation.sasrec_bce overrides; nulls inherit
    assert info["sasrec_bce"]["train_seconds"] > 0 and info["sft"]["decoded"] is True
    md = out["evaluation_metrics_md"]
    assert "## Time per model" in md and "| sasrec_bce |" in md and "fitted here in" in md
    assert md.count("ms / user") == 1  # one timing table
    skipped = {s["model"] for s in out["evaluation_metrics_json"]["info"]["skipped"]}
    # align3gr_cf is off in PARAMS (no `align3gr_cf` block): skipped with the reason
    assert skipped == {"align3gr_cf", "sp_dpo_easy", "sp_dpo_medium", "sp_dpo_hard", "rf_dpo_easy", "rf_dpo_hard"}
    # the LM's recommendations are its constrained beam search on the seq_eval_prompts
    from align3gr_pipelines.lm.rec_lm import RecLM

    lm = RecLM.from_pretrained(str(checkpoints / "sft_model"), device="cpu")
    prompts = tiny_data["seq_eval_prompts"].query("split == 'test'").head(3)
    catalog = SCIDCatalog.from_scids(tiny_data["item_scids"], lm.tokenizer)
    idx, _ = constrained_beam_search(lm.model, [encode_prompt(lm.tokenizer, p) for p in prompts["prompt"]], catalog, 20, 20)
    recs = out["recommendations"].query("model == 'sft' and split == 'test'")
    for u, row in zip(prompts["user_id"], idx):
        assert recs[recs["user_id"] == u].sort_values("rank")["item_id"].tolist() == [catalog.item_ids[i] for i in row]


def test_pipeline_with_dpo_stages(tiny_data, checkpoints, tmp_path):
    out = run(tiny_data, checkpoints, set(LM_STAGES), tmp_path)
    # sp_dpo_medium is marked skipped (an ablation passed it through unchanged): left out of the table
    check_common(out, tiny_data, ["most_popular", "item_knn", "sasrec", "sasrec_bce", "sft", "sp_dpo_easy", "sp_dpo_hard",
                                  "rf_dpo_easy", "rf_dpo_hard"])
    assert [s["model"] for s in out["evaluation_metrics_json"]["info"]["skipped"]] == ["align3gr_cf", "sp_dpo_medium"]
    # sp_dpo_hard kept its input policy: sp_dpo_easy's rows under its own name (its own weights differ here,
    # so identical rows show it was not decoded), and the run info and Markdown say so
    recs = out["recommendations"]
    rows = {m: recs[recs["model"] == m].drop(columns="model").reset_index(drop=True) for m in ("sp_dpo_easy", "sp_dpo_hard")}
    pd.testing.assert_frame_equal(rows["sp_dpo_hard"], rows["sp_dpo_easy"])
    info = {m["model"]: m for m in out["evaluation_metrics_json"]["info"]["models"]}
    assert info["sp_dpo_hard"]["reused_from"] == "sp_dpo_easy" and info["sp_dpo_hard"]["decoded"] is False
    assert info["sp_dpo_easy"]["decoded"] is True and info["rf_dpo_easy"]["decoded"] is True
    assert "| sp_dpo_hard | – | – | reused from sp_dpo_easy: selection kept the input policy |" in out["evaluation_metrics_md"]
    assert out["evaluation_stage_report"]["test"]["sp_dpo_hard"]["changed_share"] == 0.0


def test_align3gr_cf_row_at_w_inf_is_sasrecs_list_and_a_grid_chooses_on_valid(tiny_data, checkpoints, tmp_path):
    hybrid = {"enabled": True, "weights": [float("inf")], "cf_candidates": 20, "select_k": 10, "batch_size": 8}
    out = run(tiny_data, checkpoints, {"sft_model"}, tmp_path, params={**PARAMS, "align3gr_cf": hybrid})
    recs = out["recommendations"]
    lists = {m: recs[recs["model"] == m].sort_values(["split", "user_id", "rank"])[["split", "user_id", "rank", "item_id"]]
             .reset_index(drop=True) for m in ("sasrec", "align3gr_cf")}
    pd.testing.assert_frame_equal(lists["align3gr_cf"], lists["sasrec"])  # w = inf: SASRec's order
    info = {m["model"]: m for m in out["evaluation_metrics_json"]["info"]["models"]}
    assert info["align3gr_cf"]["cf_weight"] == "inf" and info["align3gr_cf"]["lm"] == "sft"
    grid = {**hybrid, "weights": [0.0, 1.0, float("inf")]}
    out = run(tiny_data, checkpoints, {"sft_model"}, tmp_path, params={**PARAMS, "align3gr_cf": grid})
    info = {m["model"]: m for m in out["evaluation_metrics_json"]["info"]["models"]}["align3gr_cf"]
    scores = info["selection"]["valid_recall"]  # per weight: Recall@10 on the select and the confirm half
    assert len(scores) == 3 and info["cf_weight"] == info["selection"]["chosen_w"]
    assert scores[info["cf_weight"]]["select"] == max(v["select"] for v in scores.values())
    assert "align3gr_cf" in set(out["evaluation_metrics"]["model"])


def test_metrics_are_deterministic_and_skip_the_paired_test_without_sasrec(tiny_data):
    cases = pd.DataFrame({"split": "test", "user_id": ["u1", "u2", "u3"], "history": [[], [], []], "target": ["a", "b", "c"]})
    recs = pd.DataFrame({"model": "m", "split": "test", "user_id": ["u1", "u2", "u1"], "rank": [1, 1, 2],
                         "item_id": ["a", "x", "c"], "score": [0.0, 0.0, -1.0]})
    info = {"models": [{"model": "m"}], "skipped": [{"model": "sasrec", "skipped": "no checkpoint"}]}
    params = {**PARAMS, "ks": [1, 2]}
    a = compute_metrics(recs, cases, info, params, seed=3)
    b = compute_metrics(recs, cases, info, params, seed=3)
    pd.testing.assert_frame_equal(a[0], b[0])
    table = a[0].set_index("metric")
    # u1 hits at rank 1, u2 misses, u3 has no list at all (counted as a miss)
    assert table.loc["recall@1", "value"] == pytest.approx(1 / 3)
    assert np.isnan(table["p_value_vs_sasrec"]).all()
    assert "sasrec: no checkpoint" in a[1]


def test_eval_cases_truncate_history_and_sample_users_per_split(tiny_data):
    from align3gr_pipelines.pipelines.evaluation.nodes import build_eval_cases, build_eval_prompts

    params = {**PARAMS, "max_history": 3, "max_users": {"test": None, "valid": 10}}
    cases = build_eval_cases(tiny_data["valid"], tiny_data["test"], params, seed=5)
    assert (cases["split"] == "test").sum() == 40 and (cases["split"] == "valid").sum() == 10
    assert cases["history"].map(len).max() <= 3
    test = tiny_data["test"].set_index("user_id")
    for r in cases[cases["split"] == "test"].itertuples():
        assert r.history == [str(i) for i in test.loc[r.user_id, "history"][-3:]]
    again = build_eval_cases(tiny_data["valid"], tiny_data["test"], params, seed=5)
    pd.testing.assert_frame_equal(cases, again)
    with pytest.raises(ValueError, match="splits"):
        build_eval_cases(tiny_data["valid"], tiny_data["test"], {**params, "splits": ["train"]}, seed=5)
    # the test split is never sampled: any limit on it is refused, by name
    for limits in ({"test": 10, "valid": None}, 10):
        with pytest.raises(ValueError, match=r"evaluation\.max_users\.test must be null"):
            build_eval_cases(tiny_data["valid"], tiny_data["test"], {**params, "max_users": limits}, seed=5)
    valid_only = build_eval_cases(tiny_data["valid"], tiny_data["test"], {**params, "splits": ["valid"], "max_users": 10}, seed=5)
    assert len(valid_only) == 10 and (valid_only["split"] == "valid").all()
    # prompts: taken from seq_eval_prompts; a missing one is rebuilt with prompts.seq_prompt; stale ones fail
    prompts = tiny_data["seq_eval_prompts"]
    full = build_eval_prompts(cases, prompts, tiny_data["item_scids"], tiny_data["user_scids"], params)
    assert full["prompt"].notna().all() and len(full) == len(cases)
    first = cases.iloc[0]
    dropped = prompts[~((prompts["split"] == first["split"]) & (prompts["user_id"] == first["user_id"]))]
    rebuilt = build_eval_prompts(cases, dropped, tiny_data["item_scids"], tiny_data["user_scids"], params)
    assert rebuilt["prompt"].iloc[0].startswith("User <u") and rebuilt["prompt"].iloc[0].count("<i0_") == len(first["history"])
    stale = prompts.assign(target=prompts["target"].where(prompts.index != prompts.index[-1], "no-such-item"))
    stale_cases = build_eval_cases(tiny_data["valid"], tiny_data["test"], {**PARAMS, "max_users": None}, seed=5)
    with pytest.raises(ValueError, match="stale"):
        build_eval_prompts(stale_cases, stale, tiny_data["item_scids"], tiny_data["user_scids"], params)


def _tied_list(model: str, target_rank: int, tied: range) -> pd.DataFrame:
    """One user's top-20 list of items r1..r20 (score 100 - rank), the ranks in `tied` sharing one score,
    and the target placed at `target_rank`."""
    ranks = np.arange(1, 21)
    scores = (100.0 - ranks).astype(float)
    scores[np.isin(ranks, list(tied))] = 50.0
    items = [f"r{r}" for r in ranks]
    items[target_rank - 1] = "t"
    return pd.DataFrame({"model": model, "split": "test", "user_id": "u1", "rank": ranks, "item_id": items, "score": scores})


def test_a_tie_group_straddling_the_largest_k_is_credited_over_the_whole_kept_list():
    """ks [5, 10], top_k 20; items at ranks 9-12 share one score. By the tie rule the target anywhere in
    that group earns recall@10 = 2/4 (positions 9 and 10 of 4) and NDCG@10 = (1/log2 10 + 1/log2 11) / 4,
    whether the arbitrary tie-break put it at rank 9 or at rank 12. A list cut at rank 10 before the tie
    rule gave 1.0 and 0.0 instead."""
    recs = pd.concat([
        _tied_list("tie_first", 9, range(9, 13)),
        _tied_list("tie_last", 12, range(9, 13)),
        _tied_list("no_tie", 12, range(0)),
        _tied_list("end_tie", 20, range(19, 21)),  # a group past max(ks) that holds the last kept rank
        _tied_list("long_tie", 9, range(9, 21)),  # from rank 9 to the list's end: may go on, reported
    ], ignore_index=True)
    cases = pd.DataFrame({"split": "test", "user_id": ["u1"], "history": [[]], "target": ["t"]})
    info = {"models": [{"model": m} for m in ["tie_first", "tie_last", "no_tie", "end_tie", "long_tie"]], "skipped": []}
    table, md, js = compute_metrics(recs, cases, info, PARAMS, seed=0)
    value = table.set_index(["model", "metric"])["value"]
    group_ndcg10 = (1 / np.log2(10) + 1 / np.log2(11)) / 4
    for model in ["tie_first", "tie_last"]:
        assert value[model, "recall@10"] == pytest.approx(0.5)
        assert value[model, "ndcg@10"] == pytest.approx(group_ndcg10)
        assert value[model, "recall@5"] == 0.0 and value[model, "ndcg@5"] == 0.0
    assert value["no_tie", "recall@10"] == 0.0 and value["no_tie", "ndcg@10"] == 0.0
    assert value["end_tie", "recall@10"] == 0.0
    assert value["long_tie", "recall@10"] == pytest.approx(2 / 12)
    assert value["long_tie", "ndcg@10"] == pytest.approx((1 / np.log2(10) + 1 / np.log2(11)) / 12)
    assert js["info"]["ties_at_list_end"] == {"test/long_tie": 1}
    assert "- test/long_tie: 1" in md
    with pytest.raises(ValueError, match="top_k"):
        compute_metrics(recs, cases, info, {**PARAMS, "ks": [5, 30]}, seed=0)
