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


def per_case_table(recommendations: pd.DataFrame, test: pd.DataFrame) -> pd.DataFrame:
    """Per-case test metrics of every model in `recommendations` (07_model_output) against the `test` split."""
    cases = pd.DataFrame({"split": "test", "user_id": test["user_id"].astype(str), "target": test["target"].astype(str)})
    if "case" in recommendations.columns:  # several held-out cases per user: keyed by their position
        cases["case"] = test["position"].to_numpy()
    return per_case_metrics(recommendations[recommendations["split"] == "test"], cases, ks=(1, 5, 10), mrr_ks=(10,))


def write_parquet_atomic(table: pd.DataFrame, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(dst)


def write_per_case(data: Path, dst: Path) -> bool:
    """Per-case test metrics of every model of a finished job's workspace `data/` → `dst` (Parquet).
    False when the workspace lacks the recommendations or the test split (nothing written)."""
    recs = sorted(data.rglob("07_model_output/recommendations.parquet"))
    tests = sorted(data.rglob("03_primary/test.parquet"))
    if len(recs) != 1 or len(tests) != 1:
        return False
    write_parquet_atomic(per_case_table(pd.read_parquet(recs[0]), pd.read_parquet(tests[0])), dst)
    return True


def per_case_of(out: Path, run: str, model: str, seeds: set[int] | None = None) -> pd.DataFrame:
    """Every finished seed's (or those of `seeds`) per-case rows of `run`/`model` (columns seed, user_id, case,
    metrics)."""
    frames = []
    for path in sorted((out / "results" / run).glob(f"seed*/{PER_CASE_FILE}")):
        if seeds is not None and int(path.parent.name[4:]) not in seeds:
            continue
        table = pd.read_parquet(path)
        frames.append(table[table["model"] == model].assign(seed=int(path.parent.name[4:])))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def pooled_pairs(out: Path, pairs: list[tuple[tuple[str, str], tuple[str, str]]], run_model: dict[tuple[str, str], tuple[str, str]],
                 n_boot: int = 2000, only_seeds: set[int] | None = None) -> list[dict[str, Any]]:
    """For each (a, b) pair of report lines: Δ = b − a per metric over the seeds both have, user-cluster
    bootstrap 95% CI and MDE (80% power, two-sided 0.05). `run_model` maps a line to its (run, model);
    `only_seeds` keeps those seeds' results only (None: every seed)."""
    found = []
    for a, b in pairs:
        if a not in run_model or b not in run_model:
            continue
        ca, cb = per_case_of(out, *run_model[a], only_seeds), per_case_of(out, *run_model[b], only_seeds)
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


def pooled_table(pooled: list[dict[str, Any]], by_row: bool = False) -> list[str]:
    """Markdown rows; each side named by its report line's last part, or by_row by its run/model."""
    if not pooled:
        return ["no per-case results yet (jobs finished before per-case metrics were recorded have none)"]
    lines = ["| b − a | metric | seeds | mean a → b | Δ pooled [95% CI] | MDE (80%) | discordant | users | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in pooled:
        if p["excludes_zero"]:
            verdict = "b higher" if p["delta"] > 0 else "b lower"
        else:
            verdict = "no difference shown" + (" (|Δ| < MDE)" if abs(p["delta"]) < p["mde"] else "")
        a, b = (p["a_row"], p["b_row"]) if by_row else (p["a"].split(" / ")[-1], p["b"].split(" / ")[-1])
        lines.append(f"| '{b}' − '{a}' | {p['metric']} | "
                     f"{','.join(map(str, p['seeds']))} | {p['mean_a']:.4f} → {p['mean_b']:.4f} | "
                     f"{p['delta']:+.4f} [{p['ci_low']:+.4f}, {p['ci_high']:+.4f}] | {p['mde']:.4f} | "
                     f"{p['discordant']:.1%} | {p['n_users']} | {verdict} |")
    return lines


def plot_pairs(found: list[dict[str, Any]], dst: Path, title: str = "", metrics: tuple[str, ...] = POOLED_METRICS) -> None:
    """A forest plot of the pooled Δs (b − a) with their 95% CIs, the MDE as a grey band around 0, one panel per
    metric → `dst` (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = tuple(m for m in metrics if any(p["metric"] == m for p in found))
    labels = list(dict.fromkeys(f"{p['b_row']} − {p['a_row']}" for p in found))
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 0.55 * len(labels) + 1.4), squeeze=False, sharey=True)
    for ax, metric in zip(axes[0], metrics):
        for y, label in enumerate(labels):
            p = next((q for q in found if q["metric"] == metric and f"{q['b_row']} − {q['a_row']}" == label), None)
            if p is None:
                continue
            ax.fill_betweenx([y - 0.3, y + 0.3], -p["mde"], p["mde"], color="0.88", lw=0)
            color = "tab:green" if p["ci_low"] > 0 else "tab:red" if p["ci_high"] < 0 else "tab:gray"
            ax.errorbar(p["delta"], y, xerr=[[p["delta"] - p["ci_low"]], [p["ci_high"] - p["delta"]]], fmt="o", color=color, capsize=3)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{metric}: Δ pooled over seeds, 95% CI (grey: ±MDE)", fontsize=9)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()  # the axes share y: invert once, first pair on top
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = dst.with_name(dst.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(dst)


def _row(spec: str) -> tuple[str, str]:
    run, sep, model = spec.partition("/")
    if not sep or not run or not model:
        raise SystemExit(f"--pair: expected RUN/MODEL:RUN/MODEL (e.g. full/sasrec:full_cfv/align3gr_cf), got {spec!r}")
    return run, model


def main(argv: list[str] | None = None) -> int:
    """Pooled paired Δs of any rows of a study folder, outside the report's fixed pairs:

        python benchmarks/study_pooled.py --out STUDY --pair full/sft:tca_all/sft+tca4rec [--pair ...] [--json F]
    """
    import argparse
    import json

    ap = argparse.ArgumentParser(description="pooled paired test deltas (b − a) of study rows, user-cluster bootstrap")
    ap.add_argument("--out", type=Path, required=True, help="the study folder (holds results/<run>/seed<N>/)")
    ap.add_argument("--pair", action="append", required=True, metavar="A_RUN/MODEL:B_RUN/MODEL")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds to keep (default: every seed both rows have)")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--png", type=Path, default=None, help="also draw the Δs (recall@10, ndcg@10) as a forest plot here")
    ap.add_argument("--title", default="", help="the plot's title")
    args = ap.parse_args(argv)
    pairs, run_model = [], {}
    for spec in args.pair:
        a_spec, sep, b_spec = spec.partition(":")
        if not sep:
            raise SystemExit(f"--pair: expected A_RUN/MODEL:B_RUN/MODEL, got {spec!r}")
        a, b = _row(a_spec), _row(b_spec)
        run_model[a], run_model[b] = a, b
        pairs.append((a, b))
    keep = {int(s) for s in args.seeds.split(",")} if args.seeds else None
    found = pooled_pairs(args.out, pairs, run_model, n_boot=args.n_boot, only_seeds=keep)
    print("\n".join(pooled_table(found, by_row=True)))
    if args.json:  # atomically: a reader never sees half a file
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(found, indent=1, default=float))
        tmp.replace(args.json)
    if args.png and found:
        plot_pairs(found, args.png, args.title)
    return 0 if found else 1


if __name__ == "__main__":
    raise SystemExit(main())
