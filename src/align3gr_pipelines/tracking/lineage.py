"""Lineage of persisted artifacts: fingerprints, an atomic per-dataset record store, and staleness.

Kedro reruns a node only when its output is missing; it cannot tell that `item_scids` on disk was
built with last week's tokenizer parameters. So every persisted output gets a small JSON record
(``data/.lineage/<dataset>.json``) holding the fingerprints it was built from: the parameters its
producing node read and the content of every persisted input (ephemeral inputs are expanded to the
parameters and persisted inputs behind them). An artifact is *stale* when one of those no longer
matches what is there now, or when one of its inputs is itself stale.

This module knows nothing of Kedro: the hooks and the ``kedro lineage`` command feed it names,
paths and parameter values.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from align3gr_pipelines.datasets.atomic_io import is_local, locate, write_file_atomically

RECORD_VERSION = 1
# Files that change on every save without the artifact changing: the checkpoint completion marker
# holds a timestamp, and in-flight temporary files belong to no finished artifact.
IGNORED_FILE_NAMES = frozenset({"_CHECKPOINT_COMPLETE.json", ".DS_Store"})
_CHUNK = 1 << 20
_DIGEST_CHARS = 16


def _digest(h: "hashlib._Hash") -> str:
    return h.hexdigest()[:_DIGEST_CHARS]


def _canonical(value: Any) -> str:
    # sort_keys + repr fallback: the same parameters always give the same text, whatever their order.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr, ensure_ascii=False)


def fingerprint_value(value: Any) -> str:
    """Fingerprint of a JSON-like value (parameters): stable under dict key order."""
    return _digest(hashlib.sha256(_canonical(value).encode("utf-8")))


def combine(parts: Mapping[str, str | None]) -> str:
    """One fingerprint for a mapping of named fingerprints."""
    return fingerprint_value(dict(parts))


def _ignored(name: str) -> bool:
    return name in IGNORED_FILE_NAMES or ".tmp-" in name or ".old-" in name


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(
        p for p in path.rglob("*") if p.is_file() and not any(_ignored(part) for part in p.relative_to(path).parts)
    )


def path_stat(path: str | os.PathLike) -> dict[str, int] | None:
    """Cheap change detector (size, newest mtime, file count); None if the path does not exist."""
    p = Path(path)
    if not p.exists():
        return None
    files = _files(p)
    stats = [f.stat() for f in files]
    return {
        "size": sum(s.st_size for s in stats),
        "mtime_ns": max((s.st_mtime_ns for s in stats), default=0),
        "files": len(files),
    }


def fingerprint_path(path: str | os.PathLike) -> str:
    """Content fingerprint of a file, or of a directory (relative names + contents of every file).

    Timestamps are left out, so a deterministic rebuild gives the same fingerprint and does not make
    its consumers stale.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"cannot fingerprint {p}: it does not exist")
    h = hashlib.sha256()
    for f in _files(p):
        if p.is_dir():
            h.update(f.relative_to(p).as_posix().encode("utf-8") + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
        h.update(b"\0")
    return _digest(h)


class ContentFingerprinter:
    """Fingerprints paths, rehashing only when their (size, mtime, file count) changed.

    Checkpoints can be hundreds of MB; a hook that checks inputs before every node must not rehash
    them each time.
    """

    def __init__(self) -> None:
        self._cache: dict[str, tuple[dict[str, int], str]] = {}

    def __call__(self, path: str | os.PathLike, known: "LineageRecord | None" = None) -> str | None:
        stat = path_stat(path)
        if stat is None:
            return None
        key = str(Path(path).resolve())
        cached = self._cache.get(key)
        if cached and cached[0] == stat:
            return cached[1]
        if known is not None and known.stat == stat and known.content:
            fp = known.content
        else:
            fp = fingerprint_path(path)
        self._cache[key] = (stat, fp)
        return fp

    def forget(self, path: str | os.PathLike) -> None:
        self._cache.pop(str(Path(path).resolve()), None)


@dataclass(frozen=True)
class GitState:
    commit: str
    dirty: bool
    branch: str


def git_state(*candidates: str | os.PathLike) -> GitState | None:
    """The commit (and whether the work tree has changes) of the first candidate inside a git repo."""
    for where in candidates:
        try:
            def git(*args: str) -> str:
                return subprocess.run(
                    ["git", "-C", str(where), *args], capture_output=True, text=True, check=True, timeout=30
                ).stdout.strip()

            commit = git("rev-parse", "HEAD")
            dirty = bool(git("status", "--porcelain"))
            branch = git("rev-parse", "--abbrev-ref", "HEAD")
            return GitState(commit=commit, dirty=dirty, branch=branch)
        except (OSError, subprocess.SubprocessError):
            continue
    return None


@dataclass
class LineageRecord:
    """How one persisted artifact was built."""

    dataset: str
    node: str
    path: str
    content: str | None  # fingerprint of the artifact as saved
    stat: dict[str, int] | None
    params: dict[str, str]  # parameter dataset name ("params:x") -> fingerprint of its value
    inputs: dict[str, str | None]  # persisted input dataset name -> its content fingerprint when read
    git_commit: str | None = None
    git_dirty: bool | None = None
    recorded_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    version: int = RECORD_VERSION

    @property
    def recipe(self) -> str:
        """Fingerprint of everything the artifact was built from."""
        return combine({**self.params, **self.inputs})

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "recipe": self.recipe}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "<record>") -> "LineageRecord":
        try:
            return cls(
                dataset=data["dataset"],
                node=data["node"],
                path=data["path"],
                content=data.get("content"),
                stat=data.get("stat"),
                params=dict(data.get("params", {})),
                inputs=dict(data.get("inputs", {})),
                git_commit=data.get("git_commit"),
                git_dirty=data.get("git_dirty"),
                recorded_at=data.get("recorded_at", ""),
                version=int(data.get("version", RECORD_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed lineage record {source}: {exc!r}") from exc


def _safe_name(dataset: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in dataset)


def lineage_root(project_path: str | os.PathLike, data_root: str) -> Path | str:
    """Where an env's lineage records live: ``<data_root>/.lineage``, under the project for a local
    ``data_root``, beside the data for a remote one (``s3://bucket/data`` -> ``s3://bucket/data/.lineage``)."""
    if "://" in data_root and not data_root.startswith("file://"):
        return data_root.rstrip("/") + "/.lineage"
    local = data_root[len("file://"):] if data_root.startswith("file://") else data_root
    return Path(project_path) / local / ".lineage"


class LineageStore:
    """One JSON file per dataset under ``root`` (a local folder or any fsspec URL), each replaced atomically.

    ``root`` and ``path_for`` are Paths for a local root and URLs (``s3://...``) otherwise.
    """

    def __init__(self, root: str | os.PathLike, storage_options: Mapping[str, Any] | None = None) -> None:
        self._fs, fs_root = locate(root, storage_options)
        self._local = is_local(self._fs)
        self._fs_root = fs_root.rstrip("/")
        self.root: Path | str = Path(fs_root) if self._local else str(root).rstrip("/")

    def _fs_path(self, dataset: str) -> str:
        return posixpath.join(self._fs_root, f"{_safe_name(dataset)}.json")

    def path_for(self, dataset: str) -> Path | str:
        if self._local:
            return Path(self.root) / f"{_safe_name(dataset)}.json"
        return f"{self.root}/{_safe_name(dataset)}.json"

    def write(self, record: LineageRecord) -> Path | str:
        text = json.dumps(record.to_json(), indent=2, sort_keys=True)

        def write(tmp: str) -> None:
            with self._fs.open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)

        write_file_atomically(self._fs, self._fs_path(record.dataset), write)
        return self.path_for(record.dataset)

    def read(self, dataset: str) -> LineageRecord | None:
        path = self._fs_path(dataset)
        if not self._local:
            self._fs.invalidate_cache(path)
        if not self._fs.isfile(path):
            return None
        where = str(self.path_for(dataset))
        with self._fs.open(path, "r", encoding="utf-8") as fh:
            text = fh.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"lineage record {where} is not valid JSON ({exc}); delete it and rerun the node") from exc
        record = LineageRecord.from_json(data, source=where)
        return record if record.dataset == dataset else None

    def delete(self, dataset: str) -> None:
        path = self._fs_path(dataset)
        if self._local:
            Path(path).unlink(missing_ok=True)
        elif self._fs.exists(path):
            self._fs.rm(path)


FRESH, STALE, MISSING, UNTRACKED = "fresh", "stale", "missing", "untracked"


@dataclass
class Staleness:
    dataset: str
    status: str  # fresh | stale | missing | untracked
    reasons: list[str] = field(default_factory=list)
    record: LineageRecord | None = None

    @property
    def is_stale(self) -> bool:
        return self.status == STALE


class StalenessChecker:
    """Decides, per dataset, whether what it was built from still matches the present.

    ``param_fingerprint(name)`` gives the current fingerprint of a parameter dataset (None if it no
    longer exists); ``dataset_path(name)`` the local path of a persisted dataset (None if it has none).
    Results are memoized: make a new checker after anything is rewritten.
    """

    def __init__(
        self,
        store: LineageStore,
        param_fingerprint: Callable[[str], str | None],
        dataset_path: Callable[[str], str | os.PathLike | None],
        fingerprinter: ContentFingerprinter | None = None,
    ) -> None:
        self._store = store
        self._param_fp = param_fingerprint
        self._path = dataset_path
        self._fp = fingerprinter or ContentFingerprinter()
        self._memo: dict[str, Staleness] = {}

    def current_content(self, dataset: str) -> str | None:
        path = self._path(dataset)
        if path is None:
            return None
        return self._fp(path, self._store.read(dataset))

    def check(self, dataset: str) -> Staleness:
        if dataset in self._memo:
            return self._memo[dataset]
        # A placeholder breaks (impossible in a DAG, but cheap to guard) cycles.
        self._memo[dataset] = Staleness(dataset, UNTRACKED)
        result = self._check(dataset)
        self._memo[dataset] = result
        return result

    def _check(self, dataset: str) -> Staleness:
        path = self._path(dataset)
        if path is not None and not Path(path).exists():
            return Staleness(dataset, MISSING, ["not built yet"])
        record = self._store.read(dataset)
        if record is None:
            return Staleness(dataset, UNTRACKED, ["no lineage record (built before lineage tracking, or outside a Kedro run)"])
        reasons: list[str] = []
        if path is not None and record.content is not None:
            now = self._fp(path, record)
            if now != record.content:
                reasons.append(f"its file changed after it was recorded (content {record.content} -> {now})")
        for name, then in sorted(record.params.items()):
            now = self._param_fp(name)
            if now is None:
                reasons.append(f"parameter '{name}' no longer exists")
            elif now != then:
                reasons.append(f"parameter '{name}' changed since it was built")
        for name, then in sorted(record.inputs.items()):
            upstream = self.check(name)
            now = self.current_content(name)
            if upstream.status == MISSING or (now is None and self._path(name) is not None):
                reasons.append(f"input '{name}' is missing")
            elif then is not None and now is not None and now != then:
                reasons.append(f"input '{name}' was rebuilt or changed since it was built")
            elif upstream.is_stale:
                reasons.append(f"input '{name}' is stale")
        return Staleness(dataset, STALE if reasons else FRESH, reasons, record)

    def check_all(self, datasets: Iterable[str]) -> dict[str, Staleness]:
        return {name: self.check(name) for name in datasets}
