"""The quality study's rows: each run is a name, parameter overrides of the same pipeline and the stages it
needs; each reported line of a table picks one model of one run's evaluation table.

Kept apart from quality_study.py (which runs them) so the e2e test can check, without training anything,
that every override names a parameter that exists in conf/base.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STAGES = ("data_prep", "tokenization", "sft_data", "sft_train", "sp_dpo_curriculum", "rf_dpo", "evaluation")
# Runs that stop after SFT: their evaluation table holds the baselines and the `sft` model only.
SFT_STAGES = ("data_prep", "tokenization", "sft_data", "sft_train", "evaluation")
SP_STAGES = ("data_prep", "tokenization", "sft_data", "sft_train", "sp_dpo_curriculum", "evaluation")

ALL_TASKS = (
    "seq", "item_text2scid", "item_scid2text", "seq2text", "titles2scid",
    "intent_search", "preference", "user_text2scid", "user_scid2text",
)
# The paper's SFT task groups (Table 4): C1 item<->index, C2 seq2text, C3 titles2scid, B1 intention and
# preference, B2 user text<->SCID.
C1 = ("item_text2scid", "item_scid2text")
C2 = ("seq2text",)
C3 = ("titles2scid",)
B1 = ("intent_search", "preference")
B2 = ("user_text2scid", "user_scid2text")
# Leave-one-task-out at the full recipe: each alignment task group removed alone (issue 17's per-task table).
LOO_GROUPS = {"c1": C1, "c2": C2, "c3": C3, "b1": B1, "b2": B2}


def tasks_only(*enabled: str) -> dict[str, Any]:
    """Overrides that switch on exactly `enabled` among the SFT tasks."""
    unknown = set(enabled) - set(ALL_TASKS)
    if unknown:
        raise ValueError(f"unknown SFT task(s) {sorted(unknown)}; known: {ALL_TASKS}")
    return {f"sft_data.tasks.{t}.enabled": t in enabled for t in ALL_TASKS}


ITEM_ONLY = {"tokenization.ablation.user_scids": False, "sft_data.inject_user_scid": False}
# Issue 25's SP-DPO recipe (conf/base/parameters_sp_dpo_curriculum.yml documents each key beside the paper's
# setting: bucketed pairs, no de-noising, no selection).
DPO_REACH = {
    "sp_dpo_curriculum.mining.pairs": "reachable",
    "sp_dpo_curriculum.mining.exclude_later_positives": True,
    "sp_dpo_curriculum.prompts.include_latest_transition": True,
    "sp_dpo_curriculum.selection.metric": "ndcg",
}


@dataclass(frozen=True)
class Run:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    stages: tuple[str, ...] = STAGES
    about: str = ""

    def overrides_for(self, stage: str) -> dict[str, Any]:
        return {k: v for k, v in self.overrides.items() if k.split(".", 1)[0] == stage}


@dataclass(frozen=True)
class Line:
    """One line of a results table: `model` (a row label of evaluation_metrics) from run `run`."""

    table: str
    label: str
    run: str
    model: str


# Runs in the order a study runs them: those that reuse cached stages of the Table 1 runs first (Table 5's
# DPO variants reuse full's SFT), the costliest last (Table 3 retrains tokenization), so a study cut short
# still has whole tables.
RUNS: dict[str, Run] = {
    r.name: r
    for r in [
        Run("full", {}, STAGES, "Align3GR: dual SCIDs, every SFT task + user SCID injection, SP-DPO curriculum, RF-DPO"),
        # Table 1 comparators, built from our own components.
        Run("tiger", {**ITEM_ONLY, **tasks_only("seq")}, SFT_STAGES, "TIGER-like: item-only SCIDs, SEQ only, no DPO"),
        Run("lcrec", {**ITEM_ONLY, **tasks_only("seq", *C1, *C2, *C3, *B1)}, SFT_STAGES,
            "LC-Rec-like: item-only SCIDs, LC-Rec's tasks (SEQ, C1-C3, B1), no user SCID, no DPO"),
        # Table 5: DPO variants (same SFT checkpoint as `full`, reused from the cache).
        Run("dpo_random", {"sp_dpo_curriculum.mode": "random"}, SP_STAGES, "Softmax-DPO, random negatives"),
        Run("dpo_no_curriculum", {"sp_dpo_curriculum.mode": "no_curriculum"}, SP_STAGES,
            "self-play negatives, all buckets in one stage"),
        Run("rf_mixed", {"rf_dpo.mode": "mixed"}, STAGES, "RF-DPO with disliked and neutral in one stage"),
        # Issue 25: the preference level on reachable, de-noised pairs, each stage selected on valid NDCG@10 (the
        # gate and the confirm half as in `full`). Its evaluation also holds the `align3gr_cf` hybrid of the same
        # SFT checkpoint (issue 26), its weight chosen on 2,000 valid users (1,000 select + 1,000 confirm).
        Run("dpo_reach", {**DPO_REACH, "evaluation.max_users.valid": 2000}, STAGES,
            "SP-DPO on reachable pairs (target in the policy's beam; rejected = the items ranked above it, then the rest "
            "of the beam), later positives never rejected, users' latest transitions included, selection on NDCG@10"),
        # The same recipe at 8x the prompts (the reachable share is ~35% on Instruments, so 256 prompts a stage left
        # ~90 pairs per stage) and with a lighter gate: the best valid-NDCG checkpoint of the select half replaces
        # the input if it is also higher on the confirm half (no significance test: max_p_value null).
        Run("dpo_reach_big", {**DPO_REACH, "sp_dpo_curriculum.prompts_per_stage": 2048,
                              "sp_dpo_curriculum.selection.max_p_value": None}, SP_STAGES,
            "dpo_reach with 2,048 prompts a stage and selection without the sign test (select half, confirmed higher "
            "on the other half)"),
        # Issue 26: TCA4Rec (SASRec's token distribution mixed into the LM's targets) at every labelled item position
        # (the SEQ response and, with history_loss, every history item), against the CE objective of `full` and a
        # uniform-label control (the same mixing weight, no CF signal). alpha: conf/base (0.3).
        Run("tca_all", {"sft_train.objective": "tca4rec", "sft_train.tca4rec.positions": "all_labelled"}, SFT_STAGES,
            "TCA4Rec at every labelled position (SEQ response + history items), labels from SASRec"),
        Run("tca_uniform", {"sft_train.objective": "tca4rec", "sft_train.tca4rec.positions": "all_labelled",
                            "sft_train.tca4rec.label": "uniform"}, SFT_STAGES,
            "control: the same mixing at every labelled position with a uniform label (no CF signal)"),
        # full's evaluation again with every valid user (610 on ml-latest-small instead of 200): the align3gr_cf
        # hybrid's w is then chosen on 305 users and confirmed on 305 (issue 26); other rows' test figures unchanged.
        Run("full_cfv", {"evaluation.max_users.valid": None}, STAGES,
            "full, evaluated with every valid user (the hybrid's w chosen on half of them)"),
        # full's LM and hybrid without the DPO stages (their gate kept the SFT policy on every Instruments seed, and
        # evaluation's align3gr_cf always ranks with the SFT model): the cheaper run of full/align3gr_cf and full/sft.
        Run("sft_cf", {}, SFT_STAGES, "full's SFT model and its align3gr_cf hybrid, without the DPO stages"),
        # The alpha grid for tca_all (chosen on the select half of valid, confirmed on the other): 0 is `full`.
        Run("tca_all_a01", {"sft_train.objective": "tca4rec", "sft_train.tca4rec.positions": "all_labelled",
                            "sft_train.tca4rec.alpha": 0.1}, SFT_STAGES,
            "TCA4Rec at every labelled position with alpha 0.1 (alpha grid)"),
        Run("tca_uniform_a01", {"sft_train.objective": "tca4rec", "sft_train.tca4rec.positions": "all_labelled",
                                "sft_train.tca4rec.label": "uniform", "sft_train.tca4rec.alpha": 0.1}, SFT_STAGES,
            "control for tca_all_a01: uniform labels at every labelled position, alpha 0.1"),
        Run("rf_disliked_hard", {"rf_dpo.hard_stage": "disliked_hard"}, STAGES,
            "RF-DPO whose hard stage is liked vs the disliked items the policy ranks highest (rating data)"),
        # Table 4: SFT task groups added one after the other (dual SCIDs throughout).
        Run("sft_seq", {"sft_data.inject_user_scid": False, **tasks_only("seq")}, SFT_STAGES, "SEQ"),
        Run("sft_c1", {"sft_data.inject_user_scid": False, **tasks_only("seq", *C1)}, SFT_STAGES, "SEQ + C1"),
        Run("sft_c123", {"sft_data.inject_user_scid": False, **tasks_only("seq", *C1, *C2, *C3)}, SFT_STAGES,
            "SEQ + C1-C3"),
        Run("sft_c123_b1", {"sft_data.inject_user_scid": False, **tasks_only("seq", *C1, *C2, *C3, *B1)},
            SFT_STAGES, "SEQ + C1-C3 + B1"),
        # Table 3: tokenization ablations, compared after SFT (the full run's `sft` model is the reference).
        Run("tok_item_only", dict(ITEM_ONLY), SFT_STAGES, "item-only SCIDs (no user RQ-VAE, no user SCID in prompts)"),
        Run("tok_no_cf", {"tokenization.ablation.cf_features": False}, SFT_STAGES, "semantic features only (no CF)"),
        Run("tok_no_u2i", {"tokenization.ablation.u2i_alignment": False}, SFT_STAGES, "no U2I alignment phase"),
        # Leave-one-task-out: the full SFT mix without one task group (or without the user SCID in prompts).
        *[Run(f"loo_{g}", tasks_only(*(t for t in ALL_TASKS if t not in tasks)), SFT_STAGES, f"full SFT mix without {g.upper()}")
          for g, tasks in LOO_GROUPS.items()],
        Run("loo_user_scid", {"sft_data.inject_user_scid": False}, SFT_STAGES, "full SFT mix without the user SCID in prompts"),
    ]
}

# Per-env additions to a run's overrides, applied after the run's own (`overrides_in_env`). On Instruments the
# paper's TIGER and LC-Rec rows (its Table 1, taken from the LC-Rec / LETTER line) used LC-Rec's released
# item codes as item IDs; instruments_cpu has them (Instruments.index.json), so our TIGER- and LC-Rec-like rows
# use them as item SCIDs too (tokenization.item_scids_from, conf/base/parameters_tokenization.yml).
ENV_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "instruments_cpu": {
        "tiger": {"tokenization.item_scids_from": "lcrec_index"},
        "lcrec": {"tokenization.item_scids_from": "lcrec_index"},
    },
}


def overrides_in_env(run: Run, env: str) -> dict[str, Any]:
    """The run's overrides plus what ENV_OVERRIDES adds for it in `env`."""
    return {**run.overrides, **ENV_OVERRIDES.get(env, {}).get(run.name, {})}


