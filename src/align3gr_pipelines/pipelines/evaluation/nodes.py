"""Nodes of the `evaluation` stage: thin orchestration over modules in align3gr_pipelines.

Every recommender (baselines and each LM checkpoint present) ranks the whole item catalogue (the
`item_scids` table) for every user of the evaluated splits (leave-one-out: one held-out target per user).
Its top-K goes to `recommendations` (rank is 1-based); `evaluation_metrics` holds Recall/NDCG@K (HR@1) and
MRR@K with bootstrap CIs and a paired test against SASRec; `evaluation_feedback_exposure` the liked / disliked
hits and disliked exposure where the held-out targets are rated. The test split is always scored in full. A preference stage
whose selection kept its input policy is not decoded again (`evaluation.stage_reuse`).
"""
from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import update_wrapper
from typing import Any

import numpy as np
import pandas as pd
import torch

from align3gr_pipelines.cf.baselines import ItemKNN, MostPopular, SASRecScorer, recommend, top_k
from align3gr_pipelines.cf.sasrec import training_sequences
from align3gr_pipelines.evaluation.cases import as_recommendations, empty_recs, eval_cases, recs_frame
from align3gr_pipelines.evaluation.feedback_exposure import (
    exposure_markdown,
    exposure_scalars,
    exposure_settings,
    feedback_exposure,
)
from align3gr_pipelines.evaluation.report import (  # noqa: F401 (plot_comparison is a node)
    check_cutoffs,
    metric_table,
    metrics_markdown,
    plot_comparison,
)
from align3gr_pipelines.evaluation.hybrid_ranker import MODEL as HYBRID
from align3gr_pipelines.evaluation.hybrid_ranker import hybrid_recommendations
from align3gr_pipelines.evaluation.sasrec_bce import bce_settings, train_sasrec_bce
from align3gr_pipelines.evaluation.stage_reuse import kept_input_policy, reuse_input_rows
from align3gr_pipelines.evaluation.timing import insert_section, timing_markdown, timing_scalars
from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, constrained_beam_search
from align3gr_pipelines.lm.rec_lm import encode_prompt
from align3gr_pipelines.lm.sharded_decoding import decode_prompts_sharded
from align3gr_pipelines.sft.prompts import seq_prompt

log = logging.getLogger(__name__)

REFERENCE = "sasrec"
# LM checkpoints in DAG order, and the row each becomes in the table.
LM_STAGES: dict[str, str] = {
    "sft_model": "sft",
    "sp_dpo_model_easy": "sp_dpo_easy",
    "sp_dpo_model_medium": "sp_dpo_medium",
    "sp_dpo_model_hard": "sp_dpo_hard",
    "rf_dpo_model_easy": "rf_dpo_easy",
    "rf_dpo_model_hard": "rf_dpo_hard",
}
BASELINES = ("most_popular", "item_knn", "sasrec", "sasrec_bce")


def _require(df: pd.DataFrame, name: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"evaluation: dataset {name!r} lacks column(s) {missing}; expected at least {columns}")


def catalogue_ids(item_scids: pd.DataFrame) -> list[str]:
    _require(item_scids, "item_scids", ["id", "codes", "tokens"])
    ids = [str(i) for i in item_scids["id"]]
    if len(set(ids)) != len(ids):
        raise ValueError("evaluation: item_scids has duplicate ids")
    return ids


# ---- inputs ----


def build_eval_cases(valid: pd.DataFrame, test: pd.DataFrame, params: dict[str, Any], seed: int) -> pd.DataFrame:
    """Every held-out case of the evaluated splits (`evaluation.cases.eval_cases`)."""
    for name, df in (("valid", valid), ("test", test)):
        if name in params.get("splits", ["test", "valid"]):
            _require(df, name, ["user_id", "history", "target"])
    cases = eval_cases(valid, test, list(params.get("splits", ["test", "valid"])), int(params["max_history"]),
                       params.get("max_users"), seed)
    log.info("evaluation: %s", ", ".join(f"{s}: {len(g)} cases of {g['user_id'].nunique()} users"
                                         for s, g in cases.groupby("split", sort=False)))
    return cases


