"""The logged recommender served by `mlflow models serve --env-manager local` on loopback: a REST request
gets the Python API's list for that history, and a bad request gets a 400 that names the problem."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from align3gr_pipelines.serving.recommend import PromptSettings, Recommender
from align3gr_pipelines.serving.recommender_model import log_recommender
from tests.pipelines.inference.tiny_project import items_table, save_checkpoints
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_world

START_TIMEOUT_S = 120  # measured ~25 s on 2 busy cores: artifacts download, torch import, checkpoint load
REQUEST_TIMEOUT_S = 30


@dataclass
class Served:
    url: str
    log: Path
    recommender: Recommender
    catalogue: set[str]

    def post(self, body: bytes | dict) -> tuple[int, dict]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/invocations", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")
        except OSError as err:
            pytest.fail(f"the model server did not answer: {err}\n--- server log ---\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    # `mlflow models serve` execs uvicorn in a child: end the process group we started, nothing else.
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _serve(model_uri: str, tracking_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """Starts the server and waits until /ping answers; fails with the server's log if it never does."""
    bin_dir = Path(sys.executable).parent  # uvicorn is looked up on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for attempt in range(3):  # a port taken between choosing and binding it: retry on another
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        started = time.monotonic()
        while time.monotonic() - started < START_TIMEOUT_S:
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        return proc, url
            except OSError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.3)
        _stop(proc)
        text = log.read_text(errors="replace")
        if "address already in use" not in text.lower() or attempt == 2:
            why = f"exited with {proc.returncode}" if proc.returncode is not None else f"did not answer within {START_TIMEOUT_S} s"
            pytest.fail(f"mlflow models serve {why}\n--- server log ---\n{text[-4000:]}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("serving")
    world = make_world()
    save_checkpoints(world, root / "06_models", {"sft_model": 1})
    rec = Recommender.from_checkpoint(root / "06_models" / "sft_model", world.item_scids, items_table(world), world.user_scids,
                                      PromptSettings(max_history=10), device="cpu", stage="sft")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        # An experiment of this store: the process's active one (set by earlier tests' kedro-mlflow runs)
        # belongs to another store, and is restored on exit.
        mp.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        for var in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(var, raising=False)
        mlflow.set_tracking_uri(tracking_uri)
        try:
            mlflow.set_experiment("recommender-serving")
            model_uri = log_recommender(rec)
        finally:
            mlflow.set_tracking_uri(before)
    assert model_uri.startswith("runs:/")
    log = root / "serve.log"
    proc, url = _serve(model_uri, tracking_uri, log)
    try:
        yield Served(url, log, rec, set(world.item_scids["id"]))
    finally:
        _stop(proc)


def test_rest_answer_equals_the_python_api(served):
    status, body = served.post({"inputs": [{"history": ["it1", "it2", "it3"], "user_id": "u1", "k": 5}]})
    assert status == 200, served.log_tail()
    [answer] = body["predictions"]
    assert {i["item_id"] for i in answer["items"]} <= served.catalogue and len(answer["items"]) == 5
    assert answer["items"] == served.recommender.recommend(["it1", "it2", "it3"], user_id="u1", k=5)
    # several requests in one call: one list each, in order (a user id is optional)
    status, body = served.post({"inputs": [{"history": ["it4"], "k": 3}, {"history": ["it5", "it6"], "user_id": "u2", "k": 25}]})
    assert status == 200, served.log_tail()
    lists = [[i["item_id"] for i in p["items"]] for p in body["predictions"]]
    assert lists == [[r["item_id"] for r in served.recommender.recommend(["it4"], k=3)],
                     [r["item_id"] for r in served.recommender.recommend(["it5", "it6"], user_id="u2", k=25)]]


@pytest.mark.parametrize(
    "body, message",
    [
        ({"inputs": [{"history": ["it1", "nope"], "k": 5}]}, "unknown item id(s) ['nope']"),
        ({"inputs": [{"history": [], "k": 5}]}, "'history' is empty"),
        ({"inputs": [{"history": ["it1"], "k": 41}]}, "'k' = 41 is outside 1..40"),
        ({"inputs": [{"histori": ["it1"], "k": 5}]}, "history\\n  Field required"),
        ({"inputs": [{"history": "it1", "k": "five"}]}, "Input should be a valid list"),
        ({"history": ["it1"]}, "Request payload must be a dictionary with 'inputs' key"),
        (b"not json", "Ensure that input is a valid JSON"),
    ],
    ids=["unknown-item", "empty-history", "k-too-large", "missing-field", "wrong-types", "no-inputs-key", "not-json"],
)
def test_bad_request_gets_400_naming_the_problem(served, body, message):
    status, answer = served.post(body)
    assert status == 400, (answer, served.log_tail())
    assert message in answer.get("message", ""), answer