# Per-env stand-ins for a report line's model: in instruments_cpu the release has no ratings, RF-DPO is
# skipped (its stages are left out of the evaluation table), so the full Align3GR of Table 1 is the last
# SP-DPO stage there. The RF-DPO lines stay "not run".
LINE_MODEL_IN_ENV: dict[str, dict[tuple[str, str], str]] = {
    "instruments_cpu": {("Table 1: overall", "Align3GR (full)"): "sp_dpo_hard"},
}


def line_model(line: "Line", env: str) -> str:
    """The model a report line reads in `env` (its own unless LINE_MODEL_IN_ENV says otherwise)."""
    return LINE_MODEL_IN_ENV.get(env, {}).get((line.table, line.label), line.model)


LINES: list[Line] = [
    Line("Table 1: overall", "Most popular", "full", "most_popular"),
    Line("Table 1: overall", "Item-kNN", "full", "item_knn"),
    Line("Table 1: overall", "SASRec (BCE, 1 negative: the paper's baseline)", "full", "sasrec_bce"),
    Line("Table 1: overall", "SASRec", "full", "sasrec"),
    Line("Table 1: overall", "TIGER-like", "tiger", "sft"),
    Line("Table 1: overall", "LC-Rec-like", "lcrec", "sft"),
    Line("Table 1: overall", "Align3GR (full)", "full", "rf_dpo_hard"),
    Line("Alignment levels", "LC-Rec-like (item SCIDs, no user alignment)", "lcrec", "sft"),
    Line("Alignment levels", "+ token & behaviour level (dual SCIDs, B2, user SCID) = SFT", "full", "sft"),
    Line("Alignment levels", "+ SP-DPO curriculum", "full", "sp_dpo_hard"),
    Line("Alignment levels", "+ RF-DPO (full Align3GR)", "full", "rf_dpo_hard"),
    Line("Table 3: tokenization (after SFT)", "Dual SCIDs (full)", "full", "sft"),
    Line("Table 3: tokenization (after SFT)", "Item-only SCIDs", "tok_item_only", "sft"),
    Line("Table 3: tokenization (after SFT)", "w/o CF features", "tok_no_cf", "sft"),
    Line("Table 3: tokenization (after SFT)", "w/o U2I alignment", "tok_no_u2i", "sft"),
    Line("Table 4: SFT tasks", "SEQ", "sft_seq", "sft"),
    Line("Table 4: SFT tasks", "+ C1 (item<->index)", "sft_c1", "sft"),
    Line("Table 4: SFT tasks", "+ C2, C3", "sft_c123", "sft"),
    Line("Table 4: SFT tasks", "+ B1 (intention, preference)", "sft_c123_b1", "sft"),
    Line("Table 4: SFT tasks", "+ B2 + user SCID (full SFT)", "full", "sft"),
    Line("Table 5: DPO", "SFT only", "full", "sft"),
    Line("Table 5: DPO", "Softmax-DPO, random negatives", "dpo_random", "sp_dpo_hard"),
    Line("Table 5: DPO", "SP-DPO w/o curriculum", "dpo_no_curriculum", "sp_dpo_hard"),
    Line("Table 5: DPO", "SP-DPO curriculum", "full", "sp_dpo_hard"),
    Line("Table 5: DPO", "SP-DPO reachable, de-noised, NDCG selection (issue 25)", "dpo_reach", "sp_dpo_hard"),
    Line("Table 5: DPO", "SP-DPO reachable, 2,048 prompts a stage, no sign test (issue 25)", "dpo_reach_big", "sp_dpo_hard"),
    Line("Table 5: DPO", "+ RF-DPO mixed", "rf_mixed", "rf_dpo_hard"),
    Line("Table 5: DPO", "+ RF-DPO, hard stage liked vs top-ranked disliked (issue 25)", "rf_disliked_hard", "rf_dpo_hard"),
    Line("Table 5: DPO", "+ RF-DPO progressive (full)", "full", "rf_dpo_hard"),
    Line("Beyond the paper", "SASRec (CE)", "dpo_reach", "sasrec"),
    Line("Beyond the paper", "LM alone (SFT)", "dpo_reach", "sft"),
    Line("Beyond the paper", "align3gr_cf: SFT LM + w x SASRec, w chosen on valid (issue 26)", "dpo_reach", "align3gr_cf"),
    Line("Beyond the paper", "LM with TCA4Rec at every labelled position (issue 26)", "tca_all", "sft+tca4rec"),
    Line("Beyond the paper", "control: uniform labels at every labelled position", "tca_uniform", "sft+tca4rec"),
    Line("Beyond the paper", "LM with TCA4Rec at every labelled position, alpha 0.1", "tca_all_a01", "sft+tca4rec"),
    Line("Beyond the paper", "control: uniform labels at every labelled position, alpha 0.1", "tca_uniform_a01", "sft+tca4rec"),
    Line("Beyond the paper", "align3gr_cf, w chosen on every valid user", "full_cfv", "align3gr_cf"),
    Line("Leave one task out (SFT)", "full SFT mix", "full", "sft"),
    *[Line("Leave one task out (SFT)", f"- {g.upper()} ({', '.join(tasks)})", f"loo_{g}", "sft") for g, tasks in LOO_GROUPS.items()],
    Line("Leave one task out (SFT)", "- user SCID in prompts", "loo_user_scid", "sft"),
]

