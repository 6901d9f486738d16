"""One `kedro run` = one MLflow run holding params, stage metrics by step, artifacts and lineage tags."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from align3gr_pipelines.tracking.lineage import LineageStore, fingerprint_path

from .conftest import REPO

PERSISTED = (
    "items", "data_fingerprint", "item_scids", "tokenization_metrics", "codebook_usage_plot",
    "toy_model", "sft_train_metrics", "evaluation_metrics", "evaluation_metrics_md",
)


@pytest.fixture(scope="module")
def tracked(built_project: Path):
    client = MlflowClient(tracking_uri=f"sqlite:///{built_project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("align3gr_pipelines")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, "one `kedro run` must make exactly one MLflow run"
    return client, runs[0]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_params_and_metrics_with_steps(tracked, built_project: Path) -> None:
    client, run = tracked
    assert run.info.status == "FINISHED"
    # kedro-mlflow flattens each stage's parameter dict.
    assert run.data.params["seed"] == "42"
    assert run.data.params["toy_tokenization.codebook_size"] == "4"
    assert run.data.params["toy_train.steps"] == "30"

    loss = client.get_metric_history(run.info.run_id, "sft_train_metrics.loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == list(range(30))
    saved = json.loads((built_project / "data/08_reporting/sft_train/metrics.json").read_text())
    assert [m.value for m in sorted(loss, key=lambda m: m.step)] == pytest.approx([v for _, v in saved["curves"]["loss"]])
    inertia = client.get_metric_history(run.info.run_id, "tokenization_metrics.inertia_level0")
    assert sorted(m.step for m in inertia) == list(range(5))
    assert run.data.metrics["tokenization_metrics.usage_level0"] == saved_scalar(built_project, "usage_level0")

    table = pd.read_parquet(built_project / "data/08_reporting/evaluation/metrics.parquet")
    for row in table.itertuples():
        assert run.data.metrics[f"evaluation_metrics.{row.model}.{row.split}.{row.metric}"] == pytest.approx(row.value)


def saved_scalar(project: Path, name: str) -> float:
    return json.loads((project / "data/08_reporting/tokenization/metrics.json").read_text())["scalars"][name]


def test_lineage_tags(tracked, built_project: Path) -> None:
    client, run = tracked
    tags = run.data.tags
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if git.returncode == 0:
        assert tags["lineage.git_commit"] == git.stdout.strip()
        assert tags["lineage.git_dirty"] in ("true", "false")
    data_fp = built_project / "data/08_reporting/data_prep/data_fingerprint.json"
    assert tags["lineage.data_fingerprint"] == fingerprint_path(data_fp)
    assert tags["lineage.data_fingerprint.sha256"] == json.loads(data_fp.read_text())["sha256"]
    # The checkpoint says exactly which SCIDs, items and parameters it was trained from.
    trained_from = json.loads(tags["lineage.toy_model.trained_from"])
    assert set(trained_from) == {"item_scids", "items", "params:toy_train", "params:seed"}
    assert trained_from["item_scids"] == fingerprint_path(built_project / "data/05_model_input/item_scids.parquet")
    assert tags["lineage.toy_model.fingerprint"] == fingerprint_path(built_project / "data/06_models/toy_model")


def test_reports_and_scids_are_artifacts(tracked) -> None:
    client, run = tracked
    artifacts = _artifacts(client, run.info.run_id)
    assert {
        "08_reporting/tokenization/codebook_usage.png",
        "08_reporting/tokenization/metrics.json",
        "08_reporting/evaluation/metrics.md",
        "08_reporting/sft_train/metrics.json",
        "scids/item_scids.parquet",
        "lineage/lineage.json",
    } <= artifacts
    assert not any("06_models" in a or a.endswith("items.parquet") for a in artifacts)


def test_every_persisted_output_has_a_lineage_record(built_project: Path) -> None:
    store = LineageStore(built_project / "data/.lineage")
    for name in PERSISTED:
        record = store.read(name)
        assert record is not None, name
        assert record.content == fingerprint_path(built_project / record.path)
    assert not [p for p in store.root.iterdir() if p.suffix != ".json" or p.name.startswith(".")]
    # Ephemeral inputs are expanded: quantize_items read the in-memory embeddings of `items`.
    scids = store.read("item_scids")
    assert set(scids.inputs) == {"items"}
    assert set(scids.params) == {"params:toy_tokenization", "params:seed"}
