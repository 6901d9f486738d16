"""Runs pointed at a real `mlflow server` (SQL backend, loopback) by MLFLOW_TRACKING_URI, found over REST: one
`kedro run`, and two concurrent `kedro run` tasks of one orchestrated DAG run sharing one MLflow run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from align3gr_pipelines.tracking import dag_run, mlflow_runs

from .conftest import ready_server, run_project
from .mlflow_server import MlflowServer


@pytest.fixture(scope="module")
def mlflow_server(_mlflow_server_early: MlflowServer | None) -> Iterator[MlflowServer]:
    """One server for this module's tests (the conftest's fixture stops it after each test)."""
    server = ready_server(_mlflow_server_early)
    yield server
    server.stop()


def rest(server: MlflowServer, endpoint: str, body: dict | None = None, **query: str) -> dict:
    url = f"{server.url}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def runs_of_project(server: MlflowServer, project: Path) -> list[dict]:
    experiment = rest(server, "experiments/get-by-name", experiment_name="align3gr_pipelines")["experiment"]
    body = {"experiment_ids": [experiment["experiment_id"]], "filter": f"tags.`{mlflow_runs.PROJECT_TAG}` = '{project.resolve()}'"}
    return rest(server, "runs/search", body).get("runs", [])


def test_run_logged_to_a_tracking_server(mlflow_server: MlflowServer, project_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # read by conf/base/mlflow.yml
    run_project(project_copy, pipeline_names=["tokenization"])

    runs = runs_of_project(mlflow_server, project_copy)
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


def all_runs(server: MlflowServer) -> set[str]:
    experiment = rest(server, "experiments/get-by-name", experiment_name="align3gr_pipelines")["experiment"]
    runs = rest(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000}).get("runs", [])
    return {r["info"]["run_id"] for r in runs}


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def test_two_concurrent_tasks_log_into_one_shared_run(
    mlflow_server: MlflowServer, built_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two copies, so that the two stages run at once without one reading what the other rewrites.
    projects = {}
    for stage in ("tokenization", "sft_train"):
        projects[stage] = tmp_path / stage
        shutil.copytree(built_project, projects[stage], symlinks=True, ignore=shutil.ignore_patterns("build", "__pycache__"))
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "MLFLOW_TRACKING_URI": mlflow_server.url}
    env.pop("MLFLOW_RUN_ID", None)
    # The orchestrator's first step, as documented: only the run id on stdout.
    opened = subprocess.run(
        [sys.executable, "-m", "align3gr_pipelines.tracking.dag_run", "--project", str(projects["tokenization"]), "open", "--name", "dag-1"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert opened.returncode == 0, opened.stderr[-4000:]
    run_id = opened.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{32}", run_id), opened.stdout

    runs_before = all_runs(mlflow_server) - {run_id}
    kedro = Path(sys.executable).with_name("kedro")
    procs = {
        stage: subprocess.Popen([str(kedro), "run", f"--pipelines={stage}"], cwd=project, env={**env, "MLFLOW_RUN_ID": run_id},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for stage, project in projects.items()
    }
    logs = {stage: proc.communicate(timeout=300)[0] for stage, proc in procs.items()}
    for stage, proc in procs.items():
        assert proc.returncode == 0, f"{stage}:\n{logs[stage][-4000:]}"
        flat = " ".join(logs[stage].split())  # the log wraps lines
        assert "locked" not in flat.lower() and "MLflow: could not" not in flat, f"{stage}:\n{logs[stage][-4000:]}"

    run = rest(mlflow_server, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "RUNNING" and run["info"]["run_name"] == "dag-1"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["tokenization/toy_tokenization.levels"] == "2" and params["sft_train/toy_train.steps"] == "30"
    assert params["tokenization/seed"] == params["sft_train/seed"] == "42"
    tags = _tags(run)
    assert tags[mlflow_runs.stage_tag("tokenization")] == tags[mlflow_runs.stage_tag("sft_train")] == "FINISHED"
    assert not mlflow_runs.process_stamps(tags)
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"tokenization_metrics.usage_level0", "sft_train_metrics.final_loss"} <= metrics
    loss = rest(mlflow_server, "metrics/get-history", run_id=run_id, metric_key="sft_train_metrics.loss")["metrics"]
    assert sorted(int(m["step"]) for m in loss) == list(range(30))
    for folder, expected in (("lineage/tokenization", "lineage.json"), ("lineage/sft_train", "lineage.json"),
                             ("08_reporting/tokenization", "metrics.json"), ("08_reporting/sft_train", "metrics.json")):
        listed = rest(mlflow_server, "artifacts/list", run_id=run_id, path=folder).get("files", [])
        assert f"{folder}/{expected}" in {f["path"] for f in listed}, folder
    assert all_runs(mlflow_server) == runs_before | {run_id}, "a task opened a run of its own"

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    assert dag_run.close_run(projects["tokenization"], run_id) == "FINISHED"
    assert rest(mlflow_server, "runs/get", run_id=run_id)["run"]["info"]["status"] == "FINISHED"