def build_eval_prompts(
    eval_cases: pd.DataFrame, seq_eval_prompts: pd.DataFrame, item_scids: pd.DataFrame, user_scids: pd.DataFrame,
    params: dict[str, Any],
) -> pd.DataFrame:
    """The SEQ prompt of each evaluation case, exactly as sft_data wrote it (what the LMs trained on).
    A case without one gets `prompts.seq_prompt` over its history and the user's SCID (logged)."""
    _require(seq_eval_prompts, "seq_eval_prompts", ["user_id", "split", "prompt", "target"])
    p = seq_eval_prompts.assign(user_id=seq_eval_prompts["user_id"].astype(str), target=seq_eval_prompts["target"].astype(str))
    # Prompts carry their held-out position (sft_data since 2026-12-03); older ones are one per (split, user).
    key = ["split", "user_id", "case"] if "position" in p.columns and (p["position"] >= 0).all() else ["split", "user_id"]
    p = p.assign(case=p["position"]) if "case" in key else p
    if p.duplicated(key).any():
        log.warning("evaluation: seq_eval_prompts has several prompts per %s; the first is used", tuple(key))
        p = p.drop_duplicates(key)
    merged = eval_cases.merge(p[[*key, "prompt", "target"]], on=key, how="left", suffixes=("", "_prompt"))
    has = merged["prompt"].notna()
    stale = has & (merged["target_prompt"] != merged["target"])
    if stale.any():
        r = merged[stale].iloc[0]
        raise ValueError(
            f"evaluation: seq_eval_prompts disagrees with {r['split']} for {int(stale.sum())} users (e.g. user {r['user_id']}: "
            f"target {r['target_prompt']!r} vs {r['target']!r}); the prompts are stale, rerun sft_data"
        )
    if (~has).any():
        tokens = dict(zip(item_scids["id"].astype(str), item_scids["tokens"]))
        users = dict(zip(user_scids["id"].astype(str), user_scids["tokens"])) if len(user_scids) else {}
        keep = int(params["max_history"])
        missing = merged.loc[~has]
        merged.loc[~has, "prompt"] = [
            seq_prompt([tokens[i] for i in h[-keep:] if i in tokens], users.get(u), int(params.get("template_id", 0)))
            for h, u in zip(missing["history"], missing["user_id"])
        ]
        log.warning("evaluation: %d of %d cases have no seq_eval_prompts row; built with prompts.seq_prompt", int((~has).sum()), len(merged))
    return merged[["split", "user_id", "case", "prompt", "target"]]


# ---- recommenders ----


def _baseline_output(name: str, cases: pd.DataFrame, ids: list[str], idx: np.ndarray, val: np.ndarray, seconds: float):
    info = {"model": name, "kind": "baseline", "seconds": seconds, "ms_per_user": 1000 * seconds / max(len(cases), 1)}
    return recs_frame(name, cases, ids, idx, val), info


def recommend_most_popular(eval_cases: pd.DataFrame, train_sequences: pd.DataFrame, item_scids: pd.DataFrame, params: dict[str, Any]):
    if not params["baselines"].get("most_popular", True):
        return empty_recs(), {"model": "most_popular", "skipped": "disabled in parameters"}
    t0 = time.perf_counter()
    ids = catalogue_ids(item_scids)
    model = MostPopular(ids, training_sequences(train_sequences).values())
    idx, val = top_k(model.counts[None, :], int(params["top_k"]))  # one list serves every user
    n = len(eval_cases)
    return _baseline_output("most_popular", eval_cases, ids, np.repeat(idx, n, 0), np.repeat(val, n, 0), time.perf_counter() - t0)


