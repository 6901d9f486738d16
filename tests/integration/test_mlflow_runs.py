"""MLflow run hygiene on the toy project's SQLite store: a run whose process was killed (-9) is marked KILLED
by the next start, a copied project logs into its own mlruns/, and tasks given a shared run id join it."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import psutil
import pytest
from mlflow.tracking import MlflowClient

from align3gr_pipelines.tracking import dag_run, mlflow_runs
from align3gr_pipelines.tracking.mlflow_runs import ProcessStamp

from .conftest import run_project

EXPERIMENT = "align3gr_pipelines"
# Added to a project copy's settings: the node named by TOY_HOLD_NODE waits (after writing TOY_HOLD_FLAG)
# until the test kills the process, so the kill lands while the MLflow run is open, every time.
HOLD_HOOK = '''
import os as _os
import time as _time
from pathlib import Path as _Path

from kedro.framework.hooks import hook_impl as _hook_impl


class _HoldNode:
    @_hook_impl
    def before_node_run(self, node):
        flag = _os.environ.get("TOY_HOLD_FLAG")
        if flag and node.name == _os.environ.get("TOY_HOLD_NODE"):
            _Path(flag).write_text(str(_os.getpid()))
            _time.sleep(600)


HOOKS = (*HOOKS, _HoldNode())
'''


def client_for(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def runs_of(client: MlflowClient, name: str = EXPERIMENT) -> list:
    experiment = client.get_experiment_by_name(name)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"]) if experiment else []


def files_under(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def dead_child_stamp() -> ProcessStamp:
    """The stamp of a process that really ran on this host and is gone (our own child, ended by pid)."""
    child = subprocess.Popen(["sleep", "60"])
    started = psutil.Process(child.pid).create_time()
    child.kill()
    child.wait(timeout=10)
    return ProcessStamp(ProcessStamp.current().host, child.pid, started, "sft_train")


def test_which_runs_count_as_abandoned(tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'store.db'}")
    experiment_id = client.create_experiment("e", artifact_location=str(tmp_path / "mlruns"))
    me, dead = ProcessStamp.current("tokenization"), dead_child_stamp()
    project = str(tmp_path / "project")

    def run(project_path: str, *stamps: ProcessStamp) -> str:
        tags = {mlflow_runs.PROJECT_TAG: project_path, **{s.tag_key: s.to_tag() for s in stamps}}
        return client.create_run(experiment_id, tags=tags).info.run_id

    killed = run(project, dead)
    reused_pid = run(project, ProcessStamp(me.host, me.pid, me.started - 3600, "evaluation"))  # our pid, older process
    alive = run(project, me)
    half_alive = run(project, me, dead)
    remote = run(project, ProcessStamp("another-host", 1, 0.0, "sft_train"))
    between_tasks = run(project)  # a shared run between two tasks holds no stamp
    other_project = run(str(tmp_path / "elsewhere"), dead)

    reaped = mlflow_runs.reap_abandoned_runs(client, experiment_id, project)
    assert sorted(reaped) == sorted([killed, reused_pid])
    for run_id in (killed, reused_pid):
        info = client.get_run(run_id)
        assert info.info.status == "KILLED" and info.info.end_time is not None
        assert "ended without closing this run" in info.data.tags[mlflow_runs.KILLED_TAG]
        assert not mlflow_runs.process_stamps(info.data.tags), "the dead process's stamp is removed"
    assert str(dead.pid) in client.get_run(killed).data.tags[mlflow_runs.KILLED_TAG]
    assert client.get_run(killed).data.tags[mlflow_runs.stage_tag("sft_train")] == "KILLED"
    for run_id in (alive, half_alive, remote, between_tasks, other_project):
        assert client.get_run(run_id).info.status == "RUNNING"
    assert mlflow_runs.reap_abandoned_runs(client, experiment_id, project) == []


def test_a_run_killed_with_sigkill_is_marked_killed_at_the_next_start(project_copy: Path, tmp_path: Path) -> None:
    settings = project_copy / "src" / "toy_align3gr" / "settings.py"
    settings.write_text(settings.read_text() + HOLD_HOOK)
    flag = tmp_path / "holding"
    env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "TOY_HOLD_FLAG": str(flag), "TOY_HOLD_NODE": "train_scorer"}
    env.pop("MLFLOW_TRACKING_URI", None)
    kedro = Path(sys.executable).with_name("kedro")
    log = tmp_path / "killed_run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(kedro), "run", "--pipelines=sft_train"], cwd=project_copy, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not flag.exists():
            assert proc.poll() is None, f"kedro run ended before the held node:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"the held node was never reached:\n{log.read_text()[-4000:]}"
            time.sleep(0.2)
        client = client_for(project_copy)
        open_run = runs_of(client)[-1]
        assert open_run.info.status == "RUNNING"
        stamps = mlflow_runs.process_stamps(open_run.data.tags)
        assert [s.pid for s in stamps.values()] == [proc.pid]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:  # only on a failed assertion above: never leave our child behind
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert client.get_run(open_run.info.run_id).info.status == "RUNNING", "nothing closes a run after kill -9"

    run_project(project_copy, pipeline_names=["evaluation"])

    killed = client.get_run(open_run.info.run_id)
    assert killed.info.status == "KILLED"
    reason = killed.data.tags[mlflow_runs.KILLED_TAG]
    assert f"pid {proc.pid} (sft_train)" in reason and "ended without closing this run" in reason
    assert not mlflow_runs.process_stamps(killed.data.tags)
    # The copy's own experiment (the fixture's run sits in the original's, set aside): the killed run, the new one.
    runs = runs_of(client)
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    assert not mlflow_runs.process_stamps(runs[-1].data.tags), "a run that ended cleanly keeps no stamp"


def test_a_copied_project_logs_into_its_own_mlruns(built_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "copied"
    subprocess.run(["cp", "-a", str(built_project), str(copy)], check=True)
    shutil.rmtree(copy / "build", ignore_errors=True)
    original_files = files_under(built_project / "mlruns")
    monkeypatch.chdir(copy)

    run_project(copy, pipeline_names=["tokenization"])

    assert files_under(built_project / "mlruns") == original_files, "the copy wrote into the original's mlruns/"
    client = client_for(copy)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert mlflow_runs.is_inside(mlflow_runs.local_artifact_path(experiment.artifact_location), copy)
    (run,) = runs_of(client)
    artifacts = mlflow_runs.local_artifact_path(run.info.artifact_uri)
    assert mlflow_runs.is_inside(artifacts, copy)
    assert (artifacts / "08_reporting" / "tokenization" / "metrics.json").is_file()
    # The runs that came with the copy stay readable, under a name that says where their artifacts are.
    aside = [e for e in client.search_experiments() if e.name.startswith(f"{EXPERIMENT} (copied; artifacts in ")]
    assert len(aside) == 1 and str(built_project / "mlruns") in aside[0].name
    assert len(runs_of(client, aside[0].name)) == 1

    run_project(copy, pipeline_names=["tokenization"])  # the next run finds its own experiment: nothing renamed
    assert len(client.search_experiments()) == len({e.name for e in client.search_experiments()}) == 3
    assert len(runs_of(client)) == 2
    assert files_under(built_project / "mlruns") == original_files


def test_tasks_given_a_run_id_share_one_run_left_open_until_closed(project_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_id = dag_run.open_run(project_copy, "nightly")
    client = client_for(project_copy)
    assert client.get_run(run_id).info.status == "RUNNING"
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)

    run_project(project_copy, pipeline_names=["tokenization"])
    assert os.environ["MLFLOW_RUN_ID"] == run_id, "the next task in this process joins the same run"
    run_project(project_copy, pipeline_names=["sft_train"])
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and run.info.run_name == "nightly"
    assert run.data.params["tokenization/toy_tokenization.levels"] == "2"
    assert run.data.params["sft_train/toy_train.steps"] == "30"
    assert run.data.params["tokenization/seed"] == run.data.params["sft_train/seed"] == "42"
    assert "seed" not in run.data.params
    assert {"tokenization_metrics.usage_level0", "sft_train_metrics.final_loss"} <= set(run.data.metrics)
    assert run.data.tags[mlflow_runs.stage_tag("tokenization")] == run.data.tags[mlflow_runs.stage_tag("sft_train")] == "FINISHED"
    assert not mlflow_runs.process_stamps(run.data.tags)
    listed = {a.path for a in client.list_artifacts(run_id, "lineage")}
    assert listed == {"lineage/tokenization", "lineage/sft_train"}
    assert len(runs_of(client)) == 1  # the shared run: no task opened its own

    # A failing task marks the shared run FAILED; its successful retry opens it again.
    model = project_copy / "data" / "06_models" / "toy_model"
    hidden = project_copy / "toy_model.hidden"
    model.rename(hidden)
    with pytest.raises(Exception, match="toy_model"):
        run_project(project_copy, pipeline_names=["evaluation"])
    failed = client.get_run(run_id)
    assert failed.info.status == "FAILED" and failed.data.tags[mlflow_runs.stage_tag("evaluation")] == "FAILED"
    hidden.rename(model)
    run_project(project_copy, pipeline_names=["evaluation"])
    assert client.get_run(run_id).info.status == "RUNNING"

    mlflow.end_run()  # nothing of the tasks is left active in this process
    assert dag_run.close_run(project_copy, os.environ["MLFLOW_RUN_ID"]) == "FINISHED"
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_unknown_run_id_is_refused_with_its_source(project_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef0123456789abcdef")
    with pytest.raises(ValueError, match=r"MLFLOW_RUN_ID .*'0123456789abcdef0123456789abcdef': no such run .*dag_run open"):
        run_project(project_copy, pipeline_names=["tokenization"])
