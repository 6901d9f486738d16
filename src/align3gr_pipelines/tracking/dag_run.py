"""Open and close the one MLflow run that every task of an orchestrated DAG logs into.

    export MLFLOW_RUN_ID=$(python -m align3gr_pipelines.tracking.dag_run open --name nightly-2026-12-03)
    kedro run --pipelines=data_prep      # each task joins the run and leaves it RUNNING
    kedro run --pipelines=tokenization
    ...
    python -m align3gr_pipelines.tracking.dag_run close    # FINISHED, or FAILED if a stage failed

The run is created in the project's own tracking store and experiment, read from conf/<env>/mlflow.yml
exactly as `kedro run` reads it (hence a Kedro session here). Only the run id goes to stdout.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from align3gr_pipelines.tracking import mlflow_runs

RUN_ID_ENV = "MLFLOW_RUN_ID"


def _project_client(project: Path, env: str | None) -> tuple[MlflowClient, str]:
    """A client on the project's tracking store and the id of its experiment (created if need be), set up
    by the project's hooks and kedro-mlflow as a `kedro run` would be."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=env) as session:
        context = session.load_context()
        name = context.mlflow.tracking.experiment.name
    client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise RuntimeError(f"MLflow experiment {name!r} was not created in {mlflow.get_tracking_uri()}")
    return client, experiment.experiment_id


def open_run(project: Path, name: str | None = None, env: str | None = None) -> str:
    """Create the shared run (RUNNING, held by no process) and return its id."""
    saved = os.environ.pop(RUN_ID_ENV, None)  # a stale id in the shell must not be joined by the set-up session
    try:
        client, experiment_id = _project_client(project, env)
    finally:
        if saved is not None:
            os.environ[RUN_ID_ENV] = saved
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={mlflow_runs.SHARED_TAG: "true", mlflow_runs.PROJECT_TAG: str(project.resolve())},
    )
    return run.info.run_id


def close_run(project: Path, run_id: str, status: str | None = None, env: str | None = None) -> str:
    """End the shared run: ``status``, or FAILED if any stage's last task failed or was killed, else
    FINISHED. Returns the status set."""
    saved = os.environ.pop(RUN_ID_ENV, None)
    try:
        client, _ = _project_client(project, env)
    finally:
        if saved is not None:
            os.environ[RUN_ID_ENV] = saved
    run = client.get_run(run_id)
    final = mlflow_runs.terminal_status(status) if status else mlflow_runs.shared_run_status(run.data.tags, "FINISHED")
    client.set_terminated(run_id, final)
    return final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m align3gr_pipelines.tracking.dag_run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="project root (default: the working directory)")
    parser.add_argument("--env", default=None, help="Kedro env whose mlflow.yml to read (default: local)")
    sub = parser.add_subparsers(dest="command", required=True)
    opened = sub.add_parser("open", help="create the shared run and print its id")
    opened.add_argument("--name", default=None, help="the run's name in MLflow")
    closed = sub.add_parser("close", help="end the shared run")
    closed.add_argument("--run-id", default=os.environ.get(RUN_ID_ENV), help=f"default: ${RUN_ID_ENV}")
    closed.add_argument("--status", default=None, choices=["FINISHED", "FAILED", "KILLED"],
                        help="default: FAILED if a stage failed, else FINISHED")
    args = parser.parse_args(argv)
    # Kedro's log handler writes to stdout; only the run id may go there, for `$(...)`.
    with contextlib.redirect_stdout(sys.stderr):
        if args.command == "open":
            result = open_run(args.project, args.name, args.env)
        else:
            if not args.run_id:
                parser.error(f"close: no run id (pass --run-id or set {RUN_ID_ENV})")
            result = close_run(args.project, args.run_id, args.status, args.env)
    print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