def recommend_item_knn(eval_cases: pd.DataFrame, train_sequences: pd.DataFrame, item_scids: pd.DataFrame, params: dict[str, Any]):
    cfg = params["baselines"].get("item_knn", {}) or {}
    if not cfg.get("enabled", True):
        return empty_recs(), {"model": "item_knn", "skipped": "disabled in parameters"}
    t0 = time.perf_counter()
    ids = catalogue_ids(item_scids)
    model = ItemKNN(ids, training_sequences(train_sequences).values(), int(cfg.get("neighbors", 100)), float(cfg.get("shrink", 10.0)))
    idx, val = recommend(model, eval_cases["history"].tolist(), int(params["top_k"]), desc="item-kNN" if params.get("show_progress") else None)
    return _baseline_output("item_knn", eval_cases, ids, idx, val, time.perf_counter() - t0)


def _recommend_with_sasrec(name: str, eval_cases: pd.DataFrame, model: Any, dataset: str, item_scids: pd.DataFrame,
                           params: dict[str, Any]):
    t0 = time.perf_counter()
    ids = catalogue_ids(item_scids)
    idx, val = recommend(SASRecScorer(model, ids, dataset), eval_cases["history"].tolist(), int(params["top_k"]),
                         desc=name if params.get("show_progress") else None)
    return _baseline_output(name, eval_cases, ids, idx, val, time.perf_counter() - t0)


def recommend_sasrec(eval_cases: pd.DataFrame, sasrec_model: Any, item_scids: pd.DataFrame, params: dict[str, Any]):
    """The tokenization stage's SASRec (full-softmax CE): the reference of the paired tests."""
    if not params["baselines"].get("sasrec", True):
        return empty_recs(), {"model": "sasrec", "skipped": "disabled in parameters"}
    if sasrec_model is None:
        log.info("evaluation: SASRec baseline skipped: no sasrec_model checkpoint (run tokenization)")
        return empty_recs(), {"model": "sasrec", "skipped": "sasrec_model checkpoint not found"}
    recs, info = _recommend_with_sasrec("sasrec", eval_cases, sasrec_model, "sasrec_model", item_scids, params)
    return recs, {**info, "loss": "ce", "note": "scoring only (fitted by tokenization)"}


def fit_sasrec_bce(items: pd.DataFrame, train_sequences: pd.DataFrame, params: dict[str, Any], tokenization: dict[str, Any],
                   seed: int):
    """SASRec with the paper's baseline loss (BCE, one sampled negative per position) on `train_sequences`,
    with `tokenization.collaborative_encoder`'s settings unless `evaluation.sasrec_bce` overrides them;
    returns the checkpoint and its training log."""
    _require(items, "items", ["item_id"])
    settings = bce_settings(params, tokenization)
    with _torch_threads(settings.get("num_threads") or None):  # 0 / null: torch's default, as in tokenization
        model, train_log = train_sasrec_bce(items["item_id"].astype(str).tolist(), train_sequences, settings, seed)
    log.info("evaluation: SASRec (BCE) trained in %.1f s (%d epochs, final train loss %.4f)", train_log["train_seconds"],
             int(settings["epochs"]), train_log["scalars"]["sasrec_final_train_loss"])
    return model, train_log


