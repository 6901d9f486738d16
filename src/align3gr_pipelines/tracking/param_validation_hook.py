"""Kedro hook: the run's parameters (conf/base + the env + ``--params``) are checked against conf/base before
the pipeline starts, so a typo such as ``--params evaluation.beam_widht=5`` stops the run instead of being
ignored. The check itself is `param_schema` (docs/parameters.md); ``ALIGN3GR_SKIP_PARAM_CHECK=1`` skips it.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from kedro.framework.hooks import hook_impl

from align3gr_pipelines.tracking.param_schema import SKIP_ENV, ParamSchema, build_schema, check_params

logger = logging.getLogger(__name__)

_PARAM_SUFFIXES = (".yml", ".yaml", ".json")


def check_disabled() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def base_sources(conf_source: str | os.PathLike, base_env: str, patterns: list[str]) -> dict[str, str]:
    """Top-level parameter key -> the base file that defines it (e.g. ``conf/base/parameters_evaluation.yml``),
    found with the config loader's parameter patterns."""
    conf = Path(conf_source)
    base = conf / base_env
    files = sorted({p for pattern in patterns for p in base.glob(pattern)
                    if p.is_file() and p.suffix in _PARAM_SUFFIXES and not p.name.startswith(".")})
    sources: dict[str, str] = {}
    for path in files:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if isinstance(loaded, dict):
            for key in loaded:
                sources.setdefault(str(key), f"{conf.name}/{path.relative_to(conf).as_posix()}")
    return sources


def schema_for(config_loader: Any) -> ParamSchema:
    """The schema of the project's conf/base parameters, read by a loader configured as the run's
    (settings.py: merge strategy, patterns, resolvers) but for the base env alone and no runtime params."""
    from kedro.framework.project import settings

    base_env = config_loader.base_env
    loader = settings.CONFIG_LOADER_CLASS(
        conf_source=str(config_loader.conf_source), env=base_env,
        **{**settings.CONFIG_LOADER_ARGS, "base_env": base_env},
    )
    patterns = list(config_loader.config_patterns["parameters"])
    return build_schema(loader["parameters"], base_sources(config_loader.conf_source, base_env, patterns))


class ParamValidationHooks:
    """Checks the merged parameters before the pipeline runs (first among the before_pipeline_run hooks,
    so no MLflow run is opened for a run that cannot start)."""

    def __init__(self) -> None:
        self._config_loader: Any = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._config_loader = context.config_loader

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if check_disabled():
            logger.warning("%s is set: parameters are not checked against conf/base", SKIP_ENV)
            return
        if self._config_loader is None:  # never happens in `kedro run`; a caller driving hooks by hand
            logger.warning("parameter check skipped: no Kedro context was created before the run")
            return
        params = self._config_loader["parameters"]  # conf/base + env + runtime --params, resolved
        check_params(params, schema_for(self._config_loader))
        logger.info("parameters checked against conf/base (env %s)", run_params.get("env"))
