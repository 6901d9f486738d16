"""A real `mlflow server` on loopback (SQLite backend) for the integration tests, started so that a
failure shows instead of turning into a skip.

`mlflow server` is only a launcher: it creates the SQL store, spawns ``python -m uvicorn ...`` with the
tracking app, waits for that child and then exits 0 whatever became of it (mlflow 3.x's ``_run_server``
ignores the child's status). "exited with 0" therefore says only that uvicorn is gone (a port taken
between our pick and its bind, a crash at import...), and ``Popen.poll()`` on the launcher can even read
0 for a process that something else in the test process reaped (ECHILD). So the server we watch is the
uvicorn child, by pid, and the REST API; the launcher only tells us when no child was ever spawned.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

LOG_TAIL_CHARS = 4000


class ServerStartError(RuntimeError):
    """The server died on every attempt, or never answered; the message holds each attempt's log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass
class _Attempt:
    port: int
    log: Path
    launcher: subprocess.Popen
    started: float
    uvicorn_pid: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def find_uvicorn(self) -> int | None:
        if self.uvicorn_pid is None:
            try:
                children = psutil.Process(self.launcher.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            for child in children:
                try:
                    if "uvicorn" in child.cmdline():
                        self.uvicorn_pid = child.pid
                        break
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
        return self.uvicorn_pid

    def death(self) -> str | None:
        """Why this attempt can no longer answer, or None while it may still."""
        uvicorn = self.find_uvicorn()
        if uvicorn is not None:
            return None if _alive(uvicorn) else f"the uvicorn child (pid {uvicorn}) ended"
        if _alive(self.launcher.pid):
            return None  # still creating the store / importing the app
        return f"the launcher ended (status {self.launcher.poll()}) before a uvicorn child was seen"

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=2):
                return True
        except OSError:
            return False

    def report(self) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else "(no log)"
        what = "; ".join(self.notes) or "still starting"
        return f"--- port {self.port}, {what}; {self.log}:\n{text[-LOG_TAIL_CHARS:]}"

    def stop(self) -> None:
        # The launcher and its uvicorn child form the process group we started; end that group only.
        try:
            os.killpg(self.launcher.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.launcher.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.launcher.pid, signal.SIGKILL)  # whatever of the group outlived SIGTERM
        except ProcessLookupError:
            pass
        try:
            self.launcher.wait(timeout=5)
        except (subprocess.TimeoutExpired, ChildProcessError):
            pass


class MlflowServer:
    """`mlflow server` on a free loopback port, restarted on a new port if it dies before answering."""

    def __init__(self, root: Path, max_attempts: int = 3) -> None:
        self.root = root
        self.max_attempts = max_attempts
        self.attempts: list[_Attempt] = []
        self._start()

    @property
    def current(self) -> _Attempt:
        return self.attempts[-1]

    @property
    def url(self) -> str:
        return self.current.url

    @property
    def port(self) -> int:
        return self.current.port

    def _start(self) -> None:
        n = len(self.attempts) + 1
        port = free_port()
        log = self.root / f"server_{n}.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner workers
        with log.open("wb") as out:  # the children keep their own copy of the descriptor
            launcher = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server",
                 "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                 "--artifacts-destination", str(self.root / "artifacts"),
                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.attempts.append(_Attempt(port, log, launcher, time.monotonic()))

    def wait_ready(self, timeout: float) -> None:
        """Return once the REST API answers; raise ServerStartError, with every attempt's log, if the
        server died `max_attempts` times or did not answer within `timeout` seconds of the first start."""
        deadline = self.attempts[0].started + timeout
        while True:
            attempt = self.current
            if attempt.answers():
                return
            death = attempt.death()
            if death is not None:
                attempt.notes.append(f"{death} {time.monotonic() - attempt.started:.0f} s after the start")
                attempt.stop()
                if len(self.attempts) >= self.max_attempts or time.monotonic() > deadline:
                    raise ServerStartError(f"mlflow server died on each of {len(self.attempts)} attempts:\n" + self._reports())
                self._start()
                continue
            if time.monotonic() > deadline:
                attempt.notes.append(f"no answer within {timeout:.0f} s (uvicorn pid {attempt.uvicorn_pid})")
                raise ServerStartError("mlflow server did not answer:\n" + self._reports())
            time.sleep(0.3)

    def _reports(self) -> str:
        return "\n".join(a.report() for a in self.attempts)

    def stop(self) -> None:
        for attempt in self.attempts:
            attempt.stop()
