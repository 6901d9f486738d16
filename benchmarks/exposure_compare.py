"""Pooled paired comparison of two study rows on the feedback-exposure metrics (issue 25, RF-DPO on rating data):
liked hits@K, disliked hits@K and disliked exposure@K per test user, Δ = b − a pooled over seeds with a
user-cluster bootstrap CI and the MDE, read from a quality study's cached evaluation and data_prep outputs (so
rows evaluated before the exposure report existed can be compared too).

    python benchmarks/exposure_compare.py --study /work/study_mls_suffix5 --seeds 42,43 \
        --a full/rf_dpo_hard --b rf_disliked_hard/rf_dpo_hard [--a2 full/sft ...] --out docs/x.json

Definitions as in align3gr_pipelines.evaluation.feedback_exposure (liked = level liked; disliked = rating <=
--disliked-max-rating). Per user: liked_hits and disliked_hits summed over the user's held-out test cases;
disliked_exposed over users with a disliked case only.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from align3gr_pipelines.evaluation.feedback_exposure import case_feedback, per_user_feedback_hits
from align3gr_pipelines.evaluation.paired_stats import cluster_bootstrap_delta

METRICS = ("liked_hits", "disliked_hits", "disliked_exposed")


def _entry(study: Path, stage: str, seed: int, run: str | None) -> Path:
    """The newest cache entry of `stage` made by `run` (any run when None) for `seed`."""
    found = []
    for manifest in (study / "cache" / stage).glob("*/manifest.json"):
        m = json.loads(manifest.read_text())
        if int(m.get("seed", -1)) == seed and (run is None or m.get("run") == run):
            found.append((manifest.stat().st_mtime, manifest.parent))
    if not found:
        raise FileNotFoundError(f"{study}/cache/{stage}: no entry of run {run!r} for seed {seed}")
    return max(found)[1]


def _one(root: Path, pattern: str) -> Path:
    hits = sorted(root.rglob(pattern))
    if len(hits) != 1:
        raise FileNotFoundError(f"{root}: expected one {pattern}, found {len(hits)}")
    return hits[0]


def per_user(study: Path, seed: int, row: str, k: int, disliked_max: float) -> pd.DataFrame:
    run, model = row.split("/", 1)
    recs = pd.read_parquet(_one(_entry(study, "evaluation", seed, run), "07_model_output/recommendations.parquet"))
    recs = recs[(recs["split"] == "test") & (recs["model"] == model)]
    if recs.empty:
        raise ValueError(f"{row} seed {seed}: no test recommendations of model {model!r}")
    prep = _entry(study, "data_prep", seed, None)
    test = pd.read_parquet(_one(prep, "03_primary/test.parquet"))
    feedback = pd.read_parquet(_one(prep, "03_primary/feedback.parquet"))
    cases = pd.DataFrame({"split": "test", "user_id": test["user_id"].astype(str), "target": test["target"].astype(str)})
    if "case" in recs.columns and "position" in test.columns:
        cases["case"] = test["position"].to_numpy()
    table = per_user_feedback_hits(recs, cases, case_feedback(cases, feedback), [model], k, disliked_max)
    return table.assign(seed=seed)


def compare(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> dict:
    m = a.merge(b, on=["seed", "user_id"], suffixes=("_a", "_b"))
    if metric == "disliked_exposed":
        m = m[m["disliked_cases_a"] > 0]
    d = cluster_bootstrap_delta(m[f"{metric}_a"].to_numpy(float), m[f"{metric}_b"].to_numpy(float), m["user_id"].to_numpy(),
                                n_seeds=m["seed"].nunique())
    return d.to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True)
    parser.add_argument("--seeds", default="42,43,44")
    parser.add_argument("--pair", action="append", required=True, metavar="RUN/MODEL:RUN/MODEL", help="a:b, Δ = b − a")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--disliked-max-rating", type=float, default=1.5)
    parser.add_argument("--out", default=None, help="JSON output (default: print only)")
    args = parser.parse_args(argv)
    study, seeds = Path(args.study), [int(s) for s in args.seeds.split(",")]
    results = []
    cache: dict[str, pd.DataFrame] = {}
    for pair in args.pair:
        a, b = pair.split(":")
        for row in (a, b):
            if row not in cache:
                cache[row] = pd.concat([per_user(study, s, row, args.k, args.disliked_max_rating) for s in seeds], ignore_index=True)
        ta, tb = cache[a], cache[b]
        ratio = {r: float(t["disliked_hits"].sum() / max(t["liked_hits"].sum(), 1e-12)) for r, t in ((a, ta), (b, tb))}
        for metric in METRICS:
            d = compare(ta, tb, metric)
            results.append({"a": a, "b": b, "metric": f"{metric}@{args.k}", "seeds": seeds, **d,
                            "disliked_to_liked_hits_a": ratio[a], "disliked_to_liked_hits_b": ratio[b]})
            print(f"{b} − {a} | {metric}@{args.k} | {d['mean_a']:.4f} → {d['mean_b']:.4f} | Δ {d['delta']:+.4f} "
                  f"[{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] MDE {d['mde']:.4f} | users {d['n_users']} | "
                  f"disliked/liked hits {ratio[a]:.3f} → {ratio[b]:.3f}")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"command": "python benchmarks/exposure_compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
                                   "pairs": results}, indent=2, default=lambda x: x.item() if isinstance(x, np.generic) else str(x)))
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
