"""The evaluation table: Recall/NDCG@K (HR@1 = Recall@1) and MRR@K per model and split with bootstrap CIs and a
paired test against a reference model, its Markdown rendering and its comparison plot."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from align3gr_pipelines.evaluation.metrics import (
    bootstrap_ci,
    case_lists,
    paired_permutation_test,
    ranking_metrics,
    tie_group_at_list_end,
)

METRIC_COLUMNS = ["model", "split", "metric", "value", "ci_low", "ci_high", "p_value_vs_sasrec", "n_users"]


def check_cutoffs(ks: list[Any], mrr_ks: list[Any], top_k: int, beam_width: int) -> tuple[list[int], list[int]]:
    """`evaluation.ks` and `evaluation.mrr_ks` as ints, each in [1, top_k]: a metric is computed on the kept
    list only, so a cut-off beyond it would score every deeper hit as a miss. The LMs' beam is widened to top_k
    when top_k > beam_width (`constrained_beam_search`), so top_k is the one bound."""
    def ints(name: str, values: list[Any]) -> list[int]:
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
            raise ValueError(f"evaluation.{name} must be a list of integers, got {values!r}")
        return [int(v) for v in values]

    ks_, mrr_ = ints("ks", list(ks)), ints("mrr_ks", list(mrr_ks))
    if not ks_ or min(ks_) < 1 or max(ks_) > top_k:
        raise ValueError(f"evaluation.ks must be non-empty, each in [1, evaluation.top_k={top_k}], got {ks_}")
    too_deep = [k for k in mrr_ if k > top_k]
    if mrr_ and min(mrr_) < 1:
        raise ValueError(f"evaluation.mrr_ks: each must be >= 1, got {mrr_}")
    if too_deep:
        raise ValueError(
            f"evaluation.mrr_ks {too_deep} exceed evaluation.top_k={top_k}: MRR@K ranks the kept list only, so MRR@{max(too_deep)} "
            f"needs evaluation.top_k >= {max(too_deep)} (the LMs' beam then widens from beam_width={beam_width} to top_k; "
            f"e.g. --params \"evaluation.top_k={max(too_deep)},evaluation.mrr_ks=[10,{max(too_deep)}]\")"
        )
    return ks_, mrr_


def metric_label(metric: str) -> str:
    """The column heading of a metric in metrics.md: recall@1 is HR@1 (one target per case)."""
    return "HR@1" if metric == "recall@1" else metric


def metric_table(
    recommendations: pd.DataFrame, eval_cases: pd.DataFrame, models: list[str], ks: list[int], n_boot: int,
    conf: float, n_perm: int, seed: int, reference: str = "sasrec", mrr_ks: list[int] | None = None,
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Recall/NDCG@K (and MRR@K for each of `mrr_ks`) per model and split over every evaluated user (a user with no list scores 0; the tie
    rule of `metrics` applied over each whole kept list), with percentile-bootstrap CIs (the same resamples
    for every model) and a paired sign-flip permutation test against `reference` on the same users.
    Also returns, per "split/model", the users whose target ties with the last kept item."""
    rows: list[dict[str, Any]] = []
    truncated: dict[tuple[str, str], np.ndarray] = {}
    for split, cases in eval_cases.groupby("split", sort=False):
        n_cases = len(cases)
        recs = recommendations[recommendations["split"] == split]
        per_user: dict[str, dict[str, np.ndarray]] = {}
        for model in models:
            mine = recs[recs["model"] == model]
            # The tie rule runs over the whole kept list (top_k), not a list cut at max(ks).
            items, scores = case_lists(mine, cases, max([*ks, *(mrr_ks or [])]))
            per_user[model] = ranking_metrics(items, cases["target"].tolist(), ks, scores, mrr_ks or ())
            truncated[(split, model)] = tie_group_at_list_end(items, cases["target"].tolist(), scores, max(ks))
        if not per_user:
            continue
        names = list(next(iter(per_user.values())))
        series = [(m, name) for m in per_user for name in names]
        values = np.stack([per_user[m][name] for m, name in series], axis=1)
        low, high = bootstrap_ci(values, n_boot, conf, seed)
        pvals = np.full(len(series), np.nan)
        if reference in per_user:
            ref = np.stack([per_user[reference][name] for _, name in series], axis=1)
            others = np.array([m != reference for m, _ in series])
            if others.any():
                pvals[others] = paired_permutation_test(values[:, others], ref[:, others], n_perm, seed)
        for j, (model, name) in enumerate(series):
            rows.append({"model": model, "split": split, "metric": name, "value": float(values[:, j].mean()),
                         "ci_low": float(low[j]), "ci_high": float(high[j]), "p_value_vs_sasrec": float(pvals[j]),
                         "n_users": int(n_cases)})
    table = pd.DataFrame(rows, columns=METRIC_COLUMNS).astype({"n_users": "int64"})
    at_end = {f"{s}/{m}": int(v.sum()) for (s, m), v in truncated.items() if v.any()}
    return table, at_end