# --quick: tiny sizes so the whole machinery (caching, resuming, aggregation, plots) runs end to end on a
# busy 2-core CPU in minutes. Real ml-latest-small data, k-core'd down to a few hundred items; the numbers
# it gives say nothing about quality.
QUICK_OVERRIDES: dict[str, Any] = {
    "data_prep.k_core": 50,   # 207 users, 302 items, 23k ratings
    "tokenization.collaborative_encoder.epochs": 2,
    "tokenization.phase1.epochs": 1,
    "tokenization.phase2.epochs": 2,
    "tokenization.rq_vae.kmeans_iters": 5,
    "sft_data.max_train_examples": 300,
    "sft_data.targets_per_user": 1,
    "sft_train.backbone.scratch.vocab_size": 500,
    "sft_train.backbone.scratch.hidden_size": 64,
    "sft_train.backbone.scratch.intermediate_size": 128,
    "sft_train.backbone.scratch.num_hidden_layers": 2,
    "sft_train.backbone.scratch.num_attention_heads": 2,
    "sft_train.backbone.scratch.num_key_value_heads": 2,
    "sft_train.trainer.num_train_epochs": 1,
    "sft_train.trainer.max_steps": 6,
    "sft_train.trainer.eval_steps": 3,
    "sft_train.trainer.max_eval_examples": 32,
    "sft_train.trainer.model_selection.n_users": 20,
    "sft_train.trainer.progress_bar": False,
    "sp_dpo_curriculum.prompts_per_stage": 8,
    "sp_dpo_curriculum.n_negatives": 4,
    "sp_dpo_curriculum.decoding.beam_width": 6,
    "sp_dpo_curriculum.decoding.top_k": 6,
    "rf_dpo.prompts.max_users": 12,
    "rf_dpo.n_rejected": 4,
    "rf_dpo.recommend.top_k": 6,
    "rf_dpo.recommend.beam_width": 6,
    "evaluation.beam_width": 10,
    "evaluation.top_k": 10,
    "evaluation.max_users.valid": 20,
    "evaluation.bootstrap.n_resamples": 50,
    "evaluation.paired_test.n_permutations": 200,
}
QUICK_RUNS = ("full", "tiger", "dpo_random")
DEFAULT_SEEDS = (42, 43, 44)


