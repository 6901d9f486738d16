"""Real-feedback preference pairs for RF-DPO: recommend, then ask the user's (recorded) feedback.

Only the training period is ever read: `feedback` rows with ``split == "train"``; valid and test
interactions never label anything, never become a chosen or a rejected item, never enter a prompt.

1. Levels. data_prep maps ratings to disliked / neutral / liked; rows with a review but no rating (level
   missing) are scored by a sentiment scorer (`align3gr_pipelines.preference.sentiment`). ``rating_to_level`` can
   re-map ratings with other thresholds: ``rating < neutral_min`` → disliked, ``rating >= liked_min`` →
   liked, neutral in between — so half-star scales need no special case (0.5–1.5 disliked, 2–3.5
   neutral, 4–5 liked with the defaults 2 and 4).
2. Prompts. Per user, the training prefix that precedes one of the user's liked training items (one row
   of `train_sequences`), as a SEQ prompt built by `prompts.seq_prompt`; the items after it are the
   prompt's future.
3. Recommend, then label. Each stage's own input policy recommends its top-K for that prompt
   (constrained beam search); each recommended item the user rated later takes that rating's level.
4. Pairs per stage (`build_feedback_pairs`), all from the prompt's future so that DPO pushes toward
   next-item prediction, not against it: chosen = the prompt's target (liked), rejected = later-rated
   items of the stage's rejected level(s) (easy: disliked, hard: neutral, mixed: both) the policy
   recommended, then the other later-rated ones; unrated recommendations only behind a switch. At most N;
   every source is counted per pair. (Before issue 15 the chosen item was the best-ranked liked
   recommendation from anywhere in the training period — often an item consumed before the prompt.)
5. The hard stage's rule (``rf_dpo.hard_stage``, issue 25). ``neutral`` is the paper's liked vs neutral. In the
   paper's industrial data "neutral" was shown but not clicked, i.e. not consumed; on rating data (MovieLens,
   Amazon) it is a consumed item with a middling rating, and on ml-latest-small 28% of the leave-one-out test
   targets are such items (34% with 2-3.5 stars as neutral), so pushing neutral items down works against
   next-item recall. ``disliked_hard`` keeps liked vs disliked and makes the negatives harder instead: the
   prompt's later-rated disliked items ranked by the input policy's exact log-probability
   (`policy_item_logprobs`, computed when the stage recommends), highest first.
   ``unrated_shown`` (liked vs shown-but-unrated) would need impressions, which no supported source records:
   it is refused with an error naming the parameter.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from align3gr_pipelines.sft.prompts import seq_prompt

LEVELS = ("disliked", "neutral", "liked")
STAGE_REJECTED = {
    "easy": ("disliked",), "hard": ("neutral",), "mixed": ("disliked", "neutral"), "disliked_hard": ("disliked",),
}
# rf_dpo.hard_stage → the pair rule of the hard slot (progressive mode).
HARD_STAGES = {"neutral": "hard", "disliked_hard": "disliked_hard"}
# Hard-stage rules that need impressions (items shown to the user and not consumed): no supported source has them.
NEEDS_IMPRESSIONS = ("unrated_shown",)
# Columns the recommendations of a disliked_hard stage carry: per prompt, the later-rated disliked items and the
# input policy's log-probability of each.
SCORE_COLUMNS = ("scored_items", "scored_logp")


def check_hard_stage(value: object) -> str:
    """The pair rule (a key of STAGE_REJECTED) of ``rf_dpo.hard_stage``, or a clear error."""
    if value in NEEDS_IMPRESSIONS:
        raise ValueError(
            f"parameters rf_dpo.hard_stage: {value!r} needs impressions (items shown to the user that they did not "
            "consume), and no supported data source (demo, movielens, lcrec_json, amazon2018) records them: its "
            "interactions are consumed items only. Use 'neutral' (the paper) or 'disliked_hard'."
        )
    if value not in HARD_STAGES:
        raise ValueError(f"parameters rf_dpo.hard_stage: expected one of {sorted(HARD_STAGES)}, got {value!r}")
    return HARD_STAGES[str(value)]


def rating_to_level(ratings: pd.Series, neutral_min: float = 2.0, liked_min: float = 4.0) -> pd.Series:
    """Ratings → levels (NaN stays missing): < neutral_min disliked, >= liked_min liked, else neutral."""
    if not neutral_min < liked_min:
        raise ValueError(f"rf_dpo.levels: need neutral_min < liked_min, got {neutral_min} and {liked_min}")
    r = pd.to_numeric(ratings, errors="raise").astype(float)
    out = pd.Series(np.where(r < neutral_min, "disliked", np.where(r >= liked_min, "liked", "neutral")), index=r.index, dtype=object)
    return out.where(r.notna(), None)


def _require(df: pd.DataFrame, name: str, cols: Sequence[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing} (columns: {list(df.columns)})")


def training_feedback(
    feedback: pd.DataFrame,
    interactions: pd.DataFrame | None,
    level_cfg: dict[str, Any],
    scorer_factory: Any = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Training-period feedback with a level on every row: (user_id, item_id, level, source, rating, timestamp).

    ``scorer_factory()`` builds a sentiment scorer, called only if some row needs one.
    """
    _require(feedback, "feedback", ["user_id", "item_id", "level", "split"])
    bad_split = set(feedback["split"].dropna().unique()) - {"train", "valid", "test"}
    if bad_split:
        raise ValueError(f"feedback.split: expected values in {{train, valid, test}}, got {sorted(bad_split)}")
    fb = feedback[feedback["split"] == "train"].copy()
    fb["user_id"], fb["item_id"] = fb["user_id"].astype(str), fb["item_id"].astype(str)
    for col, default in (("source", "rating"), ("rating", np.nan), ("timestamp", 0)):
        if col not in fb.columns:
            fb[col] = default
    fb["level"] = fb["level"].astype(object).where(fb["level"].notna(), None)
    neutral_min, liked_min = float(level_cfg.get("neutral_min", 2.0)), float(level_cfg.get("liked_min", 4.0))
    has_rating = fb["rating"].notna()
    relevel = has_rating if level_cfg.get("recompute_from_rating", False) else has_rating & fb["level"].isna()
    fb.loc[relevel, "level"] = rating_to_level(fb.loc[relevel, "rating"], neutral_min, liked_min)
    fb.loc[relevel, "source"] = "rating"

    need = fb["level"].isna()
    n_sentiment = 0
    if need.any():
        reviews = fb.get("review")
        if reviews is None and interactions is not None and "review" in interactions.columns:
            keys = ["user_id", "item_id"] + (["timestamp"] if "timestamp" in interactions.columns else [])
            inter = interactions[keys + ["review"]].copy()
            inter["user_id"], inter["item_id"] = inter["user_id"].astype(str), inter["item_id"].astype(str)
            inter = inter.drop_duplicates(keys, keep="last")
            reviews = fb[keys].merge(inter, on=keys, how="left")["review"].set_axis(fb.index)
        if reviews is not None:
            text = reviews.where(reviews.notna(), "").astype(str).str.strip()
            to_score = need & (text != "")
            if to_score.any():
                if scorer_factory is None:
                    raise ValueError("feedback: rows with a review but no level need a sentiment scorer")
                fb.loc[to_score, "level"] = scorer_factory().predict(text[to_score].tolist())
                fb.loc[to_score, "source"] = "review_sentiment"
                n_sentiment = int(to_score.sum())
    unlabelled = int(fb["level"].isna().sum())
    fb = fb[fb["level"].notna()]
    bad = set(fb["level"].unique()) - set(LEVELS)
    if bad:
        raise ValueError(f"feedback.level: expected values in {LEVELS}, got {sorted(bad)}")
    # One label per (user, item): the latest.
    fb = fb.sort_values(["user_id", "timestamp"], kind="stable").drop_duplicates(["user_id", "item_id"], keep="last")
    out = fb[["user_id", "item_id", "level", "source", "rating", "timestamp"]].reset_index(drop=True)
    counts = out["level"].value_counts()
    report = {
        "n_train_feedback": int(len(out)),
        "n_excluded_valid_test": int((feedback["split"] != "train").sum()),
        "n_relevelled_from_rating": int(relevel.sum()),
        "n_review_sentiment": n_sentiment,
        "n_unlabelled_dropped": unlabelled,
        "level_counts": {level: int(counts.get(level, 0)) for level in LEVELS},
        "level_fractions": {level: float(counts.get(level, 0) / max(len(out), 1)) for level in LEVELS},
        "source_counts": {str(k): int(v) for k, v in out["source"].value_counts().items()},
    }
    return out, report


