"""Nodes of the `sp_dpo_curriculum` stage: self-play Softmax-DPO, easy → medium → hard.

Each curriculum stage is two nodes: build the stage's preference pairs with the stage's input policy
(its own constrained beam search supplies the negatives), then train a copy of that policy on them with
the same policy as the frozen reference. The three stages chain through the catalog: `sft_model` →
`sp_dpo_model_easy` → `sp_dpo_model_medium` → `sp_dpo_model_hard`.

Ablation modes (paper Table 5), parameter `mode`:
- `curriculum` (default): three stages, negatives from the stage's overlap bucket.
- `no_curriculum`: self-play negatives from every bucket mixed in one stage (the `hard` slot);
  easy and medium pass the policy through.
- `random`: plain Softmax-DPO with uniformly random catalogue negatives, one stage (the `hard` slot).
The single stage of the last two modes gets as many prompts as the three curriculum stages together,
so every mode spends the same training budget. `sp_dpo_model_hard` is always the final policy.

`mining.pairs: reachable` (issue 25; `self_play` module docstring): on-policy pairs from the stage's own beam,
only for prompts whose target the beam holds; in curriculum mode each stage decodes the one-stage modes'
prompt pool and keeps the prompts whose target's beam rank lies in its band. Not with `mode: random`.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.preference import self_play
from align3gr_pipelines.preference.dpo_stage import (
    pass_through,
    plot_dpo_metrics,
    require_policy,
    stage_metrics_json,
    train_stage,
)
from align3gr_pipelines.preference.dpo_trainer import DPOConfig, Selection, valid_recall_evaluator

log = logging.getLogger(__name__)

STAGES = ("easy", "medium", "hard")
MODES = ("curriculum", "no_curriculum", "random")
INPUT_POLICY = {"easy": "sft_model", "medium": "sp_dpo_model_easy", "hard": "sp_dpo_model_medium"}
_HINT = {
    "sft_model": "sft_train never ran; run `kedro run --pipelines=sft_train` first",
    "sp_dpo_model_easy": "run the easy stage of sp_dpo_curriculum first",
    "sp_dpo_model_medium": "run the medium stage of sp_dpo_curriculum first",
}


def _mode(params: dict[str, Any]) -> str:
    mode = params.get("mode", "curriculum")
    if mode not in MODES:
        raise ValueError(f"parameters sp_dpo_curriculum.mode: expected one of {MODES}, got {mode!r}")
    return mode


def _trains(stage: str, mode: str) -> bool:
    return mode == "curriculum" or stage == "hard"


def _stage_index(stage: str) -> int:
    return STAGES.index(stage)


def _prompts(sft_examples, train_sequences, user_scids, item_ids, tokens, params, seed: int, stage: str) -> pd.DataFrame:
    pcfg = dict(params.get("prompts", {}))
    source = pcfg.get("source", "sft_seq")
    latest = pcfg.get("include_latest_transition", False)
    if not isinstance(latest, bool):
        raise ValueError(f"parameters sp_dpo_curriculum.prompts.include_latest_transition: expected true or false, got {latest!r}")
    users = None
    if source == "non_sft_transitions" or latest:
        users = self_play.user_tokens_like_sft(sft_examples, user_scids, pcfg.get("user_scid_in_prompt", "auto"))
    if source == "sft_seq":
        prompts, info = self_play.sample_prompts(sft_examples, item_ids, seed)
    elif source == "non_sft_transitions":
        prompts, info = self_play.transition_prompts(
            train_sequences, sft_examples, item_ids, tokens, users, int(pcfg.get("max_history", 10)), int(pcfg.get("template_id", 0)), seed
        )
        if len(prompts) == 0:
            log.warning("sp_dpo %s: every training transition was an SFT SEQ target; using the SFT SEQ prompts", stage)
            prompts, info = self_play.sample_prompts(sft_examples, item_ids, seed)
    else:
        raise ValueError(f"parameters sp_dpo_curriculum.prompts.source: expected sft_seq or non_sft_transitions, got {source!r}")
    if latest:
        first = self_play.latest_transition_prompts(
            train_sequences, item_ids, tokens, users, int(pcfg.get("max_history", 10)), int(pcfg.get("template_id", 0)), seed
        )
        prompts = self_play.prepend_prompts(first, prompts)
        info = {**info, "latest_transitions": len(first)}
    log.info("sp_dpo %s: %d candidate prompts from %s (%s)", stage, len(prompts), source, info)
    return prompts


def build_self_play_pairs(
    policy: RecLM | None, sft_examples: pd.DataFrame, train_sequences: pd.DataFrame, item_scids: pd.DataFrame,
    user_scids: pd.DataFrame, params: dict[str, Any], seed: int, stage: str,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The stage's pairs (prompt, user_id, chosen (+ tokens), rejected list (+ tokens), overlap list,
    n_generated, filled) and its mining report. Empty for a stage the mode skips."""
    mode = _mode(params)
    if not _trains(stage, mode):
        log.info("sp_dpo %s: skipped in mode %r, no pairs", stage, mode)
        return self_play.empty_pairs(), {"scalars": {"skipped": 1.0}, "info": {"mode": mode}}
    policy = require_policy(policy, INPUT_POLICY[stage], _HINT[INPUT_POLICY[stage]])
    item_ids, codes, tokens = self_play.item_code_table(item_scids)
    n_levels, n_stages = codes.shape[1], len(STAGES)
    n_neg = int(params.get("n_negatives", 20))
    per_stage = int(params.get("prompts_per_stage", 256))
    if n_neg < 1 or per_stage < 1:
        raise ValueError(f"sp_dpo_curriculum: n_negatives and prompts_per_stage must be >= 1, got {n_neg}, {per_stage}")
    mining = self_play.Mining.from_params(params.get("mining"), n_stages)
    reachable = mining.pairs == "reachable"
    if reachable and mode == "random":
        raise ValueError("parameters sp_dpo_curriculum.mining.pairs: reachable pairs come from the policy's own beam; "
                         "mode random draws uniform negatives (use bucketed, or mode curriculum / no_curriculum)")
    prompts = _prompts(sft_examples, train_sequences, user_scids, item_ids, tokens, params, int(seed), stage)
    # Disjoint prompt subsets per curriculum stage (wrapping round when there are too few); the single
    # stage of the ablation modes takes all three subsets, and so does every stage with reachable pairs
    # (its rank band then picks its prompts).
    if mode == "curriculum" and not reachable:
        take = np.arange(_stage_index(stage) * per_stage, (_stage_index(stage) + 1) * per_stage) % len(prompts)
    else:
        take = np.arange(n_stages * per_stage) % len(prompts)
    prompts = prompts.iloc[np.unique(take)].reset_index(drop=True)

    rng = np.random.default_rng([seed, _stage_index(stage)])
    dec = params.get("decoding", {})
    sharded = {"nproc": int(dec.get("nproc_per_node", 1)), "timeout_s": dec.get("launch_timeout_s")}
    if mode == "random":
        pairs, stats = self_play.build_pairs(prompts, item_ids, codes, tokens, None, None, n_neg, rng)
        buckets = None
    elif reachable:
        band = mining.reachable_rank_bands[_stage_index(stage)] if mode == "curriculum" else None
        beam = self_play.decode_candidates(
            policy, prompts["prompt"].tolist(), item_scids, item_ids, beam_width=mining.reachable_beam_width,
            top_k=mining.reachable_beam_width, batch_size=int(dec.get("batch_size", 32)), show_progress=bool(dec.get("show_progress", True)),
            **sharded,
        )
        later = self_play.later_positives(train_sequences, prompts, item_ids)
        pairs, stats = self_play.reachable_pairs(
            prompts, item_ids, codes, tokens, beam, n_neg, later, mining.exclude_later_positives, band,
            per_stage if mode == "curriculum" else None,
        )
        buckets = f"reachable, target beam rank {list(band) if band else 'any'} of {mining.reachable_beam_width}"
        log.info(
            "sp_dpo %s (reachable): %d prompts considered, %d with the target in the beam (%.1f%%), %d in rank band %s, "
            "mean target rank %.2f", stage, stats["n_prompts_considered"], stats["n_prompts_reachable"],
            100 * stats["reachable_share"], stats["n_prompts_qualified"], band, stats["mean_target_rank"],
        )
    else:
        stage_i = _stage_index(stage) if mode == "curriculum" else None
        quotas = (
            self_play.curriculum_quotas(stage_i, n_stages, n_levels, n_neg) if stage_i is not None
            else self_play.mixed_quotas(n_stages, n_levels, n_neg)
        )
        buckets = self_play.stage_buckets(quotas, stage_i, n_stages, n_neg, mining)
        show = bool(dec.get("show_progress", True))
        beam = self_play.decode_candidates(
            policy, prompts["prompt"].tolist(), item_scids, item_ids,
            beam_width=int(dec.get("beam_width", 20)), top_k=int(dec.get("top_k", 20)),
            batch_size=int(dec.get("batch_size", 32)), show_progress=show,
            **sharded,
        )
        later = self_play.later_positives(train_sequences, prompts, item_ids)
        pairs, stats = self_play.mine_pairs(policy, prompts, item_scids, item_ids, codes, tokens, beam, buckets, mining, rng, show, later)
    log.info(
        "sp_dpo %s (%s, mining %s): %d pairs from %d prompts, buckets %s; %d negatives ranked by the policy, %d filled "
        "from the catalogue (filled share %.1f%%); %d prompts dropped with no negative; later-consumed items: %s "
        "rejected, %s candidates excluded",
        stage, mode, mining, len(pairs), len(prompts), buckets, stats["n_rejected_generated"], stats["n_rejected_filled"],
        100 * stats.get("filled_fraction", 0.0), stats["n_dropped_no_negative"],
        stats.get("n_rejected_later_positive", "n/a"), stats.get("n_later_positive_candidates_excluded", "n/a"),
    )
    if len(pairs) == 0 and reachable:
        raise ValueError(
            f"sp_dpo {stage}: no reachable preference pair: of {len(prompts)} prompts, {int(stats['n_prompts_reachable'])} had "
            f"their target in the policy's beam of {mining.reachable_beam_width} and {int(stats['n_prompts_qualified'])} in "
            f"this stage's rank band; raise prompts_per_stage or mining.reachable_beam_width, or widen reachable_rank_bands"
        )
    if len(pairs) == 0:
        raise ValueError(f"sp_dpo {stage}: no preference pair could be built (no catalogue item in buckets {buckets})")
    info = {"mode": mode, "mining": str(mining), "buckets": str(buckets)}
    if reachable:
        info["pairs"] = "reachable"
    return pairs, {"scalars": stats, "info": info}