def all_overrides() -> dict[str, Any]:
    """Every override key used by any run or by --quick (for validation)."""
    keys: dict[str, Any] = dict(QUICK_OVERRIDES)
    for run in RUNS.values():
        keys.update(run.overrides)
    for by_run in ENV_OVERRIDES.values():
        for extra in by_run.values():
            keys.update(extra)
    return keys


def validate() -> None:
    """Internal consistency: lines name known runs, stages are in DAG order, overrides target a run stage."""
    for line in LINES:
        if line.run not in RUNS:
            raise ValueError(f"line {line.label!r} names unknown run {line.run!r}")
    for run in RUNS.values():
        if list(run.stages) != [s for s in STAGES if s in run.stages] or run.stages[-1] != "evaluation":
            raise ValueError(f"run {run.name!r}: stages {run.stages} must be in DAG order and end in evaluation")
        for key in run.overrides:
            if key.split(".", 1)[0] not in run.stages:
                raise ValueError(f"run {run.name!r} overrides {key!r} of a stage it does not run")
    for env, by_run in ENV_OVERRIDES.items():
        for name, extra in by_run.items():
            if name not in RUNS:
                raise ValueError(f"ENV_OVERRIDES[{env!r}] names unknown run {name!r}")
            for key in extra:
                if key.split(".", 1)[0] not in RUNS[name].stages:
                    raise ValueError(f"ENV_OVERRIDES[{env!r}][{name!r}] overrides {key!r} of a stage the run does not run")