def rated_reviews(
    feedback: pd.DataFrame, interactions: pd.DataFrame | None, max_reviews: int, seed: int,
    neutral_min: float = 2.0, liked_min: float = 4.0,
) -> tuple[list[str], list[str]]:
    """A seeded sample of training-period reviews that come with a rating: (texts, the ratings' levels).
    What a sentiment scorer can be checked (or calibrated) against on this data."""
    if interactions is None or max_reviews <= 0 or not {"review", "rating"} <= set(interactions.columns):
        return [], []
    train = feedback[feedback["split"] == "train"][["user_id", "item_id"]].astype(str).drop_duplicates()
    inter = interactions[interactions["rating"].notna() & interactions["review"].notna()].copy()
    inter["user_id"], inter["item_id"] = inter["user_id"].astype(str), inter["item_id"].astype(str)
    inter = inter[inter["review"].astype(str).str.strip() != ""].merge(train, on=["user_id", "item_id"])
    if len(inter) == 0:
        return [], []
    inter = inter.sample(n=min(max_reviews, len(inter)), random_state=seed)
    return inter["review"].astype(str).tolist(), rating_to_level(inter["rating"], neutral_min, liked_min).tolist()


def agreement(truth: Sequence[str], pred: Sequence[str]) -> dict[str, Any]:
    """Accuracy and confusion counts (truth → predicted) of predicted levels against rating levels."""
    confusion = {t: {p: sum(1 for a, b in zip(truth, pred) if a == t and b == p) for p in LEVELS} for t in LEVELS}
    return {"n_reviews": len(truth), "accuracy": float(np.mean([a == b for a, b in zip(truth, pred)])), "confusion": confusion}


