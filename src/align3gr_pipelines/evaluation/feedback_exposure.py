"""Where real-feedback DPO acts: hits on held-out items the user liked vs rated low, and how many users get
a low-rated held-out item in their top K (issue 25, item 3).

Each evaluated case (one per user under leave-one-out, k_test per user under a suffix holdout) has its own
top-K list and its held-out target; `feedback` gives that target's rating and level (matched on split,
user_id, item_id). A case is

- *liked* when its level is ``liked`` (data_prep.feedback.liked_min, after half-star snapping), and
- *disliked* when its rating is <= ``disliked_max_rating`` (a parameter of this report, 1.5 stars by
  default: with data_prep's default snapping a 1.5-star rating is "neutral", so the level alone would miss
  it). A case with no rating is neither disliked nor counted as unrated-liked unless its level says liked.

A case's hit h is its tie-aware Recall@K (`metrics.recall_at_k` over the whole kept list: the expected hit
under a random order of tied items). Per split and model, over the split's users U:

- ``liked_hits@K`` = mean over U of the user's summed h over liked cases (users without one count 0);
- ``disliked_hits@K`` likewise over disliked cases;
- ``liked_recall@K`` = mean, over users with at least one liked case, of their liked hits / liked cases
  (``disliked_recall@K`` likewise);
- ``disliked_exposure@K`` = share of users with at least one disliked case who get at least one of them in
  that case's top K: per user 1 - prod(1 - h) over their disliked cases (tie-breaks of different lists
  independent), averaged over those users;
- ``disliked_to_liked_hits@K`` = sum of disliked hits / sum of liked hits over U.

"At matched liked recall": recall on liked and on disliked targets move together when a model simply
retrieves held-out items better, so a lower exposure alone may only mean lower recall. The ratio
disliked / liked hits is unchanged by a uniform change in retrieval and falls only when disliked targets
leave the top K faster than liked ones; exposure is therefore reported beside liked recall and with that
ratio, and two models are compared on exposure only where their liked-recall CIs overlap (or on the ratio).
No list is truncated or re-ranked to force equal liked recall.

CIs: percentile bootstrap over the users each figure averages over (`metrics.bootstrap_ci`; for the ratio,
`metrics.bootstrap_ratio_ci` over U), the same resamples for every model. Without ratings on the held-out
targets (e.g. the LC-Rec JSON sources) the report is skipped with the reason, never an error.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from align3gr_pipelines.evaluation.metrics import bootstrap_ci, bootstrap_ratio_ci, case_lists, recall_at_k

EXPOSURE_COLUMNS = ["model", "split", "metric", "value", "ci_low", "ci_high", "n_users", "n_cases"]
PER_USER_COLUMNS = ["model", "split", "user_id", "liked_cases", "liked_hits", "disliked_cases", "disliked_hits",
                    "disliked_exposed"]
# Metric names without the @K, in table order.
METRICS = ("liked_recall", "liked_hits", "disliked_hits", "disliked_to_liked_hits", "disliked_recall", "disliked_exposure")


@dataclass(frozen=True)
class ExposureSettings:
    enabled: bool
    k: int
    disliked_max_rating: float


def exposure_settings(params: dict[str, Any] | None, top_k: int) -> ExposureSettings:
    """`evaluation.feedback_exposure` checked: k in [1, top_k] (only the kept list is ranked)."""
    cfg = dict(params or {})
    unknown = set(cfg) - {"enabled", "k", "disliked_max_rating"}
    if unknown:
        raise ValueError(f"evaluation.feedback_exposure: unknown keys {sorted(unknown)}; expected enabled, k, disliked_max_rating")
    k = cfg.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= int(top_k):
        raise ValueError(f"evaluation.feedback_exposure.k must be an integer in [1, evaluation.top_k={top_k}], got {k!r}")
    cut = cfg.get("disliked_max_rating", 1.5)
    if isinstance(cut, bool) or not isinstance(cut, (int, float)) or not np.isfinite(cut):
        raise ValueError(f"evaluation.feedback_exposure.disliked_max_rating must be a number (stars), got {cut!r}")
    return ExposureSettings(bool(cfg.get("enabled", True)), int(k), float(cut))


def case_feedback(eval_cases: pd.DataFrame, feedback: pd.DataFrame) -> pd.DataFrame:
    """rating (NaN when unknown) and level (None) of each case's target, index aligned with `eval_cases`.
    Matched on (split, user_id, item_id) when `feedback` has a split column, else on (user_id, item_id); a
    pair rated several times in one period keeps its latest row (by timestamp when there is one)."""
    missing = [c for c in ("user_id", "item_id", "level") if c not in feedback.columns]
    if missing:
        raise ValueError(f"feedback exposure: dataset 'feedback' lacks column(s) {missing} (columns: {list(feedback.columns)})")
    fb = pd.DataFrame({
        "user_id": feedback["user_id"].astype(str).to_numpy(), "item_id": feedback["item_id"].astype(str).to_numpy(),
        "rating": pd.to_numeric(feedback["rating"], errors="coerce").to_numpy(dtype=float) if "rating" in feedback.columns
        else np.full(len(feedback), np.nan),
        "level": feedback["level"].to_numpy(dtype=object),
    })
    key = ["user_id", "item_id"]
    if "split" in feedback.columns:
        fb["split"] = feedback["split"].astype(str).to_numpy()
        key = ["split", *key]
    if "timestamp" in feedback.columns:
        fb = fb.iloc[np.argsort(feedback["timestamp"].to_numpy(), kind="stable")]
    fb = fb.drop_duplicates(key, keep="last")
    cases = pd.DataFrame({"split": eval_cases["split"].astype(str).to_numpy(), "user_id": eval_cases["user_id"].astype(str).to_numpy(),
                          "item_id": eval_cases["target"].astype(str).to_numpy()})
    out = cases.merge(fb, on=key, how="left")[["rating", "level"]]
    out.index = eval_cases.index
    return out


def skip_reason(case_fb: pd.DataFrame, feedback: pd.DataFrame) -> str | None:
    """Why the report cannot be made, or None: no held-out target has a rating."""
    if "rating" not in feedback.columns:
        return "dataset 'feedback' has no rating column: the source gives no ratings"
    if case_fb["rating"].notna().any():
        return None
    if feedback["rating"].notna().any():
        return "no evaluated held-out target has a rating in 'feedback' (ratings exist for other interactions only)"
    return "no rating in 'feedback': the source gives no ratings (e.g. LC-Rec JSON / Instruments)"


def per_user_feedback_hits(
    recommendations: pd.DataFrame, eval_cases: pd.DataFrame, case_fb: pd.DataFrame, models: list[str], k: int,
    disliked_max_rating: float,
) -> pd.DataFrame:
    """PER_USER_COLUMNS per model, split and user (every user of the split, also those without a liked or a
    disliked case); disliked_exposed is NaN for a user without a disliked case (module doc)."""
    liked_all = (case_fb["level"] == "liked").to_numpy()
    disliked_all = (case_fb["rating"] <= disliked_max_rating).to_numpy()  # NaN compares False
    frames = []
    for split, cases in eval_cases.groupby("split", sort=False):
        pos = eval_cases.index.get_indexer(cases.index)
        liked, disliked = liked_all[pos], disliked_all[pos]
        users = cases["user_id"].astype(str).to_numpy()
        recs = recommendations[recommendations["split"] == split]
        for model in models:
            items, scores = case_lists(recs[recs["model"] == model], cases, k)
            hit = recall_at_k(items, cases["target"].astype(str).tolist(), k, scores)
            with np.errstate(divide="ignore"):
                log_miss = np.where(disliked, np.log1p(-np.minimum(hit, 1.0)), 0.0)
            per_case = pd.DataFrame({
                "user_id": users, "liked_cases": liked.astype(np.int64), "liked_hits": np.where(liked, hit, 0.0),
                "disliked_cases": disliked.astype(np.int64), "disliked_hits": np.where(disliked, hit, 0.0),
                # log(1 - h) summed per user is log P(no disliked hit); h = 1 gives -inf, i.e. surely exposed
                "log_miss": log_miss,
            })
            grouped = per_case.groupby("user_id", sort=False).sum()
            exposed = np.where(grouped["disliked_cases"] > 0, 1.0 - np.exp(grouped["log_miss"]), np.nan)
            frames.append(grouped.drop(columns="log_miss").assign(disliked_exposed=exposed, model=model, split=str(split))
                          .reset_index())
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in PER_USER_COLUMNS})
    return pd.concat(frames, ignore_index=True)[PER_USER_COLUMNS]


def exposure_table(per_user: pd.DataFrame, models: list[str], k: int, n_boot: int, conf: float, seed: int) -> pd.DataFrame:
    """The EXPOSURE_COLUMNS summary of `per_user_feedback_hits` (module doc), metrics in METRICS order.
    n_users: the users a figure averages over; n_cases: the held-out cases of its kind among them."""
    rows: list[dict[str, Any]] = []
    for split, part in per_user.groupby("split", sort=False):
        wide = {m: part[part["model"] == m].reset_index(drop=True) for m in models}
        first = wide[models[0]]
        n_liked, n_disliked = int(first["liked_cases"].sum()), int(first["disliked_cases"].sum())
        has_liked, has_disliked = (first["liked_cases"] > 0).to_numpy(), (first["disliked_cases"] > 0).to_numpy()

        def stack(column: str, mask: np.ndarray | None = None) -> np.ndarray:
            cols = [wide[m][column].to_numpy(dtype=float) for m in models]
            x = np.stack(cols, axis=1)
            return x if mask is None else x[mask]

        liked_hits, disliked_hits = stack("liked_hits"), stack("disliked_hits")
        series = {
            "liked_recall": (stack("liked_hits", has_liked) / stack("liked_cases", has_liked), n_liked),
            "liked_hits": (liked_hits, n_liked),
            "disliked_hits": (disliked_hits, n_disliked),
            "disliked_to_liked_hits": (None, n_disliked + n_liked),
            "disliked_recall": (stack("disliked_hits", has_disliked) / stack("disliked_cases", has_disliked), n_disliked),
            "disliked_exposure": (stack("disliked_exposed", has_disliked), n_disliked),
        }
        for name in METRICS:
            values, n_cases = series[name]
            if name == "disliked_to_liked_hits":
                total_l, total_d = liked_hits.sum(axis=0), disliked_hits.sum(axis=0)
                point = np.where(total_l > 0, total_d / np.where(total_l > 0, total_l, 1.0), np.nan)
                low, high = bootstrap_ratio_ci(disliked_hits, liked_hits, n_boot, conf, seed)
                n_users = len(first)
            elif len(values):
                point = values.mean(axis=0)
                low, high = bootstrap_ci(values, n_boot, conf, seed)
                n_users = len(values)
            else:  # no user with a case of this kind (e.g. no disliked target in the split)
                point = low = high = np.full(len(models), np.nan)
                n_users = 0
            for j, model in enumerate(models):
                rows.append({"model": model, "split": str(split), "metric": f"{name}@{k}", "value": float(point[j]),
                             "ci_low": float(low[j]), "ci_high": float(high[j]), "n_users": int(n_users), "n_cases": int(n_cases)})
    return pd.DataFrame(rows, columns=EXPOSURE_COLUMNS).astype({"n_users": "int64", "n_cases": "int64"})


def empty_table() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64" if c in ("value", "ci_low", "ci_high") else "int64" if c.startswith("n_")
                                      else "object") for c in EXPOSURE_COLUMNS})


def feedback_exposure(
    recommendations: pd.DataFrame, eval_cases: pd.DataFrame, feedback: pd.DataFrame, models: list[str],
    settings: ExposureSettings, n_boot: int, conf: float, seed: int,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(summary table, info); an empty table and info["skipped"] = the reason when the report cannot be made."""
    info: dict[str, Any] = {"k": settings.k, "disliked_max_rating": settings.disliked_max_rating, "liked": "level == liked",
                            "bootstrap": {"n_resamples": int(n_boot), "confidence": float(conf)}}
    if not settings.enabled:
        return empty_table(), {**info, "skipped": "disabled in parameters (evaluation.feedback_exposure.enabled: false)"}
    if not models:
        return empty_table(), {**info, "skipped": "no model was evaluated"}
    case_fb = case_feedback(eval_cases, feedback)
    reason = skip_reason(case_fb, feedback)
    if reason:
        return empty_table(), {**info, "skipped": reason}
    per_user = per_user_feedback_hits(recommendations, eval_cases, case_fb, models, settings.k, settings.disliked_max_rating)
    table = exposure_table(per_user, models, settings.k, n_boot, conf, seed)
    counts = {}
    for split, part in eval_cases.groupby("split", sort=False):
        fb = case_fb.loc[part.index]
        liked, disliked = fb["level"] == "liked", fb["rating"] <= settings.disliked_max_rating
        counts[str(split)] = {
            "users": int(part["user_id"].nunique()), "cases": len(part), "rated_cases": int(fb["rating"].notna().sum()),
            "liked_cases": int(liked.sum()), "disliked_cases": int(disliked.sum()),
            "users_with_liked": int(part.loc[liked, "user_id"].nunique()),
            "users_with_disliked": int(part.loc[disliked, "user_id"].nunique()),
        }
    return table, {**info, "splits": counts}


