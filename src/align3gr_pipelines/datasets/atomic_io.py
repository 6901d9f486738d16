"""Atomic writes of files and directories on any fsspec filesystem, and cleanup of the temporaries a
killed writer leaves behind.

A local filesystem can rename atomically, so a file or directory is written beside its final place and
``os.replace``d over it. An object store (``s3://``, ``gcs://``, ``memory://`` ...) cannot rename: the
object goes to a temporary key and is then moved (copied) over the final key. Either way a reader never
sees a half-written artifact and a failed write keeps the previous one.

Temporaries are siblings of their target named ``.<name>.tmp-<host>-<pid>-<random>``: they are hidden,
the lineage fingerprints skip them (``.tmp-``), and the next save of the same target can tell an orphan
(its writer's pid is dead on this host, or nothing in it changed for a while) from a concurrent writer.

This module knows nothing of Kedro; the dataset classes beside it feed it a filesystem and a path.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

logger = logging.getLogger(__name__)

# An orphan is a temporary whose writer is gone. On this host a dead pid says so at once; otherwise
# (another host, a legacy name without a pid, an object store) only a long silence does: a live writer
# keeps touching its files, so nothing modified for STALE_AFTER_S means nobody is writing it any more.
STALE_AFTER_S = 10 * 60
# A live pid may be a recycled one (a restarted container reuses small pids), so even a "live" writer's
# temporary is removed after this long without a single write.
ALIVE_STALE_AFTER_S = 60 * 60

_HOST = hashlib.sha1(socket.gethostname().encode("utf-8")).hexdigest()[:6]
_TEMP_KINDS = ("tmp", "old")
_announced: set[tuple[str, str]] = set()
_announce_lock = threading.Lock()


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def protocol_of(fs: fsspec.AbstractFileSystem) -> str:
    protocol = fs.protocol
    return protocol[0] if isinstance(protocol, (tuple, list)) else str(protocol)


def locate(
    url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and its own path for ``url``. A local path stays as given (relative ones too), so
    local behaviour does not depend on where this was called from."""
    text = os.fspath(url)
    protocol, rest = fsspec.core.split_protocol(text)
    if protocol in (None, "file", "local"):
        return LocalFileSystem(), rest
    fs, path = fsspec.core.url_to_fs(text, **dict(storage_options or {}))
    return fs, path


def _announce(fs: fsspec.AbstractFileSystem, what: str) -> None:
    """Log once per process and filesystem kind how artifacts are made atomic there."""
    key = (protocol_of(fs), what)
    with _announce_lock:
        if key in _announced:
            return
        _announced.add(key)
    where = f"{protocol_of(fs)}://"
    if is_local(fs):
        how = "are written beside their final place and renamed over it (os.replace)"
    elif what == "dir":
        how = ("are uploaded under a temporary prefix, then copied over the final prefix with their completion "
               "marker written last (an object store cannot rename atomically)")
    else:
        how = ("are written to a temporary key, then moved (copied) over the final key (an object store cannot "
               "rename atomically)")
    logger.info("Atomic artifacts: %s on %s %s", "directories" if what == "dir" else "files", where, how)


