"""`kedro run --pipelines=inference` logs the served model only when what it is built from changed (checkpoint,
catalogue, settings); otherwise the run names the model already logged, and no second copy is stored."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from align3gr_pipelines.tracking import mlflow_runs
from tests.pipelines.inference.tiny_project import make_project, save_checkpoints
from tests.pipelines.sp_dpo_curriculum.conftest import one_torch_thread  # noqa: F401  (autouse)

MODEL_JSON = Path("data/08_reporting/inference/model.json")


def run_inference(project: Path) -> dict:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        session.run(pipeline_names=["inference"])
    return json.loads((project / MODEL_JSON).read_text())


def model_dirs(project: Path) -> set[Path]:
    # MLflow 3 stores each logged model under mlruns/<experiment>/models/m-<id>/.
    return {p for p in (project / "mlruns").glob("*/models/m-*") if p.is_dir()}


def test_the_model_is_logged_again_only_when_its_inputs_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, world = make_project(tmp_path / "proj")
    monkeypatch.chdir(root)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(tracking_uri=uri)

    first = run_inference(root)
    assert first["logged"] is True
    assert len(model_dirs(root)) == 1

    second = run_inference(root)
    assert second["logged"] is False and second["model_uri"] == first["model_uri"]
    assert len(model_dirs(root)) == 1, "an unchanged model must not be stored twice"
    runs = client.search_runs([client.get_experiment_by_name("align3gr_pipelines").experiment_id], order_by=["attributes.start_time ASC"])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    logged, reused = runs[0].data.tags, runs[1].data.tags
    assert logged[mlflow_runs.SERVED_URI_TAG] == first["model_uri"] and mlflow_runs.SERVED_REUSED_TAG not in logged
    assert reused[mlflow_runs.SERVED_URI_TAG] == first["model_uri"]
    assert reused[mlflow_runs.SERVED_REUSED_TAG] == runs[0].info.run_id
    assert reused[mlflow_runs.SERVED_FINGERPRINT_TAG] == logged[mlflow_runs.SERVED_FINGERPRINT_TAG]

    # A retrained checkpoint (another init seed) is another model: logged anew.
    save_checkpoints(world, root / "data" / "06_models", {"sp_dpo_easy": 3})
    third = run_inference(root)
    assert third["logged"] is True and third["model_uri"] != first["model_uri"]
    assert len(model_dirs(root)) == 2
    newest = client.get_run(third["model_uri"].split("/")[1]).data.tags
    assert newest[mlflow_runs.SERVED_FINGERPRINT_TAG] != logged[mlflow_runs.SERVED_FINGERPRINT_TAG]
