"""Reruns on cached artifacts: staleness after a parameter change, the pre-node check, the CLI report,
and `--only-missing-outputs` with the checkpoint dataset."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from kedro.framework.cli.cli import KedroCLI
from mlflow.tracking import MlflowClient

from align3gr_pipelines.tracking.hooks import StaleInputError

from .conftest import run_project

DOWNSTREAM_OF_TOKENIZATION = (
    "item_scids", "tokenization_metrics", "codebook_usage_plot",
    "toy_model", "sft_train_metrics", "evaluation_metrics", "evaluation_metrics_md",
)


def kedro(project: Path, *args: str):
    """The `kedro` command as the console script builds it (project CLI from <package>/cli.py included)."""
    return CliRunner().invoke(KedroCLI(project_path=project), list(args), catch_exceptions=False)


def lineage_status(project: Path) -> dict:
    report = project / "lineage_report.json"
    result = kedro(project, "lineage", "status", "--output", str(report))
    assert result.exit_code == 0, result.output
    return json.loads(report.read_text())


def change_codebook_size(project: Path, size: int) -> None:
    params = project / "conf/base/parameters_toy.yml"
    text = params.read_text()
    assert "codebook_size: 4" in text
    params.write_text(text.replace("codebook_size: 4", f"codebook_size: {size}"))


def record_mtimes(project: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (project / "data/.lineage").glob("*.json")}


def test_parameter_change_makes_downstream_stale_until_rebuilt(project_copy: Path) -> None:
    report = lineage_status(project_copy)
    assert {r["status"] for r in report["datasets"]} == {"fresh"} and report["rebuild_command"] is None

    change_codebook_size(project_copy, 3)
    report = lineage_status(project_copy)
    status = {r["dataset"]: r for r in report["datasets"]}
    assert {n for n, r in status.items() if r["status"] == "stale"} == set(DOWNSTREAM_OF_TOKENIZATION)
    assert status["items"]["status"] == status["data_fingerprint"]["status"] == "fresh"
    assert status["item_scids"]["reasons"] == ["parameter 'params:toy_tokenization' changed since it was built"]
    assert status["toy_model"]["reasons"] == ["input 'item_scids' is stale"]
    assert report["stale_stages"] == ["tokenization", "sft_train", "evaluation"]
    # quantize_items reads embed_items' in-memory output, so the rerun has to start one node earlier.
    assert report["rebuild_command"] == "kedro run --from-nodes=embed_items"

    human = kedro(project_copy, "lineage", "status", "--fail-on-stale")
    assert human.exit_code == 1
    assert "Stale stages: tokenization, sft_train, evaluation" in human.output
    assert "Rebuild the stale ones (and everything downstream) with: kedro run --from-nodes=embed_items" in human.output

    run_project(project_copy, from_nodes=["embed_items"])
    report = lineage_status(project_copy)
    assert {r["status"] for r in report["datasets"]} == {"fresh"}
    shown = kedro(project_copy, "lineage", "show", "item_scids")
    assert json.loads(shown.output[shown.output.index("{"):])["node"] == "quantize_items"


def test_stale_input_warns_by_default_and_can_fail_the_run(
    project_copy: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    change_codebook_size(project_copy, 3)
    before = record_mtimes(project_copy)
    monkeypatch.setenv("ALIGN3GR_ON_STALE", "error")
    with pytest.raises(StaleInputError, match=r"(?s)evaluate_scorer.*item_scids: parameter 'params:toy_tokenization' changed"):
        run_project(project_copy, pipeline_names=["evaluation"])
    assert record_mtimes(project_copy) == before, "a refused node must not overwrite its outputs"

    monkeypatch.setenv("ALIGN3GR_ON_STALE", "warn")
    with caplog.at_level(logging.WARNING, logger="align3gr_pipelines.tracking.hooks"):
        run_project(project_copy, pipeline_names=["evaluation"])
    warnings = [r.getMessage() for r in caplog.records if "stale input" in r.getMessage()]
    assert len(warnings) == 1 and "toy_model: input 'item_scids' is stale" in warnings[0]
    # The MLflow run of that evaluation says it consumed stale inputs.
    client = MlflowClient(tracking_uri=f"sqlite:///{project_copy / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("align3gr_pipelines").experiment_id],
                              order_by=["attributes.start_time DESC"])
    assert runs[0].data.tags["lineage.stale_inputs"] == "item_scids,toy_model"
    # Re-evaluating does not make the evaluation fresh: its inputs are still stale.
    status = {r["dataset"]: r["status"] for r in lineage_status(project_copy)["datasets"]}
    assert status["evaluation_metrics"] == "stale"


def test_only_missing_outputs_rebuilds_a_deleted_checkpoint(project_copy: Path) -> None:
    before = record_mtimes(project_copy)
    shutil.rmtree(project_copy / "data/06_models/toy_model")
    report = lineage_status(project_copy)
    assert [r["dataset"] for r in report["datasets"] if r["status"] == "missing"] == ["toy_model"]
    assert report["build_missing_command"] == "kedro run --only-missing-outputs"
    run_project(project_copy, only_missing_outputs=True)
    assert (project_copy / "data/06_models/toy_model/_CHECKPOINT_COMPLETE.json").is_file()
    after = record_mtimes(project_copy)
    # Only the node that writes the checkpoint ran (CheckpointDataset.exists said it was missing).
    assert {name for name in before if after[name] != before[name]} == {"toy_model", "sft_train_metrics"}
    # Training is deterministic under the seed, so the rebuilt checkpoint has the same fingerprint and
    # the evaluation built from the old one is still fresh.
    assert {r["status"] for r in lineage_status(project_copy)["datasets"]} == {"fresh"}
