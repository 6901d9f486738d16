"""How much could an LM + SASRec hybrid gain? Measured from a quality study's saved recommendations, before
any hybrid is built (issue 26, item 3).

    python benchmarks/hybrid_headroom.py --study /work/study_instruments --env instruments_cpu \
        --out docs/results_hybrid_headroom_instruments

For each seed of `--run` (default `full`) it reads evaluation's `recommendations.parquet` (top-20 lists of
every model, test and valid) and data_prep's held-out cases from the study's stage cache, then reports on
test, per seed and pooled over seeds:
- Recall@10 of the LM (`--lm`, default sft) and of SASRec (`--cf`, default sasrec);
- hit overlap: cases both hit in their top 10, the LM only, SASRec only, neither;
- the oracle union: a case counts if either list hits in its top 10 (no ranker can beat it with these two
  lists' top 10s; it bounds what picking per case could give);
- reciprocal-rank fusion of the two top-20 lists (k = 60, equal weights: no parameter chosen on test);
- a score fusion on the union of the two top-20 lists: LM log-probability + w × SASRec logit (SASRec's
  log-softmax differs from its logit by a per-user constant, so the ranking is the same). An item missing
  from one list gets that list's 20th score, an upper bound on its true score: this approximates the
  planned `align3gr_cf` ranker, which scores every candidate exactly. w is chosen on one half of the valid
  users, confirmed on the other (evaluation.valid_recall.confirm_half's rule), and every w's test figure is
  printed too, marked as the diagnostic it is.
Pooled paired deltas (user-cluster bootstrap over seeds, evaluation.paired_stats) and the MDE are given for
RRF and the chosen fusion against SASRec and against the LM.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from align3gr_pipelines.evaluation.paired_stats import per_case_metrics, pooled_paired_delta

RRF_K = 60
W_GRID = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, float("inf"))


def cached_files(study: Path, stage: str, run: str, seed: int) -> Path:
    """The files folder of the stage cache entry written for (run, seed); data_prep may be any run's."""
    hits = []
    for manifest in sorted((study / "cache" / stage).glob("*/manifest.json")):
        m = json.loads(manifest.read_text())
        if m.get("seed") == seed and (m.get("run") == run or stage == "data_prep"):
            hits.append((m.get("run") != run, manifest.parent / "files"))
    if not hits:
        raise FileNotFoundError(f"no cached {stage} stage for run {run!r} seed {seed} under {study / 'cache' / stage}")
    return sorted(hits)[0][1]


def held_out_cases(primary: Path) -> pd.DataFrame:
    frames = []
    for split in ("test", "valid"):
        df = pd.read_parquet(primary / f"{split}.parquet")
        frames.append(pd.DataFrame({"split": split, "user_id": df["user_id"].astype(str),
                                    "target": df["target"].astype(str), "case": df["position"].astype(int)}))
    return pd.concat(frames, ignore_index=True)


def _lists(recs: pd.DataFrame, model: str) -> pd.DataFrame:
    mine = recs[recs["model"] == model]
    if mine.empty:
        raise ValueError(f"recommendations have no model {model!r}; they have {sorted(recs['model'].unique())}")
    return mine[["split", "user_id", "case", "rank", "item_id", "score"]]


def _ranked(scored: pd.DataFrame, model: str, top: int) -> pd.DataFrame:
    """Rank each case's candidates by score (ties by item id, for determinism) and keep the top `top`."""
    scored = scored.sort_values(["split", "user_id", "case", "score", "item_id"], ascending=[True, True, True, False, True])
    scored["rank"] = scored.groupby(["split", "user_id", "case"], sort=False).cumcount() + 1
    return scored[scored["rank"] <= top].assign(model=model)


def rrf(lm: pd.DataFrame, cf: pd.DataFrame, top: int, k: int = RRF_K) -> pd.DataFrame:
    both = pd.concat([lm, cf], ignore_index=True).assign(score=lambda d: 1.0 / (k + d["rank"]))
    fused = both.groupby(["split", "user_id", "case", "item_id"], as_index=False)["score"].sum()
    return _ranked(fused, "rrf", top)