def recommend_sasrec_bce(eval_cases: pd.DataFrame, sasrec_bce_model: Any, sasrec_bce_log: dict[str, Any],
                         item_scids: pd.DataFrame, params: dict[str, Any]):
    """The SASRec baseline as the paper's baselines train it (`fit_sasrec_bce`), beside `sasrec`."""
    recs, info = _recommend_with_sasrec("sasrec_bce", eval_cases, sasrec_bce_model, "sasrec_bce_model", item_scids, params)
    seconds = float(sasrec_bce_log["train_seconds"])
    return recs, {**info, "loss": "bce", "train_seconds": seconds, "train_settings": sasrec_bce_log.get("settings", {}),
                  "final_train_loss": float(sasrec_bce_log["scalars"]["sasrec_final_train_loss"]),
                  "note": f"scoring only; fitted here in {seconds:.1f} s (BCE, 1 sampled negative per position)"}


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads for the decoding only (restored after): on a CPU shared with other jobs
    fewer threads can be much faster, as idle-waiting threads then burn the cores."""
    if n is None:
        yield
        return
    if int(n) < 1:
        raise ValueError(f"evaluation.torch_threads must be >= 1 or null, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lm_label(default: str, meta: dict[str, Any]) -> str:
    """The table row of an LM: its stage name, marked when SFT used the TCA4Rec objective."""
    if meta.get("eval_label"):
        return str(meta["eval_label"])
    objective = str(meta.get("objective", "") or "")
    return f"{default}+{objective}" if objective and objective not in ("ce", "sft", "ntp", "standard") else default


def recommend_with_lm(rec_lm: Any, eval_prompts: pd.DataFrame, item_scids: pd.DataFrame, params: dict[str, Any], *, stage: str):
    """Constrained beam search of one LM checkpoint over the item catalogue; (recs, info) with the decoding
    time. A checkpoint never written (None) or marked skipped by an ablation is left out, with a log line. A
    DPO stage whose selection kept its input policy (`stage_reuse.kept_input_policy`) is not decoded: its
    info asks `combine_recommendations` for its input policy's rows (unless `evaluation.reuse_kept_input`
    is false)."""
    name = LM_STAGES[stage]
    if rec_lm is None:
        log.info("evaluation: %s skipped: no %s checkpoint (stage not run)", name, stage)
        return empty_recs(), {"model": name, "kind": "lm", "stage": stage, "skipped": f"{stage} checkpoint not found"}
    meta = dict(getattr(rec_lm, "meta", {}) or {})
    if meta.get("skipped"):
        log.info("evaluation: %s skipped: %s is marked skipped (ablation pass-through)", name, stage)
        return empty_recs(), {"model": name, "kind": "lm", "stage": stage, "skipped": f"{stage} meta.skipped", "pass_through": True}
    name = lm_label(name, meta)
    dpo = meta.get("dpo") or {}
    fingerprints = {"policy_fingerprint": dpo.get("policy_fingerprint"), "reference_fingerprint": dpo.get("reference_fingerprint")}
    if stage != next(iter(LM_STAGES)) and params.get("reuse_kept_input", True) and kept_input_policy(meta):
        log.info("evaluation: %s kept its input policy (selected step %s): not decoded", name, dpo.get("selected_step"))
        return empty_recs(), {"model": name, "kind": "lm", "stage": stage, "reuse_input": True, "decoded": False,
                               "seconds": 0.0, "ms_per_user": 0.0, "selected_step": dpo.get("selected_step"), **fingerprints}
    tok = rec_lm.tokenizer
    catalog = SCIDCatalog.from_scids(item_scids, tok)
    ids = [encode_prompt(tok, p) for p in eval_prompts["prompt"]]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    search = {"beam_width": int(params["beam_width"]), "top_k": int(params["top_k"]), "batch_size": int(params["batch_size"]),
              "show_progress": bool(params.get("show_progress"))}
    dec = dict(params.get("decoding") or {})
    nproc = dec.get("nproc_per_node", 1)
    t0 = time.perf_counter()
    with _torch_threads(params.get("torch_threads")):
        if nproc == 1:
            idx, score = constrained_beam_search(rec_lm.model, ids, catalog, pad_token_id=pad, **search)
        else:  # the same tensors from torchrun ranks (lm/sharded_decoding.py), torch_threads threads each
            idx, score = decode_prompts_sharded(
                rec_lm, eval_prompts["prompt"].tolist(), catalog, nproc=nproc, timeout_s=dec.get("launch_timeout_s"),
                threads=params.get("torch_threads"), where="evaluation.decoding", **search,
            )
    seconds = time.perf_counter() - t0
    idx_np = idx.numpy()
    expected = min(int(params["top_k"]), catalog.n_items)
    invalid = int((idx_np[:, :expected] < 0).sum())
    if invalid:  # cannot happen with a correct decoder; a loud failure beats a silently low score
        raise RuntimeError(f"evaluation: {name}: {invalid} empty recommendation slots from constrained decoding")
    log.info("evaluation: %s decoded %d prompts in %.1f s (%.1f ms/user)", name, len(ids), seconds, 1000 * seconds / max(len(ids), 1))
    info = {"model": name, "kind": "lm", "stage": stage, "decoded": True, "seconds": seconds,
            "ms_per_user": 1000 * seconds / max(len(ids), 1), "invalid_generations": invalid, "catalogue_items": catalog.n_items,
            "mean_prompt_tokens": float(np.mean([len(i) for i in ids])) if ids else 0.0, **fingerprints,
            **({"decoding_nproc": nproc} if nproc != 1 else {})}
    return recs_frame(name, eval_prompts, catalog.item_ids, idx_np, score.numpy()), info


def lm_node_func(stage: str) -> Callable[..., Any]:
    """`recommend_with_lm` bound to one checkpoint, with its own name for the Kedro node."""

    def run(rec_lm: Any, eval_prompts: pd.DataFrame, item_scids: pd.DataFrame, params: dict[str, Any]):
        return recommend_with_lm(rec_lm, eval_prompts, item_scids, params, stage=stage)

    update_wrapper(run, recommend_with_lm)
    run.__name__ = run.__qualname__ = f"recommend_{LM_STAGES[stage]}"
    return run


def recommend_align3gr_cf(rec_lm: Any, sasrec_model: Any, eval_prompts: pd.DataFrame, eval_cases: pd.DataFrame,
                          lm_recs: pd.DataFrame, lm_info: dict[str, Any], item_scids: pd.DataFrame, params: dict[str, Any],
                          seed: int):
    """The `align3gr_cf` row (issue 26, beyond the paper): the LM's beam (its rows decoded above) united with
    SASRec's top-N, ranked by the LM's exact item log-prob + w x SASRec's log-softmax, w chosen on valid
    (`evaluation/hybrid_ranker.py`)."""
    cfg = dict(params.get("align3gr_cf") or {})
    if not cfg.get("enabled", False):
        return empty_recs(), {"model": HYBRID, "kind": "hybrid", "skipped": "evaluation.align3gr_cf.enabled is false"}
    with _torch_threads(params.get("torch_threads")):
        return hybrid_recommendations(
            rec_lm, sasrec_model, eval_prompts, eval_cases, lm_recs, item_scids,
            weights=[float(w) for w in cfg["weights"]], cf_candidates=int(cfg["cf_candidates"]), top_k=int(params["top_k"]),
            select_k=int(cfg["select_k"]), seed=int(seed), batch_size=int(cfg["batch_size"]),
            show_progress=bool(params.get("show_progress")), lm_label=lm_info.get("model"),
        )


def combine_recommendations(*parts: Any) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Arguments alternate (recs, info) per recommender, LM stages in DAG order → the `recommendations` table
    and the run info; a stage that kept its input policy gets that policy's rows under its own name."""
    pairs = reuse_input_rows(list(zip(parts[0::2], parts[1::2])))
    recs = [r for r, _ in pairs if len(r)]
    infos = [i for _, i in pairs]
    table = pd.concat(recs, ignore_index=True) if recs else empty_recs()
    return as_recommendations(table), {"models": [i for i in infos if not i.get("skipped")], "skipped": [i for i in infos if i.get("skipped")]}


