"""Table 3 ablation switches change what they should and only that; same seed, same SCIDs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from align3gr_pipelines.pipelines.tokenization import nodes

from .conftest import SEED, tiny_params, tokenize


def config_diff(a: dict, b: dict) -> set[str]:
    return {k for k in a if a[k] != b.get(k)}


def assert_unique_item_scids(run):
    items = run["item_scids"]
    assert items["tokens"].is_unique
    assert len({len(c) for c in items["codes"]}) == 1


def test_default_run_outputs(default_run, dataset):
    assert_unique_item_scids(default_run)
    assert len(default_run["user_scids"]) == len(dataset["users"])
    assert default_run["user_scids"]["tokens"].str.startswith("<u0_").all()
    assert "phase1_auc" in default_run["log"]["scalars"] and "phase2_item_recon_loss" in default_run["log"]["curves"]


def test_same_seed_gives_identical_scids(default_run, dataset, features):
    again = tokenize(dataset, features, tiny_params())
    pd.testing.assert_frame_equal(again["item_scids"], default_run["item_scids"])
    pd.testing.assert_frame_equal(again["user_scids"], default_run["user_scids"])


def test_another_seed_trains_another_tokenizer(default_run, dataset, features):
    other = tokenize(dataset, features, tiny_params(), seed=SEED + 1)
    a = np.stack(other["item_sc"]["embedding"])
    b = np.stack(default_run["item_sc"]["embedding"])
    assert not np.allclose(a, b)


def test_collaborative_encoder_is_deterministic(dataset, features):
    model, log = nodes.train_collaborative_encoder(dataset["items"], dataset["train_sequences"], dataset["valid"], tiny_params(), SEED)
    item_cf, user_cf = nodes.extract_cf_embeddings(model, dataset["items"], dataset["users"], dataset["train_sequences"], dataset["valid"], log)
    pd.testing.assert_frame_equal(item_cf, features["item_cf_embeddings"])
    pd.testing.assert_frame_equal(user_cf, features["user_cf_embeddings"])


def test_item_only_drops_user_scids_and_nothing_else(default_run, dataset, features):
    run = tokenize(dataset, features, tiny_params(user_scids=False))
    assert config_diff(run["tok"].config, default_run["tok"].config) == {"user_scids"}
    assert run["tok"].user_rq is None and default_run["tok"].user_rq is not None
    assert len(run["user_scids"]) == 0 and list(run["user_scids"].columns) == ["id", "codes", "tokens"]
    assert set(run["report"]) == {"item"}
    assert_unique_item_scids(run)
    # user SC embeddings still exist: the U2I alignment still needs the user side
    assert len(run["user_sc"]) == len(dataset["users"])
    assert not any(k.startswith("phase2_user_") for k in run["log"]["curves"])


def test_semantic_only_ignores_cf_features(default_run, dataset, features):
    params = tiny_params(cf_features=False)
    run = tokenize(dataset, features, params)
    assert config_diff(run["tok"].config, default_run["tok"].config) == {"use_cf"}
    assert run["tok"].item_encoder.net[0].in_features == run["tok"].config["semantic_dim"]
    assert_unique_item_scids(run)
    assert len(run["user_scids"]) == len(dataset["users"])

    scrambled = dict(features)
    for name in ("item_cf_embeddings", "user_cf_embeddings"):
        df = features[name].copy()
        df["embedding"] = list(np.random.default_rng(0).normal(size=(len(df), len(df["embedding"].iloc[0]))).astype(np.float32))
        scrambled[name] = df
    pd.testing.assert_frame_equal(tokenize(dataset, scrambled, params)["item_scids"], run["item_scids"])
    # while the default tokenizer does read them
    default_scrambled = tokenize(dataset, scrambled, tiny_params())
    assert not np.allclose(np.stack(default_scrambled["item_sc"]["embedding"]), np.stack(default_run["item_sc"]["embedding"]))


def test_no_u2i_alignment_quantises_the_concatenated_features(default_run, dataset, features):
    run = tokenize(dataset, features, tiny_params(u2i_alignment=False))
    assert config_diff(run["tok"].config, default_run["tok"].config) == {"u2i_alignment"}
    curves = run["log"]["curves"]
    assert not any(k.startswith("phase1_") for k in curves)
    assert "phase2_u2i_loss" not in curves and "phase2_item_recon_loss" in curves
    assert "phase2_auc" in run["log"]["scalars"]  # still measured, on the raw features
    ids = list(features["item_semantic_embeddings"]["id"])
    x = run["tok"].features(
        nodes._embedding_matrix(features["item_semantic_embeddings"], ids, "s"),
        nodes._embedding_matrix(features["item_cf_embeddings"], ids, "c"),
    ).numpy()
    assert np.allclose(np.stack(run["item_sc"]["embedding"]), x, atol=1e-6)
    assert_unique_item_scids(run)
    assert len(run["user_scids"]) == len(dataset["users"])


@pytest.mark.parametrize("missing", ["ablation", "rq_vae", "phase2"])
def test_missing_parameter_group_is_named(dataset, features, missing):
    params = tiny_params()
    del params[missing]
    with pytest.raises(KeyError, match=f"tokenization.{missing}"):
        tokenize(dataset, features, params)
