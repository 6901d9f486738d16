"""A run pointed at a real `mlflow server` (SQL backend, loopback) by MLFLOW_TRACKING_URI, found over REST."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import run_project
from .mlflow_server import MlflowServer


def rest(server: MlflowServer, endpoint: str, body: dict | None = None, **query: str) -> dict:
    url = f"{server.url}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_run_logged_to_a_tracking_server(mlflow_server: MlflowServer, project_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # read by conf/base/mlflow.yml
    run_project(project_copy, pipeline_names=["tokenization"])

    experiment = rest(mlflow_server, "experiments/get-by-name", experiment_name="align3gr_pipelines")["experiment"]
    runs = rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["info"]["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert tags["kedro_command"] == "kedro run --pipeline=tokenization"
    assert tags["lineage.git_commit"] and tags["lineage.data_fingerprint"]
    assert params["toy_tokenization.levels"] == "2"
    assert metrics["tokenization_metrics.usage_level0"] > 0
    history = rest(mlflow_server, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="tokenization_metrics.inertia_level1")
    assert sorted(int(m["step"]) for m in history["metrics"]) == list(range(5))
    # Artifacts go through the server's artifact proxy into its --artifacts-destination.
    listed = rest(mlflow_server, "artifacts/list", run_id=run["info"]["run_id"], path="08_reporting/tokenization")
    assert {"08_reporting/tokenization/codebook_usage.png", "08_reporting/tokenization/metrics.json"} <= {f["path"] for f in listed["files"]}
    assert not (project_copy / "mlartifacts").exists()