# ---- metrics and report (computed in align3gr_pipelines.evaluation.report) ----


def _mlflow_key(*parts: str) -> str:
    return "/".join(re.sub(r"[^\w.\- ]", "_", p) for p in parts)


def compute_metrics(
    recommendations: pd.DataFrame, eval_cases: pd.DataFrame, run_info: dict[str, Any], params: dict[str, Any], seed: int,
    extra_section: str = "",
) -> tuple[pd.DataFrame, str, dict[str, Any]]:
    """Recall/NDCG@K (HR@1 = Recall@1) and MRR@K per model and split over every evaluated user, with bootstrap CIs
    and a paired test against SASRec (`evaluation.report.metric_table`); the Markdown table (with
    `extra_section`, e.g. the feedback exposure section, before the timing) and the run's metrics JSON."""
    ks, mrr_ks = check_cutoffs(params["ks"], params.get("mrr_ks") or [], int(params["top_k"]), int(params["beam_width"]))
    boot, perm = params.get("bootstrap", {}) or {}, params.get("paired_test", {}) or {}
    n_boot, conf = int(boot.get("n_resamples", 1000)), float(boot.get("confidence", 0.95))
    n_perm = int(perm.get("n_permutations", 10000))
    order = [i["model"] for i in run_info["models"]]
    table, at_end = metric_table(recommendations, eval_cases, order, ks, n_boot, conf, n_perm, seed, REFERENCE, mrr_ks)
    if REFERENCE not in order:
        log.info("evaluation: no SASRec row, so no paired test (p_value_vs_sasrec is NaN)")
    scalars = {_mlflow_key(r.split, r.model, r.metric.replace("@", "_at_")): r.value for r in table.itertuples()}
    scalars.update(timing_scalars(run_info["models"], _mlflow_key))
    if at_end:
        log.warning("evaluation: users whose target ties with the last kept item (the group may run past top_k; "
                    "credit counts its listed part): %s", at_end)
    info = {
        "models": run_info["models"], "skipped": run_info["skipped"], "ks": ks, "mrr_ks": mrr_ks, "beam_width": int(params["beam_width"]),
        "top_k": int(params["top_k"]), "n_users": {s: int(n) for s, n in eval_cases.groupby("split").size().items()},
        "bootstrap": {"n_resamples": n_boot, "confidence": conf}, "paired_test": {"n_permutations": n_perm, "reference": REFERENCE},
        "ties_at_list_end": at_end,
    }
    # report.metrics_markdown's own ms/user table gives way to timing_markdown (seconds, ms/user, reuse notes).
    untimed = {**info, "models": [{k: v for k, v in m.items() if k != "ms_per_user"} for m in info["models"]]}
    markdown = metrics_markdown(table, untimed)
    if extra_section:
        markdown = insert_section(markdown, extra_section)
    markdown = insert_section(markdown, timing_markdown(info["models"]))
    return table, markdown, {"scalars": scalars, "curves": {}, "info": info}