PROMPT_POSITIONS = ("latest_liked", "random_liked")


def user_prompts(
    train_sequences: pd.DataFrame,
    levels: pd.DataFrame,
    item_tokens: dict[str, str],
    user_tokens: dict[str, str] | None,
    template_id: int,
    max_users: int | None,
    seed: int,
    max_history: int | None = None,
    position: str = "latest_liked",
) -> tuple[pd.DataFrame, dict[str, int]]:
    """One prompt per user: the training prefix before one of the user's liked training items (the
    prompt's target, so the chosen response is the user's true next item), cut to the last
    `max_history` items so the prompt looks like the SEQ prompts the policy was trained on.

    ``position``: ``latest_liked`` (the latest liked transition) or ``random_liked`` (a seeded pick among
    the liked transitions that have at least one later-rated non-liked item, else among all liked ones:
    a prompt earlier in the history leaves a future to draw rejected items from). Column ``future`` lists
    the user's training items after the target (later positions), nearest first."""
    _require(train_sequences, "train_sequences", ["user_id", "history", "target", "position"])
    if position not in PROMPT_POSITIONS:
        raise ValueError(f"parameters rf_dpo.prompts.position: expected one of {PROMPT_POSITIONS}, got {position!r}")
    seqs = train_sequences.copy()
    seqs["user_id"], seqs["target"] = seqs["user_id"].astype(str), seqs["target"].astype(str)
    seqs = seqs.sort_values(["user_id", "position"], kind="stable")
    label = {(u, i): lv for u, i, lv in zip(levels["user_id"].astype(str), levels["item_id"].astype(str), levels["level"])}
    rng = np.random.default_rng(seed)
    picked = []
    n_users = seqs["user_id"].nunique()
    for user, g in seqs.groupby("user_id", sort=True):
        targets = g["target"].tolist()
        liked = [k for k, t in enumerate(targets) if label.get((user, t)) == "liked"]
        if not liked:
            continue
        if position == "latest_liked":
            k = liked[-1]
        else:
            with_future = [k for k in liked if any(label.get((user, t)) in ("disliked", "neutral") for t in targets[k + 1 :])]
            pool = with_future or liked
            k = pool[int(rng.integers(len(pool)))]
        row = g.iloc[k]
        picked.append((user, [str(i) for i in row.history], row.target, int(row.position), targets[k + 1 :]))
    n_with_liked = len(picked)
    if max_users is not None and len(picked) > max_users:
        keep = np.sort(np.random.default_rng(seed).choice(len(picked), int(max_users), replace=False))
        picked = [picked[i] for i in keep]
    rows = []
    for user, hist, target, pos, future in picked:
        shown = hist[-max_history:] if max_history is not None and max_history > 0 else ([] if max_history == 0 else hist)
        if any(i not in item_tokens for i in shown + [target]):
            continue
        prompt = seq_prompt([item_tokens[i] for i in shown], (user_tokens or {}).get(user), template_id)
        rows.append({"user_id": user, "prompt": prompt, "history": hist, "target": target, "position": pos, "future": future})
    out = pd.DataFrame(rows, columns=["user_id", "prompt", "history", "target", "position", "future"])
    stats = {"n_users": int(n_users), "n_users_without_liked_train_item": int(n_users - n_with_liked), "n_prompts": int(len(out))}
    return out, stats