def train_self_play_stage(
    policy: RecLM | None, pairs: pd.DataFrame, mining: dict[str, Any], item_scids: pd.DataFrame, seq_eval_prompts: pd.DataFrame,
    params: dict[str, Any], seed: int, stage: str,
) -> tuple[RecLM, dict[str, Any], Any]:
    """Trains the stage (reference = the input policy) or passes the policy through in ablation modes."""
    mode = _mode(params)
    name = INPUT_POLICY[stage]
    policy = require_policy(policy, name, _HINT[name])
    stage_name = f"sp_dpo_{stage}"
    if not _trains(stage, mode):
        model, metrics = pass_through(policy, stage_name, f"mode={mode} trains only the hard slot", {"mode": mode})
    else:
        cfg = DPOConfig.from_params(dict(params.get("training", {})), "parameters sp_dpo_curriculum.training")
        _, codes, _ = self_play.item_code_table(item_scids)
        n_levels = int(codes.shape[1])
        info: dict[str, Any] = {
            "mode": mode,
            "n_levels": n_levels,
            "overlap_ranges": {s: list(self_play.overlap_range(i, len(STAGES), n_levels)) for i, s in enumerate(STAGES)},
        }
        if mode == "curriculum":
            info["overlap_range"] = list(self_play.overlap_range(_stage_index(stage), len(STAGES), n_levels))
        sel = Selection.from_params(params.get("selection"), "parameters sp_dpo_curriculum.selection")
        evaluate = valid_recall_evaluator(seq_eval_prompts, item_scids, policy.tokenizer, sel, int(seed)) if sel.enabled else None
        model, metrics = train_stage(
            policy, pairs, cfg, int(seed) + _stage_index(stage), stage_name, reference=name, info=info, evaluate=evaluate, selection=sel
        )
        metrics["scalars"].update({**mining.get("scalars", {}), **self_play.overlap_histogram(pairs, n_levels)})
        metrics["info"]["mining"] = mining.get("info", {})
        model.meta["sp_dpo_mode"] = mode
    metrics = stage_metrics_json(metrics)
    return model, metrics, plot_dpo_metrics(metrics, f"SP-DPO {stage} ({mode})")