def score_fusion(lm: pd.DataFrame, cf: pd.DataFrame, w: float, top: int) -> pd.DataFrame:
    """LM log-prob + w × SASRec logit over the union; an item absent from a list takes that list's last score."""
    keys = ["split", "user_id", "case"]
    union = pd.concat([lm[[*keys, "item_id"]], cf[[*keys, "item_id"]]]).drop_duplicates()
    for name, src in (("lm", lm), ("cf", cf)):
        floor = src.groupby(keys)["score"].min().rename(f"{name}_floor")
        union = union.merge(src[[*keys, "item_id", "score"]].rename(columns={"score": name}), on=[*keys, "item_id"], how="left")
        union = union.merge(floor, left_on=keys, right_index=True, how="left")
        union[name] = union[name].fillna(union[f"{name}_floor"])
    if np.isinf(w):  # SASRec alone, LM as the tie-break
        union["score"] = union["cf"] + 1e-9 * union["lm"]
    else:
        union["score"] = union["lm"] + w * union["cf"]
    return _ranked(union[[*keys, "item_id", "score"]], f"fusion_w{w:g}", top)


def _split_valid_halves(users: pd.Series, seed: int) -> tuple[set[str], set[str]]:
    uniq = np.array(sorted(users.astype(str).unique()))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    half = len(uniq) // 2
    return set(uniq[:half]), set(uniq[half:])


def one_seed(study: Path, run: str, seed: int, lm_model: str, cf_model: str, top: int) -> tuple[pd.DataFrame, dict]:
    eval_files = cached_files(study, "evaluation", run, seed)
    recs = pd.read_parquet(next(eval_files.rglob("07_model_output/recommendations.parquet")))
    primary = next(p.parent for p in cached_files(study, "data_prep", run, seed).rglob("03_primary/test.parquet"))
    cases = held_out_cases(primary)
    recs = recs.assign(user_id=recs["user_id"].astype(str))
    lm, cf = _lists(recs, lm_model), _lists(recs, cf_model)
    fused = [lm.assign(model=lm_model), cf.assign(model=cf_model), rrf(lm, cf, top)]
    fused += [score_fusion(lm, cf, w, top) for w in W_GRID]
    per_case = per_case_metrics(pd.concat(fused, ignore_index=True), cases, ks=(10,))
    per_case["seed"] = seed

    # Only valid users with lists (evaluation decodes a sample of them); the rest would score 0 everywhere.
    listed = set(recs.loc[recs["split"] == "valid", "user_id"])
    valid = per_case[(per_case["split"] == "valid") & per_case["user_id"].isin(listed)]
    select, confirm = _split_valid_halves(valid["user_id"], seed)
    by_w = {}
    for w in W_GRID:
        v = valid[valid["model"] == f"fusion_w{w:g}"]
        by_w[w] = (v[v["user_id"].isin(select)]["recall@10"].mean(), v[v["user_id"].isin(confirm)]["recall@10"].mean())
    chosen = max(W_GRID, key=lambda w: by_w[w][0])  # ties: the first (smallest) w of the grid
    test = per_case[per_case["split"] == "test"]
    hit = test.pivot_table(index=["user_id", "case"], columns="model", values="recall@10")
    lm_hit, cf_hit = hit[lm_model] > 0, hit[cf_model] > 0
    summary = {
        "seed": seed, "n_test_cases": int(len(hit)),
        f"recall@10 {lm_model}": float(lm_hit.mean()), f"recall@10 {cf_model}": float(cf_hit.mean()),
        "both_hit": float((lm_hit & cf_hit).mean()), "lm_only": float((lm_hit & ~cf_hit).mean()),
        "cf_only": float((~lm_hit & cf_hit).mean()), "neither": float((~lm_hit & ~cf_hit).mean()),
        "oracle_union": float((lm_hit | cf_hit).mean()), "rrf": float(hit["rrf"].mean()),
        "fusion_test_by_w": {f"{w:g}": float(hit[f"fusion_w{w:g}"].mean()) for w in W_GRID},
        "fusion_valid_by_w": {f"{w:g}": {"select": float(s), "confirm": float(c)} for w, (s, c) in by_w.items()},
        "chosen_w": f"{chosen:g}", "n_valid_users": int(valid["user_id"].nunique()),
    }
    test = test.assign(model=test["model"].replace({f"fusion_w{chosen:g}": "fusion_chosen"}))
    return test, summary