def disliked_candidates(prompts: pd.DataFrame, levels: pd.DataFrame) -> list[list[str]]:
    """Per prompt, the items a ``disliked_hard`` stage may reject: the prompt's ``future`` items (not in its
    history) the user rated disliked in the training period, once each, nearest first."""
    _require(prompts, "rf_dpo prompts", ["user_id", "history", "future"])
    label_of = {u: dict(zip(g["item_id"].astype(str), g["level"])) for u, g in levels.groupby("user_id")}
    out = []
    for p in prompts.itertuples(index=False):
        label = label_of.get(p.user_id, {})
        before = set(map(str, p.history))
        later = [str(i) for i in p.future if str(i) not in before and label.get(str(i)) == "disliked"]
        out.append(list(dict.fromkeys(later)))
    return out


def rank_by_score(items: Sequence[str], scores: dict[str, float]) -> list[str]:
    """``items`` by score, highest first; equal scores keep their order (nearest first)."""
    missing = [i for i in items if i not in scores]
    if missing:
        raise ValueError(f"rf_dpo disliked_hard: no policy score for item(s) {missing[:5]} (column scored_items)")
    return [i for _, i in sorted(enumerate(items), key=lambda t: (-float(scores[t[1]]), t[0]))]


def policy_item_logprobs(
    policy: Any, prompts: Sequence[str], item_scids: pd.DataFrame, candidates: Sequence[Sequence[str]], batch_size: int,
) -> list[list[float]]:
    """The policy's exact sequence log-probability of each candidate item's SCID after its prompt (the score the
    constrained decoder ranks by), one list per prompt."""
    import torch

    from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, item_logprobs
    from align3gr_pipelines.lm.rec_lm import encode_prompt

    if len(prompts) != len(candidates):
        raise ValueError(f"policy_item_logprobs: {len(prompts)} prompts for {len(candidates)} candidate lists")
    width = max((len(c) for c in candidates), default=0)
    if width == 0:
        return [[] for _ in candidates]
    tok = policy.tokenizer
    catalog = SCIDCatalog.from_scids(item_scids, tok)
    index = {str(iid): k for k, iid in enumerate(catalog.item_ids)}
    missing = sorted({i for c in candidates for i in c if i not in index})
    if missing:
        raise ValueError(f"rf_dpo disliked_hard: item(s) {missing[:5]} have no SCID in item_scids")
    cand = torch.full((len(candidates), width), -1, dtype=torch.long)
    for r, items in enumerate(candidates):
        cand[r, : len(items)] = torch.as_tensor([index[i] for i in items], dtype=torch.long)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lp = item_logprobs(policy.model, [encode_prompt(tok, p) for p in prompts], catalog, cand, batch_size=batch_size,
                       pad_token_id=pad)
    return [lp[r, : len(items)].tolist() for r, items in enumerate(candidates)]


