"""Project hooks: lineage records and staleness checks, and MLflow logging of what each stage produced.

kedro-mlflow (a plugin, registered by its entry point) opens one MLflow run per ``kedro run`` and
logs every parameter. These hooks add what it cannot know about:

- ``LineageHooks`` writes ``data/.lineage/<dataset>.json`` for every persisted output (fingerprints of
  the node's parameters and of its inputs' contents) and, before a node runs, warns when an input is
  stale, i.e. was built from parameters or inputs that have since changed. ``ALIGN3GR_ON_STALE``
  = ``warn`` (default) | ``error`` | ``ignore``.
- ``MlflowLoggingHooks`` logs stage metrics (``*_metrics`` / ``*metrics_*`` outputs and any output shaped
  like ``{"scalars", "curves"}``; curves by step),
  the files a stage writes under ``data/08_reporting`` and small SCID tables as artifacts, and tags
  the run with the git commit, the data fingerprint and, per checkpoint, what it was trained from.
- ``MlflowRunHooks`` keeps the runs honest: a run left RUNNING by a process that is gone (kill -9) is
  marked KILLED, a store copied with the project no longer sends artifacts to the original's mlruns/,
  and a run id given by an orchestrator (``MLFLOW_RUN_ID`` or ``tracking.run.id`` in mlflow.yml) is
  joined and left RUNNING for the next task (docs/mlflow_orchestrated.md).
- The served model (``inference``) is logged only when what it is built from changed; otherwise the run
  is tagged with the URI of the model already logged.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping
from numbers import Real
from pathlib import Path
from typing import Any

import mlflow
from kedro.framework.hooks import hook_impl
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from align3gr_pipelines.datasets import CheckpointDataset
from align3gr_pipelines.tracking import mlflow_runs
from align3gr_pipelines.tracking.lineage import (
    ContentFingerprinter,
    LineageRecord,
    LineageStore,
    StalenessChecker,
    combine,
    fingerprint_path,
    fingerprint_value,
    git_state,
    lineage_root,
    path_stat,
)

logger = logging.getLogger(__name__)

DEFAULT_DATA_ROOT = "data"
REPORTING_LAYER = "08_reporting"
ON_STALE_ENV = "ALIGN3GR_ON_STALE"
ON_STALE_MODES = ("warn", "error", "ignore")
MAX_ARTIFACT_MB_ENV = "ALIGN3GR_MLFLOW_MAX_ARTIFACT_MB"
_METRICS_NAME = re.compile(r"(^|_)metrics($|_)")
_BAD_METRIC_CHARS = re.compile(r"[^/\w.\- ]")
_MAX_TAG_CHARS = 8000
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch call
# The inference stage's served model: the node that logs it, what it is built from, and its parameters.
RUN_ID_ENV = "MLFLOW_RUN_ID"  # read by conf/base/mlflow.yml (tracking.run.id)
SERVED_MODEL_OUTPUT = "inference_model"
SERVED_MODEL_SOURCE = "inference_recommender"
SERVED_MODEL_PARAMS = "params:inference"


class StaleInputError(RuntimeError):
    """A node was about to consume an artifact built from parameters or inputs that have changed."""


def data_root(config_loader: Any) -> str:
    """The env's data root (`conf/<env>/globals.yml: data_root`), so each env keeps its own lineage."""
    try:
        return str(config_loader["globals"].get("data_root", DEFAULT_DATA_ROOT))
    except (KeyError, AttributeError, TypeError):
        return DEFAULT_DATA_ROOT


def lineage_store(project_path: str | os.PathLike, root: str = DEFAULT_DATA_ROOT) -> LineageStore:
    return LineageStore(lineage_root(project_path, root))


def on_stale_mode() -> str:
    mode = os.environ.get(ON_STALE_ENV, "warn").strip().lower() or "warn"
    if mode not in ON_STALE_MODES:
        raise ValueError(f"{ON_STALE_ENV}={mode!r}: expected one of {', '.join(ON_STALE_MODES)}")
    return mode


def is_parameter(name: str) -> bool:
    return name == "parameters" or name.startswith("params:")