def _pooled(per_case: pd.DataFrame, a: str, b: str) -> dict:
    def side(m):
        return per_case[per_case["model"] == m][["seed", "user_id", "case", "recall@10"]]
    return pooled_paired_delta(side(a), side(b), "recall@10").to_dict()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", required=True, type=Path)
    p.add_argument("--env", required=True)
    p.add_argument("--run", default="full")
    p.add_argument("--seeds", default="42,43,44")
    p.add_argument("--lm", default="sft")
    p.add_argument("--cf", default="sasrec")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", required=True, help="path stem: writes <out>.md and <out>.json")
    p.add_argument("--notes", type=Path, help="a Markdown file (the reading of the figures) appended to <out>.md")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    frames, summaries = [], []
    for seed in seeds:
        test, summary = one_seed(args.study, args.run, seed, args.lm, args.cf, args.top)
        frames.append(test)
        summaries.append(summary)
        print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)}), flush=True)
    per_case = pd.concat(frames, ignore_index=True)
    pairs = {f"{b} - {a}": _pooled(per_case, a, b) for a, b in
             [(args.cf, "rrf"), (args.lm, "rrf"), (args.cf, "fusion_chosen"), (args.lm, "fusion_chosen"), (args.cf, args.lm)]}
    result = {"study": str(args.study), "env": args.env, "run": args.run, "lm": args.lm, "cf": args.cf,
              "rrf_k": RRF_K, "w_grid": [f"{w:g}" for w in W_GRID], "per_seed": summaries, "pooled": pairs}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    notes = "\n" + args.notes.read_text() if args.notes else ""
    out.with_suffix(".md").write_text(markdown(result) + notes)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


def markdown(r: dict) -> str:
    lm, cf = r["lm"], r["cf"]
    keys = [f"recall@10 {lm}", f"recall@10 {cf}", "both_hit", "lm_only", "cf_only", "neither", "oracle_union", "rrf"]
    lines = [f"# Hybrid headroom: {lm} (LM) and {cf} on {r['env']}, run `{r['run']}`", "",
             "Test Recall@10 shares per seed (fractions of test cases). Written by `benchmarks/hybrid_headroom.py`.", "",
             "| seed | cases | " + " | ".join(keys) + " | fusion (w chosen on valid) | its valid R@10 select / confirm half |",
             "|---|---|" + "---|" * (len(keys) + 2)]
    for s in r["per_seed"]:
        w = s["chosen_w"]
        lines.append(f"| {s['seed']} | {s['n_test_cases']} | " + " | ".join(f"{s[k]:.4f}" for k in keys)
                     + f" | {s['fusion_test_by_w'][w]:.4f} (w={w}) | {s['fusion_valid_by_w'][w]['select']:.4f} / "
                     f"{s['fusion_valid_by_w'][w]['confirm']:.4f} ({s['n_valid_users']} users) |")
    lines += ["", "Pooled paired Δ Recall@10 over seeds (user-cluster bootstrap 95% CI) and the MDE (80% power):", "",
              "| comparison | Δ | 95% CI | MDE |", "|---|---|---|---|"]
    for name, d in r["pooled"].items():
        lines.append(f"| {name} | {d['delta']:+.4f} | [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}] | {d['mde']:.4f} |")
    lines += ["", "Score fusion's test Recall@10 for every w of the grid (a diagnostic: w is chosen on valid, not here):", "",
              "| seed | " + " | ".join(r["w_grid"]) + " |", "|---|" + "---|" * len(r["w_grid"])]
    for s in r["per_seed"]:
        lines.append(f"| {s['seed']} | " + " | ".join(f"{s['fusion_test_by_w'][w]:.4f}" for w in r["w_grid"]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
