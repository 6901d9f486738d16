"""`load_recommender`: the Python API over a trained project, configured exactly as
`kedro run --pipelines=inference` configures its recommender (same catalog, parameters and env)."""
from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kedro.framework.project import settings
from kedro.framework.startup import bootstrap_project
from kedro.io import DataCatalog

from align3gr_pipelines.serving.recommend import Recommender, build_recommender


@contextmanager
def _cwd(path: Path) -> Iterator[None]:
    # Catalog paths are relative to the project root, as under `kedro run`.
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def load_recommender(
    project_path: str | Path | None = None, env: str | None = None, checkpoint: str | None = None,
    params: Mapping[str, Any] | None = None,
) -> Recommender:
    """The recommender of the project at ``project_path`` (default: the working directory).

    ``checkpoint``: a stage label ('sft', 'sp_dpo_easy', ..., 'rf_dpo_hard'), a directory under 06_models or
    a path; None: `inference.checkpoint`, whose null means the newest complete stage. ``params``: overrides
    of the `inference` parameters (e.g. ``{"beam_width": 50}``)."""
    root = Path(project_path or Path.cwd()).resolve()
    bootstrap_project(root)
    loader = settings.CONFIG_LOADER_CLASS(conf_source=str(root / settings.CONF_SOURCE), env=env, **settings.CONFIG_LOADER_ARGS)
    parameters = loader["parameters"]
    inference = {**parameters["inference"], **(params or {})}
    if checkpoint is not None:
        inference["checkpoint"] = checkpoint
    with _cwd(root):
        catalog = DataCatalog.from_config(loader["catalog"])
        items = catalog.load("items")
        # SASRec is read only when the hybrid ranks (an LM-only recommender never touches it).
        sasrec = catalog.load("sasrec_model") if inference.get("ranker", "lm") != "lm" else None
        recommender = build_recommender(catalog.load("item_scids"), items[["item_id", "title"]], catalog.load("user_scids"),
                                        parameters["sft_data"], inference, sasrec=sasrec)
        if recommender.checkpoint_dir is not None and not recommender.checkpoint_dir.is_absolute():
            recommender.checkpoint_dir = root / recommender.checkpoint_dir
    return recommender
