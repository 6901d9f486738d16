"""Runs after tests/integration in a whole-suite run (collection order) and checks that no toy-project
state leaked out of it: Kedro's configured package, the MLflow tracking URI, an open run, the working
directory. Alone it checks a fresh process, which must pass too."""
from __future__ import annotations

from pathlib import Path

import mlflow


def test_no_toy_project_state_is_left_configured(request):
    from kedro.framework import project

    assert project.PACKAGE_NAME in (None, "align3gr_pipelines"), f"configured package: {project.PACKAGE_NAME}"
    assert mlflow.active_run() is None
    assert "toy" not in mlflow.get_tracking_uri() and "pytest-of" not in mlflow.get_tracking_uri(), mlflow.get_tracking_uri()
    assert Path.cwd() == Path(request.config.invocation_params.dir)
