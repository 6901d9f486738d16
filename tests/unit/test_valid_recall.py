"""valid_recall: the seeded valid sample and Recall@K with the constrained decoder, checked against the
decoder's own top-K and a hand-made target placement."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from align3gr_pipelines.evaluation.valid_recall import build_valid_sample, recall_at_k, sample_valid_prompts
from align3gr_pipelines.lm.constrained_decoding import decode_prompts
from tests.pipelines.evaluation.conftest import make_dataset, make_rec_lm


@pytest.fixture(scope="module")
def world():
    data = make_dataset(n_users=30, n_items=40)
    return data, make_rec_lm(data["tokenizer"], seed=0, stage="sft")


def test_sample_is_seeded_sorted_and_valid_only(world):
    data, _ = world
    prompts = data["seq_eval_prompts"]
    a = sample_valid_prompts(prompts, 10, seed=3)
    b = sample_valid_prompts(prompts.sample(frac=1.0, random_state=1), 10, seed=3)  # row order must not matter
    assert a["user_id"].tolist() == b["user_id"].tolist()
    assert len(a) == 10 and set(a["split"]) == {"valid"}
    assert a["user_id"].tolist() == sorted(a["user_id"].tolist())
    assert sample_valid_prompts(prompts, 10, seed=4)["user_id"].tolist() != a["user_id"].tolist()
    assert len(sample_valid_prompts(prompts, None, seed=3)) == 30


def test_recall_counts_hits_in_the_decoders_top_k(world):
    data, rec = world
    rows = sample_valid_prompts(data["seq_eval_prompts"], None, seed=0)
    sample = build_valid_sample(rows, data["item_scids"], rec.tokenizer)
    idx, _ = decode_prompts(rec, sample.prompts, sample.catalog, beam_width=20, top_k=5, batch_size=8)
    # Put the target of the first 12 users at their rank-3 recommendation, the rest at an item never ranked.
    planted = sample.target_index.copy()
    planted[:12] = idx[:12, 2].numpy()
    for u in range(12, len(planted)):
        planted[u] = next(i for i in range(sample.catalog.n_items) if i not in set(idx[u].tolist()))
    sample.target_index = planted
    assert recall_at_k(rec, sample, k=5, beam_width=20, batch_size=8) == pytest.approx(12 / len(planted))
    assert recall_at_k(rec, sample, k=2, beam_width=20, batch_size=8) == 0.0


def test_targets_outside_the_catalogue_are_dropped_and_bad_input_named(world):
    data, rec = world
    rows = sample_valid_prompts(data["seq_eval_prompts"], 5, seed=0)
    rows.loc[0, "target"] = "not-an-item"
    assert len(build_valid_sample(rows, data["item_scids"], rec.tokenizer)) == 4
    with pytest.raises(ValueError, match="lacks columns"):
        sample_valid_prompts(pd.DataFrame({"prompt": ["x"]}), 5, seed=0)
    with pytest.raises(ValueError, match="no row with split == 'valid'"):
        sample_valid_prompts(data["seq_eval_prompts"].query("split == 'test'"), 5, seed=0)
    assert np.issubdtype(build_valid_sample(rows, data["item_scids"], rec.tokenizer).target_index.dtype, np.integer)