def exposure_markdown(table: pd.DataFrame, info: dict[str, Any]) -> str:
    """The metrics.md section: one table per split, or the reason the report was skipped."""
    k = info["k"]
    lines = [f"## Feedback exposure (top {k})", ""]
    if info.get("skipped"):
        return "\n".join(lines + [f"Skipped: {info['skipped']}.", ""])
    conf = int(round(100 * info["bootstrap"]["confidence"]))
    lines += [
        f"Per held-out case, the target counts as liked when its feedback level is `liked` and as disliked when "
        f"rated <= {info['disliked_max_rating']:g} stars; a hit is tie-aware Recall@{k} on that case's list. "
        f"Liked / disliked hits: per user, hits summed over those cases, mean over all users. Exposure: share of "
        f"users with a disliked held-out item who get at least one in its top {k}. Read exposure beside liked "
        f"recall (at matched liked recall) or use disliked / liked hits, which a uniform change in retrieval "
        f"leaves unchanged. Mean with {conf}% bootstrap CI over users.", ""]
    names = [f"{m}@{k}" for m in METRICS]
    heads = ["liked recall", "liked hits", "disliked hits", "disliked / liked hits", "disliked recall", "disliked exposure"]
    for split, part in table.groupby("split", sort=False):
        c = info.get("splits", {}).get(split, {})
        lines += [f"### {split} ({c.get('users', '?')} users; {c.get('liked_cases', '?')} liked cases of "
                  f"{c.get('users_with_liked', '?')} users, {c.get('disliked_cases', '?')} disliked of "
                  f"{c.get('users_with_disliked', '?')} users)", "",
                  "| model | " + " | ".join(heads) + " |", "|---" * (1 + len(heads)) + "|"]
        for model, m in part.groupby("model", sort=False):
            cell = {r.metric: ("–" if np.isnan(r.value) else f"{r.value:.4f} [{r.ci_low:.4f}, {r.ci_high:.4f}]")
                    for r in m.itertuples()}
            lines.append(f"| {model} | " + " | ".join(cell.get(n, "–") for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def exposure_scalars(table: pd.DataFrame, key: Any) -> dict[str, float]:
    """MLflow scalars <split>/<model>/<metric with _at_> of the defined figures."""
    return {key(r.split, r.model, r.metric.replace("@", "_at_")): float(r.value) for r in table.itertuples()
            if not np.isnan(r.value)}
