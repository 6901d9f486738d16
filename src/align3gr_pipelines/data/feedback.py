"""The `feedback` table: one row per interaction that carries a rating (or, failing that, a review)."""
from __future__ import annotations

import pandas as pd

from .feedback_levels import ratings_to_levels, review_sentiment_levels
from .splitting import period_of_interactions

FEEDBACK_COLUMNS = ["user_id", "item_id", "level", "source", "rating", "timestamp", "split"]


def build_feedback(interactions: pd.DataFrame, params: dict, holdout: tuple[int, int] = (1, 1)) -> pd.DataFrame:
    """`holdout` = (k_valid, k_test) of the split, so each row's period matches it."""
    fb = interactions[["user_id", "item_id", "rating", "timestamp"]].copy()
    fb["split"] = period_of_interactions(interactions, *holdout)
    level = ratings_to_levels(
        fb["rating"],
        disliked_max=float(params.get("disliked_max", 1)),
        liked_min=float(params.get("liked_min", 4)),
        half_star=str(params.get("half_star", "up")),
    )
    fb["source"] = pd.Series("rating", index=fb.index, dtype=object)
    no_rating = fb["rating"].isna()
    if no_rating.any() and params.get("use_review_sentiment", True):
        level[no_rating] = review_sentiment_levels(interactions.loc[no_rating, "review"])
        fb.loc[no_rating, "source"] = "review_sentiment"
    fb["level"] = level
    fb = fb[fb["level"].notna()]
    return fb[FEEDBACK_COLUMNS].reset_index(drop=True)
