"""The tokenization pipeline end to end on a tiny dataset through a DataCatalog + SequentialRunner, with the
persisted outputs written by the catalog's own dataset types (Parquet, JSON, checkpoints, PNG)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.pandas import ParquetDataset

from align3gr_pipelines.cf.sasrec import SASRec
from align3gr_pipelines.datasets import CheckpointDataset
from align3gr_pipelines.pipelines.tokenization import create_pipeline
from align3gr_pipelines.pipelines.tokenization.nodes import train_sc_tokenizer
from align3gr_pipelines.tokenizer.sc_tokenizer import SCTokenizer
from align3gr_pipelines.tokenizer.scid import codes_to_tokens

from .conftest import SEED, tiny_params

PARQUET = [
    "item_semantic_embeddings", "user_semantic_embeddings", "item_cf_embeddings", "user_cf_embeddings",
    "item_sc_embeddings", "user_sc_embeddings", "item_scids", "user_scids", "tokenization_quality",
]
JSONS = ["tokenization_metrics", "tokenization_sasrec_log", "tokenization_sc_log", "tokenization_scid_report"]


def build_catalog(tmp_path, dataset, params) -> DataCatalog:
    datasets = {name: MemoryDataset(dataset[name]) for name in ("items", "users", "train_sequences", "valid")}
    datasets["params:tokenization"] = MemoryDataset(params)
    datasets["params:seed"] = MemoryDataset(SEED)
    datasets.update({n: ParquetDataset(filepath=str(tmp_path / f"{n}.parquet")) for n in PARQUET})
    datasets.update({n: JSONDataset(filepath=str(tmp_path / f"{n}.json")) for n in JSONS})
    datasets["sasrec_model"] = CheckpointDataset(str(tmp_path / "sasrec"), "align3gr_pipelines.cf.sasrec.SASRec", optional=True)
    datasets["sc_tokenizer"] = CheckpointDataset(str(tmp_path / "sc_tokenizer"), "align3gr_pipelines.tokenizer.sc_tokenizer.SCTokenizer")
    datasets["codebook_usage_plot"] = MatplotlibDataset(filepath=str(tmp_path / "codebook_usage.png"))
    return DataCatalog(datasets=datasets)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, dataset):
    tmp_path = tmp_path_factory.mktemp("tokenization")
    catalog = build_catalog(tmp_path, dataset, tiny_params())
    SequentialRunner().run(create_pipeline(), catalog)
    return tmp_path, catalog


def test_item_and_user_scids_follow_the_contract(pipeline_run, dataset):
    _, catalog = pipeline_run
    items, users = catalog.load("item_scids"), catalog.load("user_scids")
    assert list(items.columns) == ["id", "codes", "tokens"] and list(users.columns) == ["id", "codes", "tokens"]
    assert items["id"].tolist() == dataset["items"]["item_id"].tolist()
    assert users["id"].tolist() == dataset["users"]["user_id"].tolist()
    assert items["tokens"].is_unique and items["id"].is_unique
    lengths = {len(c) for c in items["codes"]}
    assert len(lengths) == 1
    for frame, kind in ((items, "item"), (users, "user")):
        for codes, tokens in zip(frame["codes"], frame["tokens"]):
            assert tokens == codes_to_tokens(list(codes), kind)


def test_embedding_tables_follow_the_contract(pipeline_run, dataset):
    _, catalog = pipeline_run
    for name in PARQUET[:6]:
        df = catalog.load(name)
        assert list(df.columns) == ["id", "embedding"]
        matrix = np.stack(df["embedding"])
        assert matrix.dtype == np.float32 and np.isfinite(matrix).all()
        side = "items" if name.startswith("item") else "users"
        assert len(df) == len(dataset[side])
    assert np.stack(catalog.load("item_semantic_embeddings")["embedding"]).shape[1] == 384  # MiniLM-L6


def test_checkpoints_load_back_and_agree_with_the_tables(pipeline_run, dataset):
    _, catalog = pipeline_run
    sasrec = catalog.load("sasrec_model")
    assert isinstance(sasrec, SASRec) and sasrec.item_ids == dataset["items"]["item_id"].tolist()
    logits = sasrec.score([["i000", "i004"], []])
    assert logits.shape == (2, len(dataset["items"]))
    item_cf = np.stack(catalog.load("item_cf_embeddings")["embedding"])
    trained = set(json.loads(json.dumps(catalog.load("tokenization_sasrec_log")["trained_items"])))
    seen = [i for i, item in enumerate(sasrec.item_ids) if item in trained]
    assert np.allclose(item_cf[seen], sasrec.item_embeddings().detach().numpy()[seen])

    tok = catalog.load("sc_tokenizer")
    assert isinstance(tok, SCTokenizer)
    sem = np.stack(catalog.load("item_semantic_embeddings")["embedding"])
    raw_codes, _ = tok.codes("item", tok.features(sem, item_cf))
    final = np.stack(catalog.load("item_scids")["codes"])
    report = catalog.load("tokenization_scid_report")["item"]["resolution"]
    # items the resolution did not touch carry exactly the codes the reloaded tokenizer gives them
    assert (raw_codes.numpy() != final).any(1).sum() == report["items_touched"]


def test_quality_metrics_and_plot(pipeline_run, dataset):
    tmp_path, catalog = pipeline_run
    quality = catalog.load("tokenization_quality")
    assert list(quality.columns) == ["side", "level", "metric", "value"]
    per_level = quality[quality["metric"] == "utilisation"]
    assert len(per_level) == 6 and per_level["value"].between(0, 1).all()
    # user SCIDs are never re-assigned, so their per-level utilisation is the share of codes they use
    users = np.stack(catalog.load("user_scids")["codes"].map(list))
    size = catalog.load("sc_tokenizer").config["user_codebook_size"]
    got = per_level[per_level["side"] == "user"].sort_values("level")["value"].tolist()
    assert got == pytest.approx([len(set(users[:, level])) / size for level in range(users.shape[1])])
    overall = quality.set_index(["side", "metric"])["value"]
    # a list key gives a Series on every pandas we allow (a tuple key on this non-unique index gives a
    # Series on pandas 2.2.0 and a scalar on pandas 3)
    assert (overall.loc[[("item", "colliding_after")]] == 0).all()
    for metric in ("reconstruction_loss", "colliding_before", "collision_rate_after"):
        assert ("item", metric) in overall.index and ("user", metric) in overall.index
    sc_log = catalog.load("tokenization_sc_log")
    u2i = {name: overall.loc[[("u2i", name)]].item() for name in ("auc_before_training", "phase1_auc")}
    for name, value in u2i.items():
        assert value == pytest.approx(sc_log["scalars"][name])
    # users walk through one topic's items: U2I alignment ranks a held-out item above random negatives
    assert u2i["phase1_auc"] > u2i["auc_before_training"]
    assert u2i["phase1_auc"] > 0.6

    metrics = catalog.load("tokenization_metrics")
    assert set(metrics) == {"scalars", "curves", "info"}
    assert all(isinstance(v, float) for v in metrics["scalars"].values())
    assert metrics["scalars"]["item_colliding_after"] == 0.0 and metrics["scalars"]["item_unique_scids"] == len(dataset["items"])
    for name in ("sasrec_train_loss", "phase1_u2i_loss", "phase1_auc", "phase2_loss", "phase2_item_recon_loss"):
        steps = [s for s, _ in metrics["curves"][name]]
        assert steps == sorted(steps) and len(steps) >= 1
    assert metrics["info"]["collision_resolution"]["method"] == "tail_reassignment"
    assert (tmp_path / "codebook_usage.png").stat().st_size > 10_000


def test_bad_input_names_the_dataset_and_column(dataset):
    broken = dataset["train_sequences"].drop(columns="position")
    with pytest.raises(ValueError, match="train_sequences.*position"):
        from align3gr_pipelines.cf.sasrec import training_sequences

        training_sequences(broken)
    emb = pd.DataFrame({"id": ["i000"], "embedding": [np.zeros(3, np.float32)]})
    with pytest.raises(ValueError, match="item_semantic_embeddings"):
        train_sc_tokenizer(emb.drop(columns="embedding"), emb, emb, emb, dataset["train_sequences"], dataset["valid"], tiny_params(), SEED)


def test_item_only_ablation_through_the_catalog(tmp_path, dataset):
    params = tiny_params(user_scids=False)
    params["phase1"]["epochs"] = params["phase2"]["epochs"] = 1
    catalog = build_catalog(tmp_path, dataset, params)
    SequentialRunner().run(create_pipeline(), catalog)
    users = catalog.load("user_scids")
    assert len(users) == 0 and list(users.columns) == ["id", "codes", "tokens"]
    assert catalog.load("item_scids")["tokens"].is_unique
    quality = catalog.load("tokenization_quality")
    assert set(quality["side"]) == {"item", "u2i"}
    assert catalog.load("tokenization_metrics")["info"]["ablation"]["user_scids"] is False


def test_lcrec_codes_through_the_catalog(tmp_path, dataset):
    """Data without item text: item features from LC-Rec's codes (no sentence encoder), LC-Rec's codes as item
    SCIDs, and the persisted metrics say so."""
    from .test_code_features import fake_index

    index_file = tmp_path / "Tiny.index.json"
    index_file.write_text(json.dumps(fake_index(dataset["items"])))
    params = tiny_params(user_scids=False)
    params["phase1"]["epochs"] = params["phase2"]["epochs"] = 1
    params["semantic_encoder"].update(item_features="lcrec_codes", lcrec_index=str(index_file), model="no-such-model")
    params["item_scids_from"] = "lcrec_index"
    catalog = build_catalog(tmp_path, dataset, params)
    SequentialRunner().run(create_pipeline(), catalog)
    assert np.stack(catalog.load("item_semantic_embeddings")["embedding"]).shape == (len(dataset["items"]), 128)
    assert np.stack(catalog.load("user_semantic_embeddings")["embedding"]).shape == (len(dataset["users"]), 128)
    items = catalog.load("item_scids")
    assert items["tokens"].is_unique and {len(c) for c in items["codes"]} == {4}
    info = catalog.load("tokenization_metrics")["info"]
    assert info["item_features"] == "lcrec_codes" and info["item_scids_from"] == "lcrec_index"
    assert info["semantic_model"] == "lcrec_codes" and info["collision_resolution"]["method"] == "lowest_free_last_code"
    assert catalog.load("sc_tokenizer").config["semantic_model"] == "lcrec_codes"
