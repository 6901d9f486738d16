"""The real project's configuration supports what the integration relies on."""
from __future__ import annotations

from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import AbstractDataset
from kedro.io.core import parse_dataset_definition

from align3gr_pipelines import settings

from .conftest import REPO


def load_conf(key: str) -> dict:
    loader = OmegaConfigLoader(conf_source=str(REPO / "conf"), **settings.CONFIG_LOADER_ARGS)
    return loader[key]


def test_every_catalog_dataset_can_say_whether_it_exists() -> None:
    """`kedro run --only-missing-outputs` asks each persisted dataset `exists()`; a dataset class
    without `_exists` would make its node rerun every time (or the catalog would not load at all)."""
    catalog = load_conf("catalog")
    assert catalog, "no catalog entries under conf/base"
    problems = []
    for name, config in catalog.items():
        try:
            cls, _ = parse_dataset_definition(dict(config))
        except Exception as exc:  # an unknown `type:` breaks every session, not only reruns
            problems.append(f"{name}: type {config.get('type')!r} does not load: {str(exc).splitlines()[0]}")
            continue
        if cls._exists is AbstractDataset._exists:
            problems.append(f"{name}: {cls.__name__} does not implement _exists")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("env_value", [None, "http://127.0.0.1:5999"])
def test_tracking_uri_defaults_to_sqlite_and_follows_the_environment(
    env_value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env_value is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env_value)
    server = load_conf("mlflow")["server"]
    assert server["mlflow_tracking_uri"] == (env_value or "sqlite:///mlflow.db")


def test_project_cli_keeps_the_run_command() -> None:
    # `python -m align3gr_pipelines` looks `run` up in <package>.cli once that module exists.
    from kedro.framework.cli.utils import find_run_command

    assert find_run_command("align3gr_pipelines").name == "run"
    assert Path(REPO / "src/align3gr_pipelines/cli.py").is_file()