def dataset_local_path(catalog: Any, name: str) -> Path | None:
    """The local file or directory a catalog dataset persists to; None for parameters, memory
    datasets and remote storage (which the lineage records cannot fingerprint cheaply)."""
    if is_parameter(name) or name not in catalog:
        return None
    dataset = catalog.get(name)
    if dataset is None or getattr(dataset, "_EPHEMERAL", False):
        return None
    if isinstance(dataset, CheckpointDataset):
        return dataset.local_path()  # None on remote storage
    try:
        description = dataset._describe()
    except Exception:  # a third-party dataset with a broken _describe must not break the run
        return None
    protocol = description.get("protocol")
    if protocol not in (None, "", "file", "local"):
        return None
    raw = description.get("filepath") or description.get("path")
    return Path(str(raw)) if raw else None


def parameter_fingerprint(catalog: Any, name: str) -> str | None:
    dataset = catalog.get(name) if name in catalog else None
    # dataset.load, not catalog.load: the catalog would log every parameter read by these checks.
    return None if dataset is None else fingerprint_value(dataset.load())


def staleness_checker(catalog: Any, store: LineageStore, fingerprinter: ContentFingerprinter | None = None) -> StalenessChecker:
    return StalenessChecker(
        store,
        param_fingerprint=lambda name: parameter_fingerprint(catalog, name),
        dataset_path=lambda name: dataset_local_path(catalog, name),
        fingerprinter=fingerprinter,
    )


def _relative(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            pass
    return path.as_posix()


class LineageHooks:
    """Records what every persisted output was built from, and checks inputs before a node runs."""

    def __init__(self) -> None:
        self.project_path: Path | None = None
        self.store: LineageStore | None = None
        self.catalog: Any = None
        self.git = None
        self.written: dict[str, LineageRecord] = {}
        self.stale_consumed: dict[str, list[str]] = {}
        self._fingerprinter = ContentFingerprinter()
        self._checker: StalenessChecker | None = None
        self._node_deps: dict[str, tuple[dict[str, str], dict[str, str | None]]] = {}
        self._ephemeral: dict[str, tuple[dict[str, str], dict[str, str | None]]] = {}
        self._mode = "warn"

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self.project_path = Path(context.project_path)
        self.store = lineage_store(self.project_path, data_root(context.config_loader))

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        # Read the mode now, not at import: settings are imported once per process, runs may differ.
        self._mode = on_stale_mode()
        if self.project_path is None:  # a session created without a context hook (should not happen)
            self.project_path = Path(run_params.get("project_path") or Path.cwd())
            self.store = lineage_store(self.project_path)
        self.catalog = catalog
        self.git = git_state(self.project_path, Path(__file__).parents[1])
        self.written = {}
        self.stale_consumed = {}
        self._node_deps = {}
        self._ephemeral = {}
        self._checker = None

    def local_path(self, name: str) -> Path | None:
        return dataset_local_path(self.catalog, name) if self.catalog is not None else None

    def _get_checker(self) -> StalenessChecker:
        if self._checker is None:
            self._checker = staleness_checker(self.catalog, self.store, self._fingerprinter)
        return self._checker

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any], is_async: bool, run_id: str) -> None:
        if self.store is None:
            return
        checker = self._get_checker()
        params: dict[str, str] = {}
        persisted: dict[str, str | None] = {}
        stale: dict[str, list[str]] = {}
        for name in node.inputs:
            if is_parameter(name):
                params[name] = fingerprint_value(inputs[name])
                continue
            if name in self._ephemeral:
                # An in-memory input stands for whatever its producer was built from.
                eph_params, eph_inputs = self._ephemeral[name]
                params.update(eph_params)
                persisted.update(eph_inputs)
                continue
            if self.local_path(name) is None:
                persisted[name] = None
                continue
            persisted[name] = checker.current_content(name)
            status = checker.check(name)
            if status.is_stale:
                stale[name] = status.reasons
        self._node_deps[node.name] = (params, persisted)
        if stale and self._mode != "ignore":
            self.stale_consumed.update(stale)
            lines = "\n".join(f"  - {name}: {'; '.join(reasons)}" for name, reasons in stale.items())
            message = (
                f"Node '{node.name}' is about to read stale input(s), built from parameters or inputs "
                f"that have changed since:\n{lines}\n"
                "Rebuild them first (see `kedro lineage status`), or set "
                f"{ON_STALE_ENV}=ignore to silence this check."
            )
            if self._mode == "error":
                raise StaleInputError(message)
            logger.warning(message)

    @hook_impl(tryfirst=True)
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        if self.store is None:
            return
        params, inputs = self._node_deps.get(node.name, ({}, {}))
        path = self.local_path(dataset_name)
        if path is None:
            self._ephemeral[dataset_name] = (dict(params), dict(inputs))
            return
        self._fingerprinter.forget(path)
        record = LineageRecord(
            dataset=dataset_name,
            node=node.name,
            path=_relative(path, self.project_path),
            content=fingerprint_path(path) if path.exists() else None,
            stat=path_stat(path),
            params=dict(params),
            inputs=dict(inputs),
            git_commit=self.git.commit if self.git else None,
            git_dirty=self.git.dirty if self.git else None,
        )
        self.store.write(record)
        self.written[dataset_name] = record
        self._checker = None  # memoized verdicts may depend on what was just rewritten


