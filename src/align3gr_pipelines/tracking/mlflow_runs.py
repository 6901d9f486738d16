"""MLflow run bookkeeping that kedro-mlflow leaves to the project, as plain functions over an ``MlflowClient``.

- Process stamps: every ``kedro run`` tags its run with ``align3gr.process.<host>.<pid>`` (pid, host, the
  process's start time) while it runs. A run still RUNNING whose stamped processes are all gone (kill -9,
  OOM, a power cut) is marked KILLED by the next run of the same project on that host.
- Shared (orchestrated) runs: one MLflow run that several ``kedro run`` tasks join by id; each stage's state
  is a tag ``align3gr.stage.<stage>.status`` and the run's status says whether any stage failed.
- Copied projects: an experiment of the project's own SQLite store whose artifacts live on local disk outside
  the project (the store was copied with the project) is set aside, so the copy logs into its own mlruns/.
- Served models: the fingerprint of what a served model was built from, tagged on the run that logged it,
  finds that model again when nothing changed.

This module knows nothing of Kedro: the hooks call it.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import psutil
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

PROCESS_TAG_PREFIX = "align3gr.process."
PROJECT_TAG = "align3gr.project_path"
KILLED_TAG = "align3gr.killed_reason"
STAGE_TAG_PREFIX = "align3gr.stage."
STAGE_TAG_SUFFIX = ".status"
SHARED_TAG = "align3gr.shared_run"
SERVED_FINGERPRINT_TAG = "align3gr.served_model.fingerprint"
SERVED_URI_TAG = "align3gr.served_model.uri"
SERVED_REUSED_TAG = "align3gr.served_model.reused_from_run"
FAILED_STATES = ("FAILED", "KILLED")
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")
# psutil's create_time and the value stamped are both floats from the same clock; allow for rounding only.
_START_TIME_TOLERANCE_S = 1.0


def safe_key(text: str) -> str:
    """``text`` with every character MLflow refuses in a tag, param or metric key replaced by ``_``."""
    return _BAD_KEY_CHARS.sub("_", text)


def stage_tag(stage: str) -> str:
    return f"{STAGE_TAG_PREFIX}{safe_key(stage)}{STAGE_TAG_SUFFIX}"


@dataclass(frozen=True)
class ProcessStamp:
    """Which process holds a run open: enough to tell later that it is gone, even if its pid was reused."""

    host: str
    pid: int
    started: float  # the process's start time (seconds since the epoch), which a reused pid does not share
    stage: str = ""

    @classmethod
    def current(cls, stage: str = "") -> "ProcessStamp":
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time(), stage)

    @property
    def tag_key(self) -> str:
        return f"{PROCESS_TAG_PREFIX}{safe_key(self.host)}.{self.pid}"

    def to_tag(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "started": self.started, "stage": self.stage}, sort_keys=True)

    @classmethod
    def from_tag(cls, value: str) -> "ProcessStamp | None":
        try:
            data = json.loads(value)
            return cls(str(data["host"]), int(data["pid"]), float(data["started"]), str(data.get("stage", "")))
        except (ValueError, TypeError, KeyError):
            return None  # someone else's tag under our prefix: not ours to judge


def process_alive(stamp: ProcessStamp) -> bool:
    """Whether the stamped process (this host) still runs; a pid now held by a younger process does not count."""
    try:
        proc = psutil.Process(stamp.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - stamp.started) <= _START_TIME_TOLERANCE_S
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's live process
        return True


def process_stamps(tags: Mapping[str, str]) -> dict[str, ProcessStamp]:
    stamps = {}
    for key, value in tags.items():
        if key.startswith(PROCESS_TAG_PREFIX) and (stamp := ProcessStamp.from_tag(value)) is not None:
            stamps[key] = stamp
    return stamps


def abandoned_by(tags: Mapping[str, str], host: str) -> list[ProcessStamp]:
    """The stamped processes of a RUNNING run if every one of them is on ``host`` and gone; else []: a run
    with no stamp (a shared run between two tasks) or a live or remote stamp is left alone."""
    stamps = list(process_stamps(tags).values())
    if not stamps or any(s.host != host for s in stamps) or any(process_alive(s) for s in stamps):
        return []
    return stamps


def reap_abandoned_runs(client: MlflowClient, experiment_id: str, project_path: str, host: str | None = None) -> list[str]:
    """Mark KILLED (with a tag saying why) every RUNNING run of this project whose processes on this host
    are all gone; returns their ids. Runs of other projects or hosts are never touched."""
    host = host or socket.gethostname()
    reaped = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        tags = run.data.tags
        if tags.get(PROJECT_TAG) != project_path:
            continue
        dead = abandoned_by(tags, host)
        if not dead:
            continue
        who = ", ".join(f"pid {s.pid} ({s.stage or '?'})" for s in dead)
        reason = (
            f"{who} on {host} ended without closing this run (killed or crashed); marked KILLED by pid "
            f"{os.getpid()} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
        )
        client.set_tag(run.info.run_id, KILLED_TAG, reason)
        for stamp in dead:
            if stamp.stage:
                client.set_tag(run.info.run_id, stage_tag(stamp.stage), "KILLED")
            client.delete_tag(run.info.run_id, stamp.tag_key)
        client.set_terminated(run.info.run_id, "KILLED")
        logger.warning("MLflow: run %s was left RUNNING by a process that is gone: %s", run.info.run_id, reason)
        reaped.append(run.info.run_id)
    return reaped


def shared_run_status(tags: Mapping[str, str], finished: str = "RUNNING") -> str:
    """FAILED if any stage of a shared run last ended FAILED or KILLED, else ``finished``."""
    failed = any(
        k.startswith(STAGE_TAG_PREFIX) and k.endswith(STAGE_TAG_SUFFIX) and v in FAILED_STATES for k, v in tags.items()
    )
    return "FAILED" if failed else finished


def local_artifact_path(location: str | None) -> Path | None:
    """The local directory of an artifact location (a plain path or file:// URI); None for anything remote."""
    if not location:
        return None
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location)
    return None