def metrics_markdown(table: pd.DataFrame, info: dict[str, Any]) -> str:
    conf = int(round(100 * info["bootstrap"]["confidence"]))
    lines = ["# Evaluation", "",
             f"Leave-one-out, full catalogue, constrained beam search width {info['beam_width']} for the LMs; "
             f"mean with {conf}% bootstrap CI ({info['bootstrap']['n_resamples']} resamples of users); p: paired "
             f"sign-flip permutation test vs SASRec ({info['paired_test']['n_permutations']} permutations). HR@1 = "
             "Recall@1 (one target per case; NDCG@1 equals it); MRR@K: reciprocal rank, 0 beyond K. A target tied "
             "with other listed items gets the mean credit over its tie group's positions.", ""]
    for split, part in table.groupby("split", sort=False):
        metrics = list(dict.fromkeys(part["metric"]))
        lines += [f"## {split} ({int(part['n_users'].iloc[0])} users)", "",
                  "| model | " + " | ".join(map(metric_label, metrics)) + " | "
                  + " | ".join(f"p {metric_label(m)}" for m in metrics) + " |",
                  "|---" * (1 + 2 * len(metrics)) + "|"]
        for model, m in part.groupby("model", sort=False):
            cells = {r.metric: f"{r.value:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}]" for r in m.itertuples()}
            ps = {r.metric: ("–" if np.isnan(r.p_value_vs_sasrec) else f"{r.p_value_vs_sasrec:.3g}") for r in m.itertuples()}
            lines.append(f"| {model} | " + " | ".join(cells[x] for x in metrics) + " | " + " | ".join(ps[x] for x in metrics) + " |")
        lines.append("")
    timing = [m for m in info["models"] if "ms_per_user" in m]
    if timing:
        lines += ["## Time per user", "", "| model | ms / user |", "|---|---|"]
        lines += [f"| {m['model']} | {m['ms_per_user']:.1f} |" for m in timing] + [""]
    if info.get("ties_at_list_end"):
        lines += ["## Ties cut by the kept list", "",
                  f"Users whose target's tie group starts in the top {max(info['ks'])} and reaches the last of the "
                  f"{info['top_k']} kept items; the group may go on past the list, and their credit counts its "
                  "listed part only (it may be too high):", ""]
        lines += [f"- {k}: {n}" for k, n in info["ties_at_list_end"].items()] + [""]
    if info["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['model']}: {s['skipped']}" for s in info["skipped"]] + [""]
    return "\n".join(lines)


def plot_comparison(evaluation_metrics: pd.DataFrame) -> Figure:
    """Grouped bars per metric, one bar per model, with bootstrap CIs; one panel per split. A bare Figure
    (no pyplot): nothing global is touched and nothing stays open."""
    splits = list(dict.fromkeys(evaluation_metrics["split"])) or ["test"]
    fig = Figure(figsize=(6.5 * len(splits), 4.2))
    axes = fig.subplots(1, len(splits), squeeze=False)
    for ax, split in zip(axes[0], splits):
        part = evaluation_metrics[evaluation_metrics["split"] == split]
        models = list(dict.fromkeys(part["model"]))
        metrics = list(dict.fromkeys(part["metric"]))
        width = 0.8 / max(len(models), 1)
        for j, model in enumerate(models):
            m = part[part["model"] == model].set_index("metric").reindex(metrics)
            x = np.arange(len(metrics)) + (j - (len(models) - 1) / 2) * width
            err = np.vstack([m["value"] - m["ci_low"], m["ci_high"] - m["value"]]).clip(min=0)
            ax.bar(x, m["value"], width, yerr=err, capsize=2, label=model)
        ax.set_xticks(np.arange(len(metrics)), metrics)
        n = int(part["n_users"].iloc[0]) if len(part) else 0
        ax.set_title(f"{split} ({n} users)")
        ax.set_ylabel("mean over users, bootstrap CI")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


