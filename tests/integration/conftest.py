"""Fixtures for the integration tests: a toy Kedro project wired to the real settings, hooks and CLI.

The real stages are developed in parallel, so these tests run the project's machinery (hooks, lineage,
kedro-mlflow config, `kedro lineage`, the notebook; kedro-viz draws the real project) on ``toy_project/``:
four tiny stages that really compute and write datasets under the real names (items, item_scids, evaluation_metrics...).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest

from .mlflow_server import MlflowServer, ServerStartError, free_port  # noqa: F401  (free_port: for the tests)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOY_TEMPLATE = HERE / "toy_project"
# Copied from the real project so that the toy runs the real MLflow configuration.
REAL_CONF_FILES = ("mlflow.yml", "parameters.yml")
ENV_VARS = ("MLFLOW_TRACKING_URI", "ALIGN3GR_ON_STALE", "ALIGN3GR_PROJECT_PATH", "MLFLOW_EXPERIMENT_NAME")


def make_project(dest: Path) -> Path:
    shutil.copytree(TOY_TEMPLATE, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for name in REAL_CONF_FILES:
        shutil.copy2(REPO / "conf" / "base" / name, dest / "conf" / "base" / name)
    return dest


def run_project(project: Path, **run_kwargs) -> None:
    """`kedro run` in this process (the session runs every hook, kedro-mlflow's included)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        session.run(**run_kwargs)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests that need the mlflow server run after this folder's other tests, so it boots meanwhile.
    server = [i for i in items if HERE in Path(str(i.fspath)).parents and "mlflow_server" in getattr(i, "fixturenames", ())]
    if not server:
        return
    rest = [i for i in items if i not in server]
    mine = [k for k, i in enumerate(rest) if HERE in Path(str(i.fspath)).parents]
    cut = mine[-1] + 1 if mine else len(rest)
    items[:] = rest[:cut] + server + rest[cut:]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)


# What a toy-project run leaves configured in this process, as found before any test ran.
_START_CWD, _START_URI = Path.cwd(), mlflow.get_tracking_uri()


def reset_globals() -> None:
    """Undo what a toy-project run configures process-wide: an open MLflow run, the tracking URI, the
    working directory and Kedro's configured package (settings, pipelines)."""
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(_START_URI)
    os.chdir(_START_CWD)
    from kedro.framework.project import configure_project

    configure_project("align3gr_pipelines")


@pytest.fixture(autouse=True)
def _restore_globals() -> Iterator[None]:
    # Per test, not per session: a unit test collected after these must not run with the toy project's
    # settings or its MLflow URI still configured.
    yield
    reset_globals()


@pytest.fixture(scope="session")
def built_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy project after one full `kedro run` (read-only for tests: copy it to change anything)."""
    project = make_project(tmp_path_factory.mktemp("built") / "toy")
    with pytest.MonkeyPatch.context() as mp:
        for var in ENV_VARS:  # never log the fixture's run to a server configured in the caller's shell
            mp.delenv(var, raising=False)
        mp.chdir(project)  # mlflow.yml's sqlite:///mlflow.db is relative to the working directory
        try:
            run_project(project)
        finally:
            reset_globals()  # built inside some test's setup; leave nothing configured for the others
    return project


@pytest.fixture
def project_copy(built_project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the built project (data, lineage records, mlflow.db), as the working directory."""
    dest = tmp_path / "toy"
    shutil.copytree(built_project, dest, symlinks=True, ignore=shutil.ignore_patterns("build", "__pycache__"))
    monkeypatch.chdir(dest)
    return dest


@pytest.fixture(scope="session", autouse=True)
def _mlflow_server_early(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer | None]:
    # The server takes 15-40 s to answer on two busy cores; start it before the other tests run, not
    # when its test comes up, and only if that test was collected.
    if not any("mlflow_server" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    if importlib.util.find_spec("mlflow") is None:  # the one reason to skip; its test says so
        yield None
        return
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    yield server
    server.stop()


def ready_server(server: MlflowServer | None) -> MlflowServer:
    """The early-started server once it answers; a skip without mlflow, a failure (with its log) if it dies."""
    if server is None:
        pytest.skip("mlflow is not installed")
    try:
        server.wait_ready(timeout=180)
    except ServerStartError as error:  # a server that dies or never answers is a failure, with its log
        server.stop()
        pytest.fail(str(error), pytrace=False)
    return server


@pytest.fixture
def mlflow_server(_mlflow_server_early: MlflowServer | None) -> Iterator[MlflowServer]:
    server = ready_server(_mlflow_server_early)
    yield server
    server.stop()  # not at session end: the rest of the suite should not share the CPUs with it