def is_inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def set_aside_foreign_experiment(client: MlflowClient, name: str, project_root: Path) -> str | None:
    """If experiment ``name`` keeps its artifacts on local disk outside ``project_root`` (this store was
    copied from another project), rename it to say where they are and return the new name, so that a fresh
    experiment ``name`` is created with its artifacts inside this project. The old runs stay readable."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return None
    where = local_artifact_path(experiment.artifact_location)
    if where is None or is_inside(where, project_root):
        return None
    new_name = f"{name} (copied; artifacts in {where})"
    if client.get_experiment_by_name(new_name) is not None:
        new_name = f"{new_name} #{experiment.experiment_id}"
    client.rename_experiment(experiment.experiment_id, new_name)
    logger.warning(
        "MLflow: experiment '%s' in this project's store keeps its artifacts in %s, outside this project (%s): "
        "the project or its mlflow.db was copied. Renamed it to '%s' (its runs stay readable); this project's runs "
        "go to a new '%s' whose artifacts live in its own mlruns/.", name, where, project_root, new_name, name,
    )
    return new_name


def served_model_uri(client: MlflowClient, experiment_id: str, fingerprint: str) -> tuple[str, str] | None:
    """(model URI, id of the run that logged it) of a served model built from exactly ``fingerprint``, newest first."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SERVED_FINGERPRINT_TAG}` = '{fingerprint}'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        uri = run.data.tags.get(SERVED_URI_TAG)
        if not uri or not uri.startswith("runs:/"):
            continue
        origin = uri.split("/")[1]
        if model_exists(uri):
            return uri, origin
    return None


def model_exists(uri: str) -> bool:
    """Whether ``uri`` still resolves to a model (its run, or the run's artifacts, may have been deleted)."""
    from mlflow.models import get_model_info

    try:
        get_model_info(uri)
        return True
    except Exception:  # any failure to resolve means: log the model again
        return False


def terminal_status(status: str) -> str:
    """``status`` checked against MLflow's terminal states (FINISHED, FAILED, KILLED)."""
    allowed = [s for s in ("FINISHED", "FAILED", "KILLED") if RunStatus.is_terminated(RunStatus.from_string(s))]
    if status not in allowed:
        raise ValueError(f"status {status!r}: expected one of {', '.join(allowed)}")
    return status