def metrics_to_mlflow(name: str, data: Any) -> list[tuple[str, float, int]]:
    """(key, value, step) triples for a metrics output.

    Accepts the contract's ``{"scalars": {...}, "curves": {k: [[step, value], ...]}, "info": {...}}``,
    a flat dict of numbers, or a table with ``metric`` and ``value`` columns (and optionally
    ``model``, ``split``), such as ``evaluation_metrics``.
    """
    out: list[tuple[str, float, int]] = []

    def key(*parts: Any) -> str:
        return ".".join(_BAD_METRIC_CHARS.sub("_", str(p)) for p in (name, *parts) if p not in (None, ""))

    def number(v: Any) -> float | None:
        if isinstance(v, bool) or not isinstance(v, Real):
            return None
        return float(v)

    if isinstance(data, Mapping):
        if "scalars" in data or "curves" in data:
            scalars = data.get("scalars") or {}
            curves = data.get("curves") or {}
            if not isinstance(scalars, Mapping) or not isinstance(curves, Mapping):
                raise ValueError(f"{name}: 'scalars' and 'curves' must be dicts (docs/CONTRACT.md)")
        else:
            scalars, curves = data, {}
        for k, v in scalars.items():
            value = number(v)
            if value is not None:
                out.append((key(k), value, 0))
        for k, points in curves.items():
            for point in points:
                if not (isinstance(point, (list, tuple)) and len(point) == 2 and number(point[0]) is not None):
                    raise ValueError(f"{name}: curve '{k}' must be a list of [step, value] pairs, got {point!r}")
                value = number(point[1])
                if value is not None:
                    out.append((key(k), value, int(point[0])))
        return out
    columns = getattr(data, "columns", None)
    if columns is not None and {"metric", "value"} <= set(columns):
        for row in data.to_dict("records"):
            value = number(row["value"])
            if value is not None and not math.isnan(value):
                out.append((key(row.get("model"), row.get("split"), row["metric"]), value, 0))
    return out


def _mlflow_conf(context: Any) -> dict[str, Any] | None:
    try:
        conf = context.config_loader["mlflow"]
    except Exception:  # no mlflow.yml: kedro-mlflow's defaults apply
        return None
    return dict(conf) if isinstance(conf, Mapping) else None


def _replace_mlflow_conf(context: Any, conf: Mapping[str, Any], section: str, key: str, value: Any) -> dict[str, Any]:
    """``conf`` with ``tracking.<section>.<key>`` set; an explicitly set key bypasses loading from files,
    so kedro-mlflow reads this version."""
    tracking = dict(conf.get("tracking") or {})
    tracking[section] = {**dict(tracking.get(section) or {}), key: value}
    new = {**conf, "tracking": tracking}
    context.config_loader["mlflow"] = new
    return new


