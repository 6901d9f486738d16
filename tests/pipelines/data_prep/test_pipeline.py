"""The data_prep pipeline end to end: on a DataCatalog (spaceflights style) and through a KedroSession."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import ParquetDataset

from align3gr_pipelines.data.errors import DataPrepError
from align3gr_pipelines.pipelines.data_prep import create_pipeline

from .conftest import REPO, params, write

class KeptDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so the test can read intermediate outputs afterwards."""

    def _release(self) -> None:
        pass


OUTPUTS = ["items", "users", "interactions", "train_sequences", "valid", "test", "feedback"]


def run(p: dict, catalog: DataCatalog | None = None, seed: int = 3) -> DataCatalog:
    catalog = catalog or DataCatalog()
    catalog["params:data_prep"] = MemoryDataset(p)
    catalog["params:seed"] = MemoryDataset(seed)
    for name in [*OUTPUTS, "dataset_stats", "data_fingerprint"]:
        if name not in catalog:
            catalog[name] = KeptDataset()
    SequentialRunner().run(create_pipeline(), catalog)
    return catalog


def test_demo_pipeline_writes_the_contract_tables():
    c = run(params())
    items, users, inter = c.load("items"), c.load("users"), c.load("interactions")
    train, valid, test, fb = c.load("train_sequences"), c.load("valid"), c.load("test"), c.load("feedback")
    assert list(items.columns) == ["item_id", "title", "description", "brand", "categories", "text"]
    assert list(users.columns) == ["user_id", "profile"]
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "rating", "review"]
    assert str(inter["timestamp"].dtype) == "int64" and str(inter["rating"].dtype) == "float64"
    for df in (train, valid, test):
        assert list(df.columns) == ["user_id", "history", "target", "position"]
    assert list(fb.columns) == ["user_id", "item_id", "level", "source", "rating", "timestamp", "split"]
    assert set(fb["level"]) <= {"disliked", "neutral", "liked"} and set(fb["split"]) == {"train", "valid", "test"}
    assert set(users["user_id"]) == set(valid["user_id"]) == set(test["user_id"]) == set(inter["user_id"])
    assert inter.equals(inter.sort_values(["user_id", "timestamp"], kind="stable"))
    assert train["history"].map(len).max() <= 5
    stats, fp = c.load("dataset_stats"), c.load("data_fingerprint")
    assert stats["n_users"] == len(users) and stats["n_interactions"] == len(inter)
    assert stats["cleaning"]["users_dropped_short"] == 40 - len(users)
    assert sum(stats["feedback_levels"].values()) == len(fb)
    json.dumps(stats), json.dumps(fp)
    # the fingerprint is a function of the content only
    again = run(params()).load("data_fingerprint")
    other = run(params(), seed=4).load("data_fingerprint")
    assert again == fp and other["fingerprint"] != fp["fingerprint"]


def test_failed_run_leaves_earlier_outputs_intact(tmp_path, ml_latest):
    out = tmp_path / "out"

    def catalog() -> DataCatalog:
        c = DataCatalog()
        for name in OUTPUTS:
            c[name] = ParquetDataset(filepath=str(out / f"{name}.parquet"))
        for name in ("dataset_stats", "data_fingerprint"):
            c[name] = JSONDataset(filepath=str(out / f"{name}.json"))
        return c

    run(params(), catalog())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 9
    with pytest.raises(DataPrepError, match="data_prep.max_history must be an integer >= 1"):
        run(params(max_history=0, demo={"n_users": 50}), catalog())
    with pytest.raises(DataPrepError, match="data_prep.min_interactions must be an integer >= 3"):
        run(params(min_interactions=2, demo={"n_users": 50}), catalog())
    with pytest.raises(DataPrepError, match="data_prep.source must be one of"):
        run(params(source="nope"), catalog())
    write(ml_latest / "ratings.csv", (ml_latest / "ratings.csv").read_text() + "2,1,9,140\n")
    with pytest.raises(DataPrepError, match="column rating has 1 value"):
        run(params(source="movielens", movielens={"path": str(ml_latest)}), catalog())
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_kedro_session_run_on_tiny_demo(tmp_path):
    """`kedro run --pipelines=data_prep` in a throwaway copy of the project (so the repo's data/ is untouched)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "src").mkdir()
    (tmp_path / "conf" / "base").mkdir(parents=True)
    (tmp_path / "conf" / "local").mkdir()
    for name in ("globals.yml", "parameters.yml", "parameters_data_prep.yml", "catalog_data_prep.yml"):
        shutil.copy(REPO / "conf" / "base" / name, tmp_path / "conf" / "base" / name)
    mlflow_conf = REPO / "conf" / "base" / "mlflow.yml"
    if mlflow_conf.is_file():  # keep kedro-mlflow quiet and fast here: no tracking for this run
        m = yaml.safe_load(mlflow_conf.read_text())
        m["tracking"]["disable_tracking"]["pipelines"] = ["data_prep"]
        (tmp_path / "conf" / "base" / "mlflow.yml").write_text(yaml.safe_dump(m))
    bootstrap_project(tmp_path)
    runtime = {"data_prep": {"demo": {"n_users": 30, "n_items": 40, "mean_interactions": 6}, "max_history": 4}}
    with KedroSession.create(project_path=tmp_path, runtime_params=runtime) as session:
        session.run(pipeline_name="data_prep")
    valid = pd.read_parquet(tmp_path / "data" / "03_primary" / "valid.parquet")
    stats = json.loads((tmp_path / "data" / "08_reporting" / "data_prep" / "dataset_stats.json").read_text())
    assert stats["source"] == "demo" and stats["n_items"] <= 40 and stats["n_users"] == len(valid) <= 30
    assert valid["history"].map(len).max() <= 4
    for name in ("items", "users", "interactions"):
        assert (tmp_path / "data" / "02_intermediate" / f"{name}.parquet").is_file()


def test_input_checks_reach_dataset_stats(ml_latest):
    """Replaced bytes, dropped out-of-range timestamps, duplicates by kind and an empty tags.csv all land in
    dataset_stats.json's cleaning section (the defaults raise instead; see tests/unit/test_data_input_checks.py)."""
    text = (ml_latest / "ratings.csv").read_text()
    # user 3 rates movie 1 a second time at the same second with another rating, and once in the year 2100
    write(ml_latest / "ratings.csv", text + "3,1,1.0,50\n3,3,4.0,4102444800\n")
    (ml_latest / "movies.csv").write_bytes((ml_latest / "movies.csv").read_bytes().replace(b"Heat", b"H\xe9at"))
    write(ml_latest / "tags.csv", "userId,movieId,tag,timestamp\n")
    p = params(source="movielens", movielens={"path": str(ml_latest)}, on_decode_error="replace",
               timestamps={"on_out_of_range": "drop"})
    cleaning = run(p).load("dataset_stats")["cleaning"]
    assert cleaning["decode_errors_replaced"] == {str(ml_latest / "movies.csv"): 1}
    assert cleaning["timestamps_out_of_range_dropped"] == 1
    assert cleaning["duplicate_interactions"] == {"exact": 0, "conflicting": 1, "repeated": 0, "conflict_rule": "first"}
    assert cleaning["empty_files"] == [str(ml_latest / "tags.csv")]
    with pytest.raises(DataPrepError, match=r"movies.csv, line 3, byte offset \d+: invalid utf-8"):
        run(dict(p, on_decode_error="raise"))
