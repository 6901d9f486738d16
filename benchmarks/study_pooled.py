"""Pooled paired differences for the quality study: per-case test metrics of every finished job, and for
each compared pair of report lines the Δ pooled over seeds with a user-cluster bootstrap CI and the
minimal detectable effect (align3gr_pipelines.evaluation.paired_stats)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from align3gr_pipelines.evaluation.paired_stats import per_case_metrics, pooled_paired_delta

PER_CASE_FILE = "per_case.parquet"
POOLED_METRICS = ("recall@10", "ndcg@10")
# Head-of-list metrics (issue 25: preference optimisation acts there), pooled where a job's per-case file has
# them (jobs written before 2026-12-03 session 3 lack them; their pairs then show recall@10 and ndcg@10 only).
HEAD_METRICS = ("recall@1", "mrr@10")


def write_per_case(data: Path, dst: Path) -> bool:
    """Per-case test metrics of every model of a finished job's workspace `data/` → `dst` (Parquet).
    False when the workspace lacks the recommendations or the test split (nothing written)."""
    recs = sorted(data.rglob("07_model_output/recommendations.parquet"))
    tests = sorted(data.rglob("03_primary/test.parquet"))
    if len(recs) != 1 or len(tests) != 1:
        return False
    recommendations = pd.read_parquet(recs[0])
    test = pd.read_parquet(tests[0])
    cases = pd.DataFrame({"split": "test", "user_id": test["user_id"].astype(str), "target": test["target"].astype(str)})
    if "case" in recommendations.columns:  # several held-out cases per user: keyed by their position
        cases["case"] = test["position"].to_numpy()
    table = per_case_metrics(recommendations[recommendations["split"] == "test"], cases, ks=(1, 5, 10), mrr_ks=(10,))
    tmp = dst.with_name(dst.name + ".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(dst)
    return True


def per_case_of(out: Path, run: str, model: str) -> pd.DataFrame:
    """Every finished seed's per-case rows of `run`/`model` (columns seed, user_id, case, metrics)."""
    frames = []
    for path in sorted((out / "results" / run).glob(f"seed*/{PER_CASE_FILE}")):
        table = pd.read_parquet(path)
        frames.append(table[table["model"] == model].assign(seed=int(path.parent.name[4:])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pooled_pairs(out: Path, pairs: list[tuple[tuple[str, str], tuple[str, str]]], run_model: dict[tuple[str, str], tuple[str, str]],
                 n_boot: int = 2000) -> list[dict[str, Any]]:
    """For each (a, b) pair of report lines: Δ = b − a per metric over the seeds both have, user-cluster
    bootstrap 95% CI and MDE (80% power, two-sided 0.05). `run_model` maps a line to its (run, model)."""
    found = []
    for a, b in pairs:
        if a not in run_model or b not in run_model:
            continue
        ca, cb = per_case_of(out, *run_model[a]), per_case_of(out, *run_model[b])
        if ca.empty or cb.empty:
            continue
        seeds = sorted(set(ca["seed"]) & set(cb["seed"]))
        if not seeds:
            continue
        ca, cb = ca[ca["seed"].isin(seeds)], cb[cb["seed"].isin(seeds)]
        for metric in (*POOLED_METRICS, *HEAD_METRICS):
            if metric not in ca.columns or metric not in cb.columns or ca[metric].isna().any() or cb[metric].isna().any():
                continue
            d = pooled_paired_delta(ca, cb, metric, n_boot=n_boot)
            found.append({"a": " / ".join(a), "b": " / ".join(b), "a_row": "/".join(run_model[a]),
                          "b_row": "/".join(run_model[b]), "metric": metric, "split": "test", "seeds": seeds, **d.to_dict()})
    return found


def pooled_table(pooled: list[dict[str, Any]]) -> list[str]:
    if not pooled:
        return ["no per-case results yet (jobs finished before per-case metrics were recorded have none)"]
    lines = ["| b − a | metric | seeds | mean a → b | Δ pooled [95% CI] | MDE (80%) | discordant | users | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in pooled:
        if p["excludes_zero"]:
            verdict = "b higher" if p["delta"] > 0 else "b lower"
        else:
            verdict = "no difference shown" + (" (|Δ| < MDE)" if abs(p["delta"]) < p["mde"] else "")
        lines.append(f"| '{p['b'].split(' / ')[-1]}' − '{p['a'].split(' / ')[-1]}' | {p['metric']} | "
                     f"{','.join(map(str, p['seeds']))} | {p['mean_a']:.4f} → {p['mean_b']:.4f} | "
                     f"{p['delta']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] | {p['mde']:.4f} | "
                     f"{p['discordant']:.1%} | {p['n_users']} | {verdict} |")
    return lines
