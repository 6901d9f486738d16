"""Per preference stage: what it changed and for whom (issue 15, defect 6).

For every LM stage of the chain sft → sp_dpo_easy → sp_dpo_medium → sp_dpo_hard → rf_dpo_easy →
rf_dpo_hard present in `recommendations`, on each evaluated split:

- ``changed_share``: the share of users whose top-K list differs from the stage's input policy's (as an
  ordered list) and ``changed_set_share`` (as a set) — a stage that changes nothing is a no-op whatever
  its training curves say;
- Recall@K split by the held-out target's feedback level (liked / neutral / disliked, from `feedback`),
  so the effect of RF-DPO on neutral targets is visible; with evaluation's tie rule (`metrics`) over
  each whole kept list, so the overall figure equals the evaluation table's;
- the paired difference of Recall@K against the input policy and against SFT over the same users: mean,
  percentile-bootstrap 95% CI and the sign-flip permutation p-value (`metrics`);
- NDCG@K, MRR@K and HR@1 beside Recall@K, from the same lists with the same tie rule, and the paired
  difference of NDCG@K against the input policy (``delta_ndcg_vs_input``): preference optimisation acts at
  the head of the list, where Recall@K can stay flat (issue 25).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from align3gr_pipelines.evaluation.metrics import (
    bootstrap_ci,
    case_lists,
    mrr_at_k,
    ndcg_at_k,
    paired_permutation_test,
    recall_at_k,
)

CHAIN = ("sft", "sp_dpo_easy", "sp_dpo_medium", "sp_dpo_hard", "rf_dpo_easy", "rf_dpo_hard")
LEVELS = ("liked", "neutral", "disliked")


def target_levels(eval_cases: pd.DataFrame, feedback: pd.DataFrame) -> pd.Series:
    """The feedback level of each case's held-out target (index aligned with ``eval_cases``; 'unknown'
    where the split's feedback has no row for it)."""
    for col in ("user_id", "item_id", "level", "split"):
        if col not in feedback.columns:
            raise ValueError(f"stage report: 'feedback' lacks column {col!r} (columns: {list(feedback.columns)})")
    fb = feedback.assign(user_id=feedback["user_id"].astype(str), item_id=feedback["item_id"].astype(str))
    key = dict(zip(zip(fb["split"], fb["user_id"], fb["item_id"]), fb["level"]))
    return pd.Series(
        [key.get((s, str(u), str(t))) or "unknown" for s, u, t in zip(eval_cases["split"], eval_cases["user_id"], eval_cases["target"])],
        index=eval_cases.index,
    )


def _paired(a: np.ndarray, b: np.ndarray, n_boot: int, n_perm: int, seed: int) -> dict[str, float]:
    d = a - b
    lo, hi = bootstrap_ci(d, n_boot, 0.95, seed)
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi),
            "p_value": float(paired_permutation_test(a, b, n_perm, seed))}


def stage_report(
    recommendations: pd.DataFrame,
    eval_cases: pd.DataFrame,
    feedback: pd.DataFrame,
    k: int = 10,
    chain: Sequence[str] = CHAIN,
    n_bootstrap: int = 1000,
    n_permutations: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """{split: {stage: {...}}} for the stages of ``chain`` present in ``recommendations`` (module doc)."""
    levels = target_levels(eval_cases, feedback)
    out: dict[str, Any] = {}
    present = [m for m in chain if (recommendations["model"] == m).any()]
    for split, cases in eval_cases.groupby("split", sort=False):
        users = cases["user_id"].astype(str).reset_index(drop=True)
        recs = recommendations[recommendations["split"] == split]
        recs = recs.assign(item_id=recs["item_id"].astype(str))
        lists, hits, head = {}, {}, {}
        targets = cases["target"].astype(str).tolist()
        for m in present:
            mine = recs[recs["model"] == m]
            # The whole kept list, as in evaluation's metrics: a tie group straddling K gets its share.
            items, scores = case_lists(mine, cases, k)
            lists[m] = items[:, :k]
            hits[m] = recall_at_k(items, targets, k, scores)
            head[m] = {f"ndcg@{k}": ndcg_at_k(items, targets, k, scores), f"mrr@{k}": mrr_at_k(items, targets, k, scores),
                       "hr@1": recall_at_k(items, targets, 1, scores)}
        lv = levels.loc[cases.index].to_numpy()
        per_stage: dict[str, Any] = {}
        for j, m in enumerate(present):
            row: dict[str, Any] = {f"recall@{k}": float(hits[m].mean()), "n_users": len(users)}
            row.update({name: float(v.mean()) for name, v in head[m].items()})
            for level in LEVELS:
                mask = lv == level
                row[f"recall@{k}_{level}"] = float(hits[m][mask].mean()) if mask.any() else float("nan")
                row[f"n_{level}"] = int(mask.sum())
            if j > 0:
                prev = present[j - 1]
                same_order = (lists[m] == lists[prev]).all(axis=1)
                same_set = np.array([set(a) == set(b) for a, b in zip(lists[m], lists[prev])])
                row.update(input=prev, changed_share=float(1 - same_order.mean()), changed_set_share=float(1 - same_set.mean()))
                row["delta_vs_input"] = _paired(hits[m], hits[prev], n_bootstrap, n_permutations, seed)
                row["delta_vs_sft"] = _paired(hits[m], hits[present[0]], n_bootstrap, n_permutations, seed)
                row["delta_ndcg_vs_input"] = _paired(head[m][f"ndcg@{k}"], head[prev][f"ndcg@{k}"], n_bootstrap, n_permutations, seed)
            per_stage[m] = row
        out[str(split)] = per_stage
    return out


def report_markdown(report: dict[str, Any], k: int = 10) -> str:
    lines = [f"# Preference stages: changed top-{k} lists and Recall@{k} by target feedback level", "",
             f"R@{k}, N@{k}, MRR@{k} and HR@1 come from the same lists; the Δ columns are paired differences over the "
             f"same users (R@{k} vs the stage's input and vs SFT, N@{k} vs the input).", ""]
    for split, stages in report.items():
        lines += [f"## {split}", "",
                  f"| stage | input | changed lists | R@{k} | N@{k} | MRR@{k} | HR@1 | liked | neutral | disliked "
                  f"| Δ vs input [95% CI] | Δ vs SFT [95% CI] | ΔN@{k} vs input [95% CI] |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for m, r in stages.items():
            def d(x: dict[str, float] | None) -> str:
                return "" if not x else f"{x['mean']:+.4f} [{x['ci_low']:+.4f}, {x['ci_high']:+.4f}] p={x['p_value']:.3f}"

            lines.append(
                f"| {m} | {r.get('input', '')} | {r['changed_share']:.1%} | " if "changed_share" in r else f"| {m} | | | "
            )
            lines[-1] += (
                f"{r[f'recall@{k}']:.4f} | {r[f'ndcg@{k}']:.4f} | {r[f'mrr@{k}']:.4f} | {r['hr@1']:.4f} | "
                f"{r[f'recall@{k}_liked']:.4f} (n={r['n_liked']}) | "
                f"{r[f'recall@{k}_neutral']:.4f} (n={r['n_neutral']}) | {r[f'recall@{k}_disliked']:.4f} (n={r['n_disliked']}) | "
                f"{d(r.get('delta_vs_input'))} | {d(r.get('delta_vs_sft'))} | {d(r.get('delta_ndcg_vs_input'))} |"
            )
        lines.append("")
    return "\n".join(lines)