def anchor_sqlite_uri(context: Any) -> None:
    """Make mlflow.yml's relative ``sqlite:///mlflow.db`` relative to the project, not to the working
    directory: a notebook in notebooks/ must find the same store as `kedro run`, and MLflow caches
    stores by URI, so two projects in one process must not share the text ``sqlite:///mlflow.db``."""
    conf = _mlflow_conf(context)
    if conf is None:
        return
    server = dict(conf.get("server") or {})
    uri = server.get("mlflow_tracking_uri")
    prefix = "sqlite:///"
    if not isinstance(uri, str) or not uri.startswith(prefix):
        return
    rel = uri[len(prefix):]
    if not rel or rel.startswith("/") or rel.startswith(":memory:"):
        return
    server["mlflow_tracking_uri"] = prefix + (Path(context.project_path) / rel).as_posix()
    tracking = dict(conf.get("tracking") or {})
    experiment = dict(tracking.get("experiment") or {})
    create_kwargs = dict(experiment.get("create_experiment_kwargs") or {})
    if create_kwargs.get("artifact_location") is None:
        # The embedded store keeps its artifacts beside it (kedro-mlflow anchors relative paths at the
        # project), not in ./mlruns of whatever directory first created the experiment.
        create_kwargs["artifact_location"] = "mlruns"
        tracking["experiment"] = {**experiment, "create_experiment_kwargs": create_kwargs}
    # An explicitly set key bypasses loading from files, so kedro-mlflow reads this version.
    context.config_loader["mlflow"] = {**conf, "server": server, "tracking": tracking}


def _tracking_uri(conf: Mapping[str, Any]) -> str | None:
    uri = (conf.get("server") or {}).get("mlflow_tracking_uri")
    return uri if isinstance(uri, str) and uri else None


def claim_copied_store(context: Any) -> str | None:
    """A project copied with its mlflow.db (``cp -a``, a copied worktree) holds the original's experiment,
    whose artifact location is an absolute path into the original's mlruns/: the copy's artifacts would land
    there. For a SQLite store inside the project whose artifacts belong inside it too (mlflow.yml's
    artifact_location null or relative), that experiment is renamed aside (its runs stay readable) and
    kedro-mlflow creates this project's own. Returns the set-aside experiment's new name, if any."""
    conf = _mlflow_conf(context)
    if conf is None:
        return None
    uri = _tracking_uri(conf)
    experiment = dict((conf.get("tracking") or {}).get("experiment") or {})
    location = (experiment.get("create_experiment_kwargs") or {}).get("artifact_location")
    name = experiment.get("name")
    if uri is None or not uri.startswith("sqlite:///") or not name:
        return None
    if location is not None and (Path(str(location)).is_absolute() or "://" in str(location)):
        return None  # an artifact store chosen on purpose, shared or not
    root = Path(context.project_path)
    db = Path(uri[len("sqlite:///"):])
    if not db.is_file() or not mlflow_runs.is_inside(db, root):
        return None
    try:
        return mlflow_runs.set_aside_foreign_experiment(MlflowClient(tracking_uri=uri), str(name), root)
    except Exception as exc:  # a store we cannot read here: kedro-mlflow reports it when it opens it
        logger.warning("MLflow: could not check where experiment '%s' keeps its artifacts: %s", name, exc)
        return None


def join_given_run(context: Any) -> str | None:
    """The run named by mlflow.yml's ``tracking.run.id`` (``MLFLOW_RUN_ID`` by default), checked, with the
    run's own experiment and name put into the conf so kedro-mlflow joins it as it is. None if none is given."""
    conf = _mlflow_conf(context)
    run_id = (((conf or {}).get("tracking") or {}).get("run") or {}).get("id")
    if not run_id:
        return None
    run_id = str(run_id)
    uri = _tracking_uri(conf) or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            logger.warning("MLflow: could not read run %s before joining it: %s", run_id, exc)
            return run_id
        raise ValueError(
            f"MLFLOW_RUN_ID / mlflow.yml tracking.run.id = {run_id!r}: no such run in {uri}. Open the shared run "
            "first (`python -m align3gr_pipelines.tracking.dag_run open` prints its id) or unset it."
        ) from None
    if run.info.lifecycle_stage == "deleted":
        raise ValueError(f"MLFLOW_RUN_ID / mlflow.yml tracking.run.id = {run_id!r}: that run was deleted in {uri}")
    experiment = client.get_experiment(run.info.experiment_id)
    conf = _replace_mlflow_conf(context, conf, "experiment", "name", experiment.name)
    _replace_mlflow_conf(context, conf, "run", "name", run.info.run_name)
    return run_id