def build_feedback_pairs(
    prompts: pd.DataFrame,
    recommendations: pd.DataFrame,
    levels: pd.DataFrame,
    stage: str,
    n_rejected: int,
    pad_with_unrated: bool,
    item_tokens: dict[str, str],
    item_codes: dict[str, Sequence[int]],
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Pairs of one RF-DPO stage ('easy', 'hard', 'mixed' or 'disliked_hard') from prompts (user_id, prompt,
    history, target, future; for 'disliked_hard' also SCORE_COLUMNS), recommendations (user_id, rank, item_id)
    and training-period levels.

    Everything is relative to the prompt: chosen = the prompt's target (the user's true next item) when
    liked, else the nearest liked item of its ``future``; rejected = ``future`` items of the stage's
    level(s) that the policy recommended (rank order), then the other ``future`` items of those levels
    (nearest first), then — only if ``pad_with_unrated`` — recommendations the user never rated (they may
    be the user's true future, hence off by default). 'disliked_hard' orders the ``future`` disliked items by
    the policy's score instead (highest first; source 'recommended' when the policy's top-K holds the item,
    else 'later_rated'), then pads the same way. Nothing in the prompt's history or before the prompt is ever
    chosen or rejected.

    Stats: pairs built and dropped, where the rejected items came from (``n_from_*``), and the pools they were
    drawn from over the prompts that have a chosen item (``pool_*``; ``n_pool_not_kept``: pool items of the
    stage's level(s) left out by the cap ``n_rejected``)."""
    if stage not in STAGE_REJECTED:
        raise ValueError(f"rf_dpo stage must be one of {sorted(STAGE_REJECTED)}, got {stage!r}")
    _require(prompts, "rf_dpo prompts", ["user_id", "prompt", "history", "target", "future"])
    by_score = stage == "disliked_hard"
    if by_score:
        _require(prompts, "rf_dpo prompts of a disliked_hard stage", list(SCORE_COLUMNS))
    rejected_levels = set(STAGE_REJECTED[stage])
    recs = recommendations.sort_values(["user_id", "rank"]).groupby("user_id")["item_id"].apply(list).to_dict()
    label_of = {u: dict(zip(g["item_id"].astype(str), g["level"])) for u, g in levels.groupby("user_id")}
    rows = []
    counts = {"chosen_target": 0, "chosen_later_liked": 0, "dropped_no_liked_future": 0, "dropped_no_rejected": 0}
    pools = {"pool_later_rated": 0, "pool_recommended": 0, "pool_unrated_recommended": 0}
    for p in prompts.itertuples(index=False):
        label = label_of.get(p.user_id, {})
        before = set(map(str, p.history))
        future = [str(i) for i in p.future if str(i) not in before]
        future_set = set(future)
        if label.get(str(p.target)) == "liked":
            chosen, chosen_source = str(p.target), "target"
        else:
            later = [i for i in future if label.get(i) == "liked"]
            if not later:
                counts["dropped_no_liked_future"] += 1
                continue
            chosen, chosen_source = later[0], "later_liked"
        rec = [i for i in recs.get(p.user_id, []) if i not in before]
        rec_set = set(rec)
        pool = {i for i in future if label.get(i) in rejected_levels} - {chosen}
        pools["pool_later_rated"] += len(pool)
        pools["pool_recommended"] += len(pool & rec_set)
        pools["pool_unrated_recommended"] += len({i for i in rec if i not in label} - {chosen})
        rejected: list[tuple[str, str, str]] = []  # (item, level, source)
        seen = {chosen}

        def add(item: str, level: str, source: str) -> None:
            if len(rejected) < n_rejected and item not in seen:
                rejected.append((item, level, source))
                seen.add(item)

        if by_score:
            scores = dict(zip(map(str, p.scored_items), map(float, p.scored_logp)))
            ranked = rank_by_score(list(dict.fromkeys(i for i in future if label.get(i) in rejected_levels)), scores)
            for i in ranked:
                add(i, label[i], "recommended" if i in rec_set else "later_rated")
        else:
            for i in rec:
                if i in future_set and label.get(i) in rejected_levels:
                    add(i, label[i], "recommended")
            for i in future:
                if label.get(i) in rejected_levels:
                    add(i, label[i], "later_rated")
        if pad_with_unrated:
            for i in rec:
                if i not in label:
                    add(i, "unrated", "unrated_recommendation")
        if not rejected:
            counts["dropped_no_rejected"] += 1
            continue
        counts[f"chosen_{chosen_source}"] += 1
        items = [r[0] for r in rejected]
        sources = [r[2] for r in rejected]
        cc = np.asarray(item_codes[chosen])
        rows.append(
            {
                "prompt": p.prompt,
                "user_id": p.user_id,
                "chosen": chosen,
                "chosen_tokens": item_tokens[chosen],
                "chosen_source": chosen_source,
                "rejected": items,
                "rejected_tokens": [item_tokens[i] for i in items],
                "rejected_level": [r[1] for r in rejected],
                "rejected_source": sources,
                "overlap": [int(np.cumprod(np.asarray(item_codes[i]) == cc).sum()) for i in items],
                "n_from_recommendations": sources.count("recommended"),
                "n_from_later_rated": sources.count("later_rated"),
                "n_from_unrated": sources.count("unrated_recommendation"),
                "filled": sources.count("later_rated") + sources.count("unrated_recommendation"),
            }
        )
    pairs = pd.DataFrame(rows, columns=RF_PAIR_COLUMNS)
    stats = {k: float(v) for k, v in counts.items()}
    stats["n_pairs"] = float(len(pairs))
    for col in ("n_from_recommendations", "n_from_later_rated", "n_from_unrated"):
        stats[col] = float(pairs[col].sum()) if len(pairs) else 0.0
    stats["mean_rejected_per_pair"] = float(pairs["rejected"].map(len).mean()) if len(pairs) else 0.0
    stats["n_prompts"] = float(len(prompts))
    stats.update({k: float(v) for k, v in pools.items()})
    stats["n_pool_not_kept"] = stats["pool_later_rated"] - stats["n_from_recommendations"] - stats["n_from_later_rated"]
    return pairs, stats


RF_PAIR_COLUMNS = [
    "prompt", "user_id", "chosen", "chosen_tokens", "chosen_source", "rejected", "rejected_tokens", "rejected_level",
    "rejected_source", "overlap", "n_from_recommendations", "n_from_later_rated", "n_from_unrated", "filled",
]


def empty_feedback_pairs() -> pd.DataFrame:
    import pyarrow as pa

    s, ls = pa.string(), pa.list_(pa.string())
    schema = pa.schema(
        [("prompt", s), ("user_id", s), ("chosen", s), ("chosen_tokens", s), ("chosen_source", s), ("rejected", ls),
         ("rejected_tokens", ls), ("rejected_level", ls), ("rejected_source", ls), ("overlap", pa.list_(pa.int64())),
         ("n_from_recommendations", pa.int64()), ("n_from_later_rated", pa.int64()), ("n_from_unrated", pa.int64()),
         ("filled", pa.int64())]
    )
    return schema.empty_table().to_pandas()
