"""Nodes of the `rf_dpo` stage: real-feedback Softmax-DPO, liked vs disliked (easy) → liked vs neutral (hard).

feedback levels (training period only) → per stage: the stage's own input policy recommends top-K per
user → pairs → train. Stages chain as in SP-DPO: `sp_dpo_model_hard` → `rf_dpo_model_easy` → `rf_dpo_model_hard`,
each stage's input policy being its reference. Parameter `mode`: `progressive` (default) or `mixed`
(the ablation: both levels as rejected in one stage, the hard slot; easy passes the policy through). Parameter
`hard_stage` (progressive mode): `neutral` (the paper: liked vs neutral) or `disliked_hard` (liked vs the later-rated
disliked items the hard stage's input policy scores highest, for rating data, where "neutral" items were consumed).

Data without training-period feedback (e.g. LC-Rec's JSON releases: no ratings, no reviews) or without a liked
training item is not an error: both stages pass their input policy through (``meta["skipped"]``, so evaluation
leaves them out), and the reason is logged and kept in every rf_dpo metrics' ``info``.
"""
from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.preference import feedback_pairs as fp
from align3gr_pipelines.preference import sentiment
from align3gr_pipelines.preference.dpo_stage import (
    pass_through,
    plot_dpo_metrics,
    require_policy,
    stage_metrics_json,
    train_stage,
)
from align3gr_pipelines.preference.dpo_trainer import DPOConfig, Selection, valid_recall_evaluator
from align3gr_pipelines.preference.self_play import decode_candidates, item_code_table, user_tokens_like_sft

log = logging.getLogger(__name__)

STAGES = ("easy", "hard")
MODES = ("progressive", "mixed")
INPUT_POLICY = {"easy": "sp_dpo_model_hard", "hard": "rf_dpo_model_easy"}
_HINT = {
    "sp_dpo_model_hard": "run `kedro run --pipelines=sp_dpo_curriculum` first",
    "rf_dpo_model_easy": "run the easy stage of rf_dpo first",
}


def _mode(params: dict[str, Any]) -> str:
    mode = params.get("mode", "progressive")
    if mode not in MODES:
        raise ValueError(f"parameters rf_dpo.mode: expected one of {MODES}, got {mode!r}")
    return mode


def _hard_stage(params: dict[str, Any]) -> str:
    """The hard slot's pair rule in progressive mode (`fp.HARD_STAGES`); a non-default value with mode mixed is an
    error, since mixed replaces the hard stage's rule."""
    value = params.get("hard_stage", "neutral")
    kind = fp.check_hard_stage(value)
    if value != "neutral" and _mode(params) != "progressive":
        raise ValueError(f"parameters rf_dpo.hard_stage: {value!r} applies to mode progressive only, got mode "
                         f"{_mode(params)!r} (mixed trains liked vs disliked + neutral in the hard slot)")
    return kind


def _stage_kind(stage: str, params: dict[str, Any]) -> str | None:
    """Which pair rule a stage slot uses, None when the mode skips it."""
    hard = _hard_stage(params)  # checked in every mode: a hard_stage the mode would ignore is an error
    if _mode(params) == "progressive":
        return hard if stage == "hard" else stage
    return "mixed" if stage == "hard" else None


def _n_rejected(params: dict[str, Any], kind: str) -> int:
    """N of the stage's pairs: rf_dpo.n_rejected, capped by disliked_hard.max_rejected for that rule."""
    n_rej = int(params.get("n_rejected", 20))
    if n_rej < 1:
        raise ValueError(f"parameters rf_dpo.n_rejected must be >= 1, got {n_rej}")
    if kind != "disliked_hard":
        return n_rej
    cap = dict(params.get("disliked_hard") or {}).get("max_rejected", n_rej)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"parameters rf_dpo.disliked_hard.max_rejected must be an integer >= 1, got {cap!r}")
    return min(n_rej, cap)