class StagePrefixedParams:
    """kedro-mlflow's parameter logger for a shared run: every stage logs its parameters under ``<stage>/``,
    so two stages that read one parameter (``seed``) never collide. MLflow refuses to change a logged
    parameter; a stage rerun into the run with a changed value gets a warning and a ``changed/<name>`` tag
    instead of a failed task."""

    def __init__(self, log_param: Any, prefix: str) -> None:
        self._log_param = log_param
        self.prefix = prefix

    def __call__(self, name: str, value: Any) -> Any:
        key = f"{self.prefix}/{name}"
        try:
            return self._log_param(key, value)
        except MlflowException as exc:
            if "Changing param values is not allowed" not in str(exc):
                raise
            logger.warning("MLflow: parameter %s was logged to this shared run with another value; now %r (tag changed/%s)", key, value, key)
            mlflow.set_tag(f"changed/{key}", str(value)[:_MAX_TAG_CHARS])
            return None


def _kedro_mlflow_params_under(prefix: str | None) -> None:
    """Log kedro-mlflow's parameters under ``prefix/`` (None: as kedro-mlflow names them)."""
    try:
        from kedro_mlflow.framework.hooks.mlflow_hook import MlflowHook, mlflow_hook
    except ImportError:  # kedro-mlflow not installed: nothing logs parameters
        return
    mlflow_hook.__dict__.pop("_log_param", None)
    if prefix is not None:
        mlflow_hook._log_param = StagePrefixedParams(MlflowHook._log_param.__get__(mlflow_hook), prefix)


def _forget_previous_kedro_mlflow_run() -> None:
    """kedro-mlflow's hook is a process-wide singleton that keeps the run id of the previous session
    (2.0.3 does not reset it after a failed run or for a pipeline whose tracking is disabled). A later
    session in the same process (a notebook, a test) would then try to reopen that run in its own store
    before every node and fail with 'Run not found'. Every session starts without it."""
    try:
        from kedro_mlflow.framework.hooks.mlflow_hook import mlflow_hook
    except ImportError:  # kedro-mlflow not installed: nothing to reset
        return
    if getattr(mlflow_hook, "run_id", None) is not None:
        mlflow_hook.run_id = None
    _kedro_mlflow_params_under(None)


def pipeline_label(run_params: Mapping[str, Any]) -> str:
    """The stage(s) of a ``kedro run`` as one key: ``sft_train``, ``data_prep_tokenization``, ``__default__``."""
    names = run_params.get("pipeline_names") or run_params.get("pipeline_name") or ["__default__"]
    if isinstance(names, str):
        names = [names]
    return mlflow_runs.safe_key("+".join(names))


def _lineage_record_for(store: LineageStore | None, rel_path: str) -> LineageRecord | None:
    """The lineage record of the artifact stored at ``rel_path``, so a checkpoint is not rehashed when its
    files did not change since it was recorded."""
    if store is None or not isinstance(store.root, Path) or not store.root.is_dir():
        return None  # no records yet, or remote ones: the checkpoint is hashed
    for path in sorted(store.root.glob("*.json")):
        try:
            record = LineageRecord.from_json(json.loads(path.read_text(encoding="utf-8")), source=str(path))
        except (OSError, ValueError):
            continue
        if record.path == rel_path:
            return record
    return None