def report_feedback_exposure(
    recommendations: pd.DataFrame, eval_cases: pd.DataFrame, feedback: pd.DataFrame, run_info: dict[str, Any],
    params: dict[str, Any], seed: int,
) -> tuple[pd.DataFrame, dict[str, Any], str]:
    """Liked / disliked hits@K, disliked exposure and their ratio per model and split
    (`evaluation.feedback_exposure`): the table, its metrics JSON and the metrics.md section. Skipped, with
    the reason logged and written, where the held-out targets carry no rating (e.g. Instruments)."""
    settings = exposure_settings(params.get("feedback_exposure"), int(params["top_k"]))
    boot = params.get("bootstrap", {}) or {}
    table, info = feedback_exposure(recommendations, eval_cases, feedback, [m["model"] for m in run_info["models"]], settings,
                                    int(boot.get("n_resamples", 1000)), float(boot.get("confidence", 0.95)), int(seed))
    if info.get("skipped"):
        log.info("evaluation: feedback exposure skipped: %s", info["skipped"])
    return table, {"scalars": exposure_scalars(table, _mlflow_key), "curves": {}, "info": info}, exposure_markdown(table, info)


def report_preference_stages(
    recommendations: pd.DataFrame, eval_cases: pd.DataFrame, feedback: pd.DataFrame, params: dict[str, Any], seed: int
) -> tuple[dict[str, Any], str]:
    """Per LM stage: share of top-K lists changed vs its input policy, Recall@K by the target's feedback
    level, paired Δ vs its input and vs SFT (align3gr_pipelines.preference.stage_report)."""
    from align3gr_pipelines.preference import stage_report

    k = int(params.get("stage_report_k", 10))
    boot, perm = params.get("bootstrap", {}) or {}, params.get("paired_test", {}) or {}
    report = stage_report.stage_report(
        recommendations, eval_cases, feedback, k, n_bootstrap=int(boot.get("n_resamples", 1000)),
        n_permutations=int(perm.get("n_permutations", 10000)), seed=int(seed),
    )
    return report, stage_report.report_markdown(report, k)