def no_feedback_reason(levels: pd.DataFrame, n_feedback: int | None = None) -> str | None:
    """Why no RF-DPO stage can train on this data (``levels``: the resolved training-period feedback; ``n_feedback``:
    rows of the whole feedback table where known), or None when some training-period item is liked."""
    if len(levels) == 0:
        if n_feedback == 0:
            return ("no real feedback: the 'feedback' table is empty (the data source has no ratings or reviews, e.g. "
                    "LC-Rec's JSON release); RF-DPO needs liked vs disliked/neutral training-period feedback")
        return ("no real feedback: 'feedback' has no labelled training-period row (the data source may have no "
                "ratings or reviews, e.g. LC-Rec's JSON release); RF-DPO needs liked vs disliked/neutral "
                "training-period feedback")
    if not (levels["level"] == "liked").any():
        return "no liked training-period feedback: RF-DPO's chosen items are liked ones (feedback level 'liked', split 'train')"
    return None


def resolve_feedback_levels(
    feedback: pd.DataFrame, interactions: pd.DataFrame, params: dict[str, Any], seed: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Training-period feedback with a level per row (sentiment for review-only rows) and its report."""
    _stage_kind("hard", params)  # bad rf_dpo.mode / hard_stage stop the run before any work
    level_cfg = dict(params.get("levels", {}))
    sent_cfg = dict(params.get("sentiment", {}))
    build, state = sentiment.checked_scorer_factory(sent_cfg, feedback, interactions, level_cfg, int(seed))
    levels, report = fp.training_feedback(feedback, interactions, level_cfg, build)
    info: dict[str, Any] = dict(report)
    if "scorer" in state:
        info["sentiment"] = {"method": sent_cfg.get("method", "anchors"), "model": sent_cfg.get("model"),
                             "calibrated": bool(state.get("calibrated", False)), "agreement_with_ratings": state.get("agreement")}
    log.info(
        "rf_dpo feedback (training period): %d rows, levels %s, sources %s; %d scored from reviews, %d unlabelled dropped, "
        "%d valid/test rows never read",
        report["n_train_feedback"], report["level_counts"], report["source_counts"], report["n_review_sentiment"],
        report["n_unlabelled_dropped"], report["n_excluded_valid_test"],
    )
    reason = no_feedback_reason(levels, len(feedback))
    if reason:
        info["skip_reason"] = reason
        log.warning("rf_dpo: both stages will pass their input policy through: %s", reason)
    scalars = {f"level_{k}": float(v) for k, v in report["level_counts"].items()}
    scalars.update({f"level_fraction_{k}": float(v) for k, v in report["level_fractions"].items()})
    scalars["n_review_sentiment"] = float(report["n_review_sentiment"])
    agreement = (info.get("sentiment") or {}).get("agreement_with_ratings")
    if agreement:
        scalars["sentiment_accuracy_on_rated"] = agreement["accuracy"]
    return levels, stage_metrics_json({"scalars": scalars, "curves": {}, "info": info})


def recommend_for_feedback(
    policy: RecLM | None,
    train_sequences: pd.DataFrame,
    levels: pd.DataFrame,
    sft_examples: pd.DataFrame,
    item_scids: pd.DataFrame,
    user_scids: pd.DataFrame,
    params: dict[str, Any],
    seed: int,
    stage: str,
) -> pd.DataFrame:
    """One row per user: the prompt (prefix before a liked training item, its target and future) and the
    top-K recommendations of *this stage's* input policy for it."""
    name = INPUT_POLICY[stage]
    policy = require_policy(policy, name, _HINT[name])
    pcfg, rcfg = dict(params.get("prompts", {})), dict(params.get("recommend", {}))
    item_ids, _, tokens = item_code_table(item_scids)
    user_tokens = user_tokens_like_sft(sft_examples, user_scids, pcfg.get("user_scid_in_prompt", "auto"))
    max_users = pcfg.get("max_users")
    prompts, stats = fp.user_prompts(
        train_sequences, levels, dict(zip(item_ids, tokens)), user_tokens, int(pcfg.get("template_id", 0)),
        None if max_users is None else int(max_users), int(seed),
        None if pcfg.get("max_history") is None else int(pcfg["max_history"]), str(pcfg.get("position", "latest_liked")),
    )
    if len(prompts) == 0:
        reason = no_feedback_reason(levels) or "no user with a liked training item has a prompt whose items all have SCIDs"
        log.warning("rf_dpo %s: no user prompt, nothing to recommend (%s); the stage passes %s through", stage, reason, name)
        return prompts.assign(recommended=pd.Series([], dtype=object), policy=pd.Series([], dtype=object))
    kind = _stage_kind(stage, params)
    if kind is None:  # the mode skips this stage: nothing to recommend
        return prompts.assign(recommended=[[] for _ in range(len(prompts))], policy=name)
    top = decode_candidates(
        policy, prompts["prompt"].tolist(), item_scids, item_ids, beam_width=int(rcfg.get("beam_width", 20)),
        top_k=int(rcfg.get("top_k", 20)), batch_size=int(rcfg.get("batch_size", 32)),
        show_progress=bool(rcfg.get("show_progress", True)),
        nproc=int(rcfg.get("nproc_per_node", 1)), timeout_s=rcfg.get("launch_timeout_s"), where="rf_dpo.recommend",
    )
    prompts["recommended"] = [[item_ids[i] for i in row if i >= 0] for row in top]
    prompts["policy"] = name
    log.info("rf_dpo %s: %d user prompts (%s), top-%d recommended by %s", stage, len(prompts), stats, top.shape[1], name)
    if kind == "disliked_hard":  # scored here, where the input policy is loaded anyway, and kept with the prompts
        candidates = fp.disliked_candidates(prompts, levels)
        prompts["scored_items"] = candidates
        prompts["scored_logp"] = fp.policy_item_logprobs(
            policy, prompts["prompt"].tolist(), item_scids, candidates, int(rcfg.get("batch_size", 32)))
        log.info("rf_dpo %s (disliked_hard): %s scored %d later-rated disliked items over %d prompts", stage, name,
                 sum(map(len, candidates)), len(prompts))
    return prompts


def _pairs_and_stats(
    recommendations: pd.DataFrame, levels: pd.DataFrame, item_scids: pd.DataFrame, params: dict[str, Any], kind: str
) -> tuple[pd.DataFrame, dict[str, float]]:
    item_ids, codes, tokens = item_code_table(item_scids)
    recs = recommendations[["user_id", "recommended"]].explode("recommended").dropna()
    recs = recs.rename(columns={"recommended": "item_id"})
    recs["rank"] = recs.groupby("user_id").cumcount()
    return fp.build_feedback_pairs(
        recommendations, recs, levels, kind, _n_rejected(params, kind), bool(params.get("pad_with_unrated", False)),
        dict(zip(item_ids, tokens)), dict(zip(item_ids, codes.tolist())),
    )


def build_rf_pairs(
    recommendations: pd.DataFrame, levels: pd.DataFrame, item_scids: pd.DataFrame, params: dict[str, Any], stage: str
) -> pd.DataFrame:
    kind = _stage_kind(stage, params)
    if kind is None or len(recommendations) == 0:  # skipped by the mode, or no prompt (no feedback to learn from)
        return fp.empty_feedback_pairs()
    pairs, stats = _pairs_and_stats(recommendations, levels, item_scids, params, kind)
    log.info("rf_dpo %s (%s): %s", stage, kind, stats)
    if len(pairs) == 0:
        log.warning(
            "rf_dpo %s: no pair could be built — no prompt has a later-rated %s training item "
            "(rf_dpo.pad_with_unrated: true pads with unrated recommendations); the stage passes its policy through",
            stage, fp.STAGE_REJECTED[kind],
        )
        return fp.empty_feedback_pairs()
    return pairs


def _pair_scalars(
    pairs: pd.DataFrame, recommendations: pd.DataFrame, levels: pd.DataFrame, item_scids: pd.DataFrame,
    params: dict[str, Any], kind: str | None, stage: str,
) -> dict[str, float]:
    """How many pairs the stage built and from what pools (`fp.build_feedback_pairs`'s stats, recomputed from the
    stage's persisted recommendations so that the metrics JSON carries them)."""
    if kind is None or len(recommendations) == 0:
        return {"n_pairs": float(len(pairs))}
    _, stats = _pairs_and_stats(recommendations, levels, item_scids, params, kind)
    if stats["n_pairs"] != len(pairs):  # pairs from an earlier run with other parameters
        log.warning("rf_dpo %s: the pairs hold %d pairs, the current parameters build %d; the pool figures in the "
                    "metrics are the current parameters'", stage, len(pairs), int(stats["n_pairs"]))
    return {**stats, "n_pairs": float(len(pairs))}


def train_rf_stage(
    policy: RecLM | None, pairs: pd.DataFrame, recommendations: pd.DataFrame, levels: pd.DataFrame,
    item_scids: pd.DataFrame, seq_eval_prompts: pd.DataFrame, params: dict[str, Any], seed: int, stage: str,
) -> tuple[RecLM, dict[str, Any], Any]:
    """Train the stage on its pairs, or pass the input policy through (``meta["skipped"]``) with the reason in
    ``metrics["info"]["reason"]``: the mode skips the slot, the data has no (liked) training-period feedback
    (``levels``: rf_dpo_feedback_levels), or no pair could be built. ``recommendations`` (the stage's prompts and
    its input policy's top-K) give the pair and pool counts in ``metrics["scalars"]``."""
    mode = _mode(params)
    name = INPUT_POLICY[stage]
    policy = require_policy(policy, name, _HINT[name])
    kind = _stage_kind(stage, params)
    stage_name = f"rf_dpo_{stage}"
    no_feedback = no_feedback_reason(levels)
    if kind is None:
        model, metrics = pass_through(policy, stage_name, f"mode={mode} trains both levels in the hard slot", {"mode": mode})
    elif no_feedback is not None:
        log.warning("rf_dpo %s: skipped, %s passed through unchanged: %s", stage, name, no_feedback)
        model, metrics = pass_through(policy, stage_name, no_feedback, {"mode": mode, "no_feedback": True})
    elif len(pairs) == 0:
        model, metrics = pass_through(policy, stage_name, "no preference pair (no later-rated item of the stage's level)", {"mode": mode})
    else:
        cfg = DPOConfig.from_params(dict(params.get("training", {})), "parameters rf_dpo.training")
        sel = Selection.from_params(params.get("selection"), "parameters rf_dpo.selection")
        evaluate = valid_recall_evaluator(seq_eval_prompts, item_scids, policy.tokenizer, sel, int(seed)) if sel.enabled else None
        info = {"mode": mode, "pairs": kind, "hard_stage": params.get("hard_stage", "neutral"),
                "rejected_levels": list(fp.STAGE_REJECTED[kind])}
        model, metrics = train_stage(
            policy, pairs, cfg, int(seed) + 10 + STAGES.index(stage), stage_name, reference=name, info=info,
            evaluate=evaluate, selection=sel,
        )
        for col in ("n_from_recommendations", "n_from_later_rated", "n_from_unrated"):
            metrics["scalars"][col] = float(pairs[col].sum())
        metrics["scalars"]["chosen_is_target_fraction"] = float((pairs["chosen_source"] == "target").mean())
        model.meta["rf_dpo_mode"] = mode
    for key, value in _pair_scalars(pairs, recommendations, levels, item_scids, params, kind, stage).items():
        metrics["scalars"].setdefault(key, value)  # the trainer's own n_pairs / mean_rejected_per_pair stay
    metrics = stage_metrics_json(metrics)
    return model, metrics, plot_dpo_metrics(metrics, f"RF-DPO {stage} ({mode})")