class MlflowLoggingHooks:
    """Logs stage outputs to the MLflow run that kedro-mlflow opened (or joined) for this ``kedro run``."""

    def __init__(self, lineage: LineageHooks) -> None:
        self.lineage = lineage
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._run_opened_outside: str | None = None
        self.project_path: Path | None = None
        self.experiment_name: str | None = None
        self.joined_run_id: str | None = None  # given by id (an orchestrator's shared run): not ours to end
        self.stage = "__default__"
        self.stamp: mlflow_runs.ProcessStamp | None = None
        self._joined_from_env: str | None = None
        self._served: dict[str, dict[str, str]] = {}

    @hook_impl(tryfirst=True)  # before kedro-mlflow reads mlflow.yml
    def after_context_created(self, context: Any) -> None:
        # A run someone opened before the session (an orchestrator) is theirs to close.
        active = mlflow.active_run()
        self._run_opened_outside = active.info.run_id if active else None
        self.project_path = Path(context.project_path).resolve()
        anchor_sqlite_uri(context)
        claim_copied_store(context)
        self.joined_run_id = None if active else join_given_run(context)
        env_id = os.environ.get(RUN_ID_ENV)
        self._joined_from_env = env_id if env_id and env_id == self.joined_run_id else None
        conf = _mlflow_conf(context) or {}
        self.experiment_name = ((conf.get("tracking") or {}).get("experiment") or {}).get("name")
        _forget_previous_kedro_mlflow_run()

    @hook_impl(trylast=True)  # after kedro-mlflow has started the run
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self.stamp = None
        self._served = {}
        run = mlflow.active_run()
        if run is None:  # tracking disabled for this pipeline in mlflow.yml
            self.client, self.run_id = None, None
            return
        self.client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.stage = pipeline_label(run_params)
        git = self.lineage.git
        self._tags(
            {
                "lineage.git_commit": git.commit if git else "unknown",
                "lineage.git_dirty": str(git.dirty).lower() if git else "unknown",
                "lineage.git_branch": git.branch if git else "unknown",
            }
        )
        # Who holds the run open, so that the next start can tell a run whose process was killed.
        stamp = mlflow_runs.ProcessStamp.current(self.stage)
        self._tags({mlflow_runs.PROJECT_TAG: str(self.project_path), stamp.tag_key: stamp.to_tag()})
        self.stamp = stamp
        if self.joined_run_id == self.run_id:
            self._tags({mlflow_runs.stage_tag(self.stage): "RUNNING"})
            _kedro_mlflow_params_under(self.stage)
        # A stage rerun on cached inputs still says which data it descends from.
        if self.lineage.local_path("data_fingerprint") is not None:
            path = self.lineage.local_path("data_fingerprint")
            if path.is_file():
                self._tag_data_fingerprint(path)

    def _guard(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        # A tracking server hiccup must not throw away hours of training whose artifacts are saved.
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            logger.warning("MLflow: could not %s: %s", what, exc)
            return None

    def _tags(self, tags: Mapping[str, str]) -> None:
        for k, v in tags.items():
            self._guard(f"set tag {k}", self.client.set_tag, self.run_id, k, str(v)[:_MAX_TAG_CHARS])

    def _tag_data_fingerprint(self, path: Path) -> None:
        tags = {"lineage.data_fingerprint": fingerprint_path(path)}
        try:
            content = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            content = None
        if isinstance(content, Mapping):
            for k, v in content.items():
                if isinstance(v, (str, int, float, bool)):
                    tags[f"lineage.data_fingerprint.{_BAD_METRIC_CHARS.sub('_', str(k))}"] = str(v)
        self._tags(tags)

    @hook_impl
    def before_node_run(self, node: Any, catalog: Any, inputs: dict[str, Any], is_async: bool, run_id: str) -> dict[str, Any] | None:
        """Before the served model is logged: if a model built from exactly the same checkpoint, catalogue and
        settings is already logged, hand its URI to the node instead of logging another full copy."""
        if self.run_id is None or SERVED_MODEL_OUTPUT not in node.outputs:
            return None
        params = inputs.get(SERVED_MODEL_PARAMS)
        recommender = inputs.get(SERVED_MODEL_SOURCE)
        if not isinstance(params, Mapping) or not params.get("log_model", True) or recommender is None:
            return None
        fingerprint = self._served_model_fingerprint(recommender, params)
        if fingerprint is None:
            return None
        self._served[node.name] = {"fingerprint": fingerprint}
        found = self._guard(
            "look for a logged model with the same inputs",
            mlflow_runs.served_model_uri, self.client, self.experiment_id, fingerprint,
        )
        if not found:
            return None
        uri, origin = found
        self._served[node.name].update(uri=uri, origin=origin)
        logger.info("MLflow: the served model's inputs are unchanged since run %s; reusing %s", origin, uri)
        return {SERVED_MODEL_PARAMS: {**params, "reuse_model_uri": uri}}

    def _served_model_fingerprint(self, recommender: Any, params: Mapping[str, Any]) -> str | None:
        """What the served model is built from: the recommender's parameters and persisted inputs (as the
        lineage hooks recorded them), the checkpoint's content and this node's settings."""
        deps = self.lineage._ephemeral.get(SERVED_MODEL_SOURCE)
        checkpoint = getattr(recommender, "checkpoint_dir", None)
        if deps is None or checkpoint is None:
            return None
        path = Path(checkpoint)
        known = _lineage_record_for(self.lineage.store, _relative(path, self.lineage.project_path))
        content = self.lineage._fingerprinter(path, known)
        if content is None:
            return None
        dep_params, dep_inputs = deps
        settings = {k: v for k, v in params.items() if k != "reuse_model_uri"}
        return combine({**dep_params, **dep_inputs, "checkpoint": content, SERVED_MODEL_PARAMS: fingerprint_value(settings)})

    @hook_impl
    def after_node_run(self, node: Any, outputs: dict[str, Any]) -> None:
        served = self._served.pop(node.name, None)
        out = outputs.get(SERVED_MODEL_OUTPUT)
        if served is None or self.run_id is None or not isinstance(out, Mapping):
            return
        tags = {mlflow_runs.SERVED_FINGERPRINT_TAG: served["fingerprint"]}
        if out.get("logged") and out.get("model_uri"):
            tags[mlflow_runs.SERVED_URI_TAG] = str(out["model_uri"])
        elif served.get("uri") and out.get("model_uri") == served["uri"]:
            tags[mlflow_runs.SERVED_URI_TAG] = served["uri"]
            tags[mlflow_runs.SERVED_REUSED_TAG] = served["origin"]
        else:
            return
        self._tags(tags)

    @hook_impl(trylast=True)  # after LineageHooks wrote the record
    def after_dataset_saved(self, dataset_name: str, data: Any, node: Any) -> None:
        if self.run_id is None:
            return
        # By name (docs/CONTRACT.md), or by shape: a training log written in the metrics format counts too.
        if _METRICS_NAME.search(dataset_name) or (isinstance(data, Mapping) and ("scalars" in data or "curves" in data)):
            self._log_metrics(dataset_name, data)
        path = self.lineage.local_path(dataset_name)
        if path is None or not path.exists():
            return
        rel = Path(_relative(path, self.lineage.project_path))
        if REPORTING_LAYER in rel.parts[:-1]:
            layer = rel.parts.index(REPORTING_LAYER)
            self._log_artifact(path, Path(*rel.parts[layer:-1]).as_posix())
        elif dataset_name.endswith("_scids"):
            self._log_artifact(path, "scids")
        if dataset_name == "data_fingerprint" and path.is_file():
            self._tag_data_fingerprint(path)
        dataset = self.lineage.catalog.get(dataset_name) if self.lineage.catalog is not None else None
        record = self.lineage.written.get(dataset_name)
        if isinstance(dataset, CheckpointDataset) and record is not None:
            self._tags(
                {
                    f"lineage.{dataset_name}.fingerprint": record.content or "unknown",
                    f"lineage.{dataset_name}.trained_from": json.dumps(
                        {**record.params, **record.inputs}, sort_keys=True
                    ),
                }
            )

    def _log_metrics(self, name: str, data: Any) -> None:
        try:
            triples = metrics_to_mlflow(name, data)
        except ValueError as exc:
            logger.warning("MLflow: metrics output %s does not follow docs/CONTRACT.md: %s", name, exc)
            return
        now = int(1000 * time.time())
        metrics = [Metric(key=k, value=v, timestamp=now, step=s) for k, v, s in triples]
        for i in range(0, len(metrics), _BATCH):
            self._guard(f"log metrics of {name}", self.client.log_batch, self.run_id, metrics=metrics[i : i + _BATCH])

    def _log_artifact(self, path: Path, artifact_path: str) -> None:
        limit_mb = float(os.environ.get(MAX_ARTIFACT_MB_ENV, "20"))
        stat = path_stat(path)
        if stat is None or stat["size"] > limit_mb * 2**20:
            logger.info("MLflow: %s is over %s MB; not logged as an artifact", path, limit_mb)
            return
        if path.is_dir():
            self._guard(f"log {path}", self.client.log_artifacts, self.run_id, str(path), f"{artifact_path}/{path.name}")
        else:
            self._guard(f"log {path}", self.client.log_artifact, self.run_id, str(path), artifact_path)

    def _summarize(self) -> None:
        if self.run_id is None:
            return
        if self.lineage.written:
            records = {name: r.to_json() for name, r in sorted(self.lineage.written.items())}
            # In a shared run every stage keeps its own record of what it wrote.
            where = f"lineage/{self.stage}/lineage.json" if self.joined_run_id == self.run_id else "lineage/lineage.json"
            self._guard("log lineage.json", self.client.log_dict, self.run_id, records, where)
        if self.lineage.stale_consumed:
            self._tags({"lineage.stale_inputs": ",".join(sorted(self.lineage.stale_consumed))})

    def _release(self, stage_status: str) -> None:
        """This process no longer holds the run: drop its stamp; in a shared run, record the stage's outcome."""
        if self.run_id is None:
            return
        if self.stamp is not None:
            self._guard("remove the process tag", self.client.delete_tag, self.run_id, self.stamp.tag_key)
            self.stamp = None
        if self.joined_run_id == self.run_id:
            self._tags({mlflow_runs.stage_tag(self.stage): stage_status})
            _kedro_mlflow_params_under(None)
        if self._joined_from_env:
            # mlflow.end_run() unsets MLFLOW_RUN_ID; the next session in this process (a notebook) is a
            # task of the same DAG run as much as this one was.
            os.environ[RUN_ID_ENV] = self._joined_from_env

    @hook_impl(trylast=True)  # after kedro-mlflow ended the run; the client can still log to it
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._summarize()
        # kedro-mlflow re-enters the run before each node, which leaves it on this thread's run stack
        # after it ends it once; a second `session.run()` in the same process (a notebook) would then
        # log into this run. Pop what is left of it.
        if self.run_id is not None and self.run_id != self._run_opened_outside:
            while (active := mlflow.active_run()) is not None and active.info.run_id == self.run_id:
                mlflow.end_run()
        self._release("FINISHED")
        if self.run_id is not None and self.joined_run_id == self.run_id:
            # kedro-mlflow ended the shared run; it stays open for the next task (FAILED if a stage failed).
            run = self._guard("read the shared run", self.client.get_run, self.run_id)
            if run is not None:
                status = mlflow_runs.shared_run_status(run.data.tags, "RUNNING")
                self._guard("keep the shared run open", self.client.update_run, self.run_id, status)

    @hook_impl(trylast=True)  # after kedro-mlflow ended the run FAILED (a retry that joins it reopens it)
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._summarize()
        self._release("FAILED")


class AbandonedRunHooks:
    """Before a run starts: runs of this project left RUNNING by a process that is gone are marked KILLED."""

    def __init__(self, logging_hooks: MlflowLoggingHooks) -> None:
        self.logging_hooks = logging_hooks

    @hook_impl(tryfirst=True)  # before kedro-mlflow starts (or joins) this run
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        name, project = self.logging_hooks.experiment_name, self.logging_hooks.project_path
        if not name or project is None:
            return
        try:
            client = MlflowClient(tracking_uri=mlflow.get_tracking_uri())
            experiment = client.get_experiment_by_name(name)
            if experiment is not None:
                mlflow_runs.reap_abandoned_runs(client, experiment.experiment_id, str(project))
        except Exception as exc:  # housekeeping must never stop a run
            logger.warning("MLflow: could not check for runs left RUNNING by killed processes: %s", exc)


_lineage_hooks = LineageHooks()
_mlflow_hooks = MlflowLoggingHooks(_lineage_hooks)
PROJECT_HOOKS: tuple = (_lineage_hooks, _mlflow_hooks, AbandonedRunHooks(_mlflow_hooks))
