"""Is model B better than model A, and could this test set have seen it? Pooled paired differences over
seeds with a user-cluster bootstrap CI, and the minimal detectable effect beside them.

Every (seed, case) gives one paired difference d = metric_B − metric_A on the same held-out case. The
pooled Δ is their mean. Cases of one user are not independent (the same user in three seeds, or several
suffix cases of one user), so the bootstrap resamples users, each with all of their seeds and cases
(a cluster bootstrap), and the CI is the percentile interval of the resampled means.

The minimal detectable effect (MDE) is the true Δ that a two-sided test at level `alpha` would find with
probability `power`, given the same spread: (z_{1-alpha/2} + z_{power}) × SE, with SE the bootstrap
standard error of Δ. A |Δ| well below the MDE is what noise looks like on this test set; a CI that
excludes 0 is a difference the data show. (the project's rule of thumb δ ≈ 2.8·√(d/n), d the share of
discordant cases, is this with SE = √(d/n) and one seed.)
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from align3gr_pipelines.evaluation.metrics import case_lists, ranking_metrics


@dataclass(frozen=True)
class PairedDelta:
    delta: float           # pooled mean of b − a over every (seed, case)
    ci_low: float
    ci_high: float
    se: float              # bootstrap standard error of delta
    mde: float             # minimal detectable |delta| at `power`, two-sided `alpha`
    mean_a: float
    mean_b: float
    discordant: float      # share of (seed, case) pairs where a and b differ
    n_users: int           # clusters
    n_cases: int           # (seed, case) pairs pooled
    n_seeds: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ci95": [self.ci_low, self.ci_high], "excludes_zero": self.excludes_zero}


def minimal_detectable_effect(se: float, alpha: float = 0.05, power: float = 0.8) -> float:
    z = NormalDist()
    return float((z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) * se)


def cluster_bootstrap_delta(
    a: np.ndarray, b: np.ndarray, clusters: np.ndarray, n_seeds: int = 1, n_boot: int = 2000,
    confidence: float = 0.95, seed: int = 0, alpha: float = 0.05, power: float = 0.8,
) -> PairedDelta:
    """Paired Δ = mean(b − a) over aligned cases, CI from resampling whole `clusters` (user ids)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    clusters = np.asarray(clusters)
    if not (a.shape == b.shape == clusters.shape) or a.ndim != 1:
        raise ValueError(f"paired delta: a, b and clusters must be aligned 1-D arrays, got {a.shape}, {b.shape}, {clusters.shape}")
    if len(a) == 0:
        raise ValueError("paired delta: no cases to compare")
    if not 0 < confidence < 1 or n_boot < 1:
        raise ValueError(f"paired delta: confidence must be in (0, 1) and n_boot >= 1, got {confidence}, {n_boot}")
    diff = b - a
    _, cid = np.unique(clusters, return_inverse=True)
    n_clusters = int(cid.max()) + 1
    sums = np.bincount(cid, weights=diff, minlength=n_clusters)
    counts = np.bincount(cid, minlength=n_clusters).astype(float)
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    for r in range(n_boot):  # one resample at a time: memory stays O(users) at Instruments' 25k users
        pick = rng.integers(0, n_clusters, n_clusters)
        boot[r] = sums[pick].sum() / counts[pick].sum()
    tail = (1 - confidence) / 2
    se = float(boot.std(ddof=1)) if n_boot > 1 else 0.0
    return PairedDelta(
        delta=float(diff.mean()), ci_low=float(np.quantile(boot, tail)), ci_high=float(np.quantile(boot, 1 - tail)),
        se=se, mde=minimal_detectable_effect(se, alpha, power), mean_a=float(a.mean()), mean_b=float(b.mean()),
        discordant=float(np.mean(a != b)), n_users=n_clusters, n_cases=int(len(a)), n_seeds=int(n_seeds),
    )


CASE_KEY = ["seed", "user_id", "case"]


def pooled_paired_delta(per_case_a: pd.DataFrame, per_case_b: pd.DataFrame, metric: str, **kwargs: Any) -> PairedDelta:
    """Δ of `metric` between two per-case tables (columns seed, user_id, case, <metric>), paired on the
    (seed, user, case) both have, clustered by user. Cases only one side has are an error: a pairing
    over different users would not be paired."""
    for name, df in (("a", per_case_a), ("b", per_case_b)):
        missing = [c for c in [*CASE_KEY, metric] if c not in df.columns]
        if missing:
            raise ValueError(f"paired delta: per-case table {name} lacks columns {missing}; it has {list(df.columns)}")
    merged = per_case_a[[*CASE_KEY, metric]].merge(per_case_b[[*CASE_KEY, metric]], on=CASE_KEY, how="outer",
                                                   suffixes=("_a", "_b"), indicator=True)
    lonely = merged["_merge"] != "both"
    if lonely.any():
        raise ValueError(f"paired delta: {int(lonely.sum())} (seed, user, case) rows are in one table only; "
                         "compare runs over the same seeds and test cases")
    return cluster_bootstrap_delta(merged[f"{metric}_a"].to_numpy(), merged[f"{metric}_b"].to_numpy(),
                                   merged["user_id"].astype(str).to_numpy(), n_seeds=merged["seed"].nunique(), **kwargs)


def per_case_metrics(recommendations: pd.DataFrame, cases: pd.DataFrame, ks: tuple[int, ...] = (5, 10),
                     mrr_ks: tuple[int, ...] = ()) -> pd.DataFrame:
    """Recall/NDCG@K of every model on every evaluated case: columns model, split, user_id, case, recall@k,
    ndcg@k (and mrr@m for m in mrr_ks). `cases` has split, user_id, target and optionally case (the held-out position, for holdouts
    with several cases per user; recommendations then carry it too); a case without a list scores 0."""
    several = "case" in cases.columns
    if several and "case" not in recommendations.columns:
        raise ValueError("per-case metrics: the cases have a 'case' column and the recommendations do not")
    frames = []
    for split, part in cases.groupby("split", sort=False):
        part = part.reset_index(drop=True)
        recs = recommendations[recommendations["split"] == split]
        for model, mine in recs.groupby("model", sort=False):
            items, scores = case_lists(mine if several else mine.drop(columns="case", errors="ignore"), part, max((*ks, *mrr_ks)))
            values = ranking_metrics(items, part["target"].astype(str).tolist(), ks, scores, mrr_ks)
            frames.append(pd.DataFrame({"model": model, "split": split, "user_id": part["user_id"].astype(str),
                                        "case": part["case"] if several else 0, **values}))
    # ranking_metrics' own keys: ndcg@1 is not repeated (it equals recall@1 with one target)
    columns = ["model", "split", "user_id", "case", *(f"recall@{k}" for k in ks), *(f"ndcg@{k}" for k in ks if k > 1),
               *(f"mrr@{m}" for m in mrr_ks)]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
