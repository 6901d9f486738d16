"""Ratings → feedback levels {disliked, neutral, liked}.

Half-star scales (MovieLens 0.5–5) are first snapped to whole stars, then the integer thresholds apply.
With ``half_star: up`` (default) x.5 goes up (0.5→1, 1.5→2, 2.5→3, 3.5→4), so with the default
thresholds 0.5–1 → disliked, 1.5–3 → neutral, 3.5–5 → liked; ``half_star: down`` sends x.5 down
(0.5–1.5 → disliked, 2–3.5 → neutral, 4–5 → liked). Whole-star ratings are unaffected.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .errors import DataPrepError

LEVELS = ("disliked", "neutral", "liked")


def snap_half_stars(ratings: pd.Series, half_star: str = "up") -> pd.Series:
    if half_star == "up":
        return np.floor(ratings.astype(float) + 0.5)
    if half_star == "down":
        return np.ceil(ratings.astype(float) - 0.5)
    raise DataPrepError(f"parameter data_prep.feedback.half_star must be 'up' or 'down', got {half_star!r}")


def ratings_to_levels(
    ratings: pd.Series, disliked_max: float = 1, liked_min: float = 4, half_star: str = "up"
) -> pd.Series:
    """Level per rating; NaN ratings give a missing level."""
    if not disliked_max < liked_min:
        raise DataPrepError(
            "parameters data_prep.feedback.disliked_max < liked_min expected, "
            f"got disliked_max={disliked_max}, liked_min={liked_min}"
        )
    stars = snap_half_stars(ratings, half_star)
    level = np.where(stars <= disliked_max, "disliked", np.where(stars >= liked_min, "liked", "neutral"))
    out = pd.Series(level, index=ratings.index, dtype=object)
    out[ratings.isna()] = None
    return out


# A tiny lexicon, used only for interactions that carry a review but no rating.
_POSITIVE = set(
    "great excellent love loved perfect amazing awesome fantastic wonderful recommend recommended best happy "
    "solid superb favorite favourite beautiful good nice sturdy reliable".split()
)
_NEGATIVE = set(
    "bad poor terrible awful broke broken disappointing disappointed waste useless cheap flimsy worst return "
    "returned refund hate hated defective junk noisy".split()
)
_NEGATORS = {"not", "no", "never", "n't", "hardly"}


def review_sentiment_levels(reviews: pd.Series) -> pd.Series:
    """Lexicon polarity of a review text → level (missing where the text says nothing either way)."""

    def one(text: object) -> object:
        if not isinstance(text, str) or not text.strip():
            return None
        words = re.findall(r"[a-z']+", text.lower())
        score = 0
        for i, w in enumerate(words):
            sign = 1 if w in _POSITIVE else -1 if w in _NEGATIVE else 0
            if sign and any(p in _NEGATORS for p in words[max(0, i - 2) : i]):
                sign = -sign
            score += sign
        if score >= 2:
            return "liked"
        if score <= -1:
            return "disliked"
        return "neutral"

    return reviews.map(one).astype(object)