def temp_sibling(path: str, kind: str = "tmp") -> str:
    """A hidden name beside ``path`` that encodes this host and pid (see the module docstring)."""
    if kind not in _TEMP_KINDS:
        raise ValueError(f"temp_sibling: kind must be one of {_TEMP_KINDS}, got {kind!r}")
    parent, name = posixpath.split(path.rstrip("/"))
    return posixpath.join(parent, f".{name}.{kind}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@dataclass(frozen=True)
class TempName:
    host: str | None
    pid: int | None


def parse_temp_name(target_name: str, candidate: str) -> TempName | None:
    """Who wrote ``candidate``, if it is a temporary of ``target_name`` (ours, or a pre-pid legacy one)."""
    pattern = rf"\.{re.escape(target_name)}\.(?:{'|'.join(_TEMP_KINDS)})-(?:([0-9a-f]{{6}})-(\d+)-)?[0-9a-f]{{8}}"
    match = re.fullmatch(pattern, candidate)
    if match is None:
        return None
    host, pid = match.groups()
    return TempName(host=host, pid=int(pid) if pid else None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    except OSError:
        return True  # cannot tell: assume alive, never break a writer
    return True


def _epoch(value: Any) -> float | None:
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return _epoch(dt.datetime.fromisoformat(value.replace("Z", "+00:00")))
        except ValueError:
            return None
    return None


def _info_mtime(info: Mapping[str, Any]) -> float | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created", "mtime_ns"):
        if info.get(key) is not None:
            seconds = _epoch(info[key])
            if seconds is not None:
                return seconds / 1e9 if key == "mtime_ns" else seconds
    return None


def newest_mtime(fs: fsspec.AbstractFileSystem, path: str) -> float | None:
    """When anything under ``path`` (a file, or a directory tree) was last written; None if unknown."""
    if is_local(fs):
        p = Path(path)
        try:
            times = [p.lstat().st_mtime]
            if p.is_dir():
                for root, dirs, files in os.walk(p):
                    times += [os.lstat(os.path.join(root, n)).st_mtime for n in (*dirs, *files)]
        except FileNotFoundError:
            return None
        return max(times)
    try:
        infos = list(fs.find(path, detail=True, withdirs=False).values()) if fs.isdir(path) else [fs.info(path)]
    except FileNotFoundError:
        return None
    times = [t for t in (_info_mtime(i) for i in infos) if t is not None]
    return max(times) if times else None


def stale_reason(fs: fsspec.AbstractFileSystem, path: str, who: TempName, now: float) -> str | None:
    """Why the temporary at ``path`` is an orphan, or None if a writer may still own it."""
    age = None
    mtime = newest_mtime(fs, path)
    if mtime is not None:
        age = now - mtime
    if who.pid is not None and who.host == _HOST and is_local(fs):
        if not _pid_alive(who.pid):
            return f"its writer (pid {who.pid}) is gone"
        if age is not None and age > ALIVE_STALE_AFTER_S:
            return f"nothing in it changed for {age / 60:.0f} min (pid {who.pid} is probably recycled)"
        return None
    if age is not None and age > STALE_AFTER_S:
        return f"nothing in it changed for {age / 60:.0f} min"
    return None


def _remove(fs: fsspec.AbstractFileSystem, path: str) -> None:
    if is_local(fs):
        p = Path(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return os.path.lexists(path) if is_local(fs) else fs.exists(path)


def clean_stale_temporaries(fs: fsspec.AbstractFileSystem, path: str, now: float | None = None) -> list[str]:
    """Remove orphaned temporaries of ``path`` (see ``stale_reason``); returns what was removed.

    Never raises: a cleanup that fails must not fail the save that triggered it.
    """
    parent, name = posixpath.split(path.rstrip("/"))
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        if is_local(fs):
            siblings = [e.name for e in os.scandir(parent or ".")] if os.path.isdir(parent or ".") else []
        else:
            fs.invalidate_cache(parent)
            listed = fs.ls(parent, detail=False) if fs.exists(parent) else []
            siblings = [posixpath.basename(p.rstrip("/")) for p in listed]
    except Exception as exc:  # any store error: the save itself must still go ahead
        logger.debug("cannot list %s for stale temporaries: %s", parent, exc)
        return removed
    for sibling in sorted(siblings):
        who = parse_temp_name(name, sibling)
        if who is None:
            continue
        candidate = posixpath.join(parent, sibling)
        try:
            reason = stale_reason(fs, candidate, who, now)
            if reason is None:
                continue
            _remove(fs, candidate)
        except Exception as exc:  # as above: a failed cleanup is reported, never fatal
            logger.warning("could not remove the stale temporary %s: %s", candidate, exc)
            continue
        logger.info("removed the stale temporary %s: %s", candidate, reason)
        removed.append(candidate)
    return removed


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(fs: fsspec.AbstractFileSystem, path: str, write: Callable[[str], None]) -> None:
    """``write(temp_path)`` writes the artifact at a temporary sibling; it then replaces ``path``.

    Whatever ``write`` raises propagates, ``path`` keeps its previous content and no temporary is left.
    """
    path = path.rstrip("/")
    parent = posixpath.dirname(path)
    if is_local(fs):
        os.makedirs(parent or ".", exist_ok=True)
    elif parent:
        fs.makedirs(parent, exist_ok=True)
    _announce(fs, "file")
    clean_stale_temporaries(fs, path)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        if is_local(fs):
            _fsync_file(tmp)  # a power cut after the rename must not leave an empty file
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)
            fs.invalidate_cache(path)
    finally:
        if _exists(fs, tmp):
            _remove(fs, tmp)


def write_bytes_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with fs.open(tmp, "wb") as fh:
            fh.write(data)

    write_file_atomically(fs, path, write)


def _local_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def write_dir_atomically(
    fs: fsspec.AbstractFileSystem,
    path: str,
    fill: Callable[[str], None],
    marker: tuple[str, bytes] | None = None,
) -> None:
    """``fill(local_dir)`` writes the directory's files into a local folder; the folder then replaces ``path``.

    ``marker`` (name, content) is written last: a reader that checks for it never loads a half-written
    directory. Locally the whole folder is renamed into place. On an object store every file is first
    uploaded under a temporary prefix (the slow part, while the previous version stays readable), then
    the previous version's marker and files are removed, the files copied to the final prefix server-side,
    and the marker written last.
    """
    path = path.rstrip("/")
    _announce(fs, "dir")
    clean_stale_temporaries(fs, path)
    if is_local(fs):
        _write_local_dir(path, fill, marker)
    else:
        _write_remote_dir(fs, path, fill, marker)


def _write_local_dir(path: str, fill: Callable[[str], None], marker: tuple[str, bytes] | None) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(temp_sibling(path))
    try:
        fill(str(tmp))
        if marker is not None:
            (tmp / marker[0]).write_bytes(marker[1])
        old = None
        if target.exists():
            old = Path(temp_sibling(path, "old"))
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_remote_dir(fs: fsspec.AbstractFileSystem, path: str, fill: Callable[[str], None],
                      marker: tuple[str, bytes] | None) -> None:
    tmp = temp_sibling(path)
    with tempfile.TemporaryDirectory(prefix="align3gr-staging-") as staging:
        local = Path(staging) / posixpath.basename(path)
        fill(str(local))
        files = [f.relative_to(local).as_posix() for f in _local_files(local)] if local.is_dir() else []
        if marker is not None and marker[0] in files:
            raise ValueError(f"write_dir_atomically({path}): the content already holds a file named {marker[0]!r}, "
                             "the name reserved for the completion marker")
        try:
            for rel in files:
                fs.put_file(str(local / rel), posixpath.join(tmp, rel))
            if marker is not None:
                # Removed first: from here until the new marker lands a reader sees no checkpoint at all.
                marker_path = posixpath.join(path, marker[0])
                if fs.exists(marker_path):
                    fs.rm(marker_path)
            if fs.exists(path):
                fs.rm(path, recursive=True)
            for rel in files:
                fs.copy(posixpath.join(tmp, rel), posixpath.join(path, rel))
            if marker is not None:
                fs.pipe_file(posixpath.join(path, marker[0]), marker[1])
            fs.invalidate_cache(path)
        finally:
            if fs.exists(tmp):
                _remove(fs, tmp)


@contextmanager
def downloaded_dir(fs: fsspec.AbstractFileSystem, path: str, skip: frozenset[str] = frozenset()) -> Iterator[str]:
    """A local copy of the remote directory ``path`` (files named in ``skip`` left out), removed on exit."""
    path = path.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="align3gr-download-") as staging:
        local = Path(staging) / posixpath.basename(path)
        local.mkdir()
        fs.invalidate_cache(path)
        for remote in sorted(fs.find(path, withdirs=False)):
            rel = posixpath.relpath(remote, path)
            if rel in skip:
                continue
            dest = local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(dest))
        yield str(local)
