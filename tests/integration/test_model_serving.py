"""The logged recommender served over HTTP on loopback by the project's server
(`python -m align3gr_pipelines.serving.server`): a REST request gets the Python API's list for that history,
a bad or hostile request gets a short 4xx that names the problem first and never echoes the body. The same
logged model through MLflow's own scoring code (`mlflow models serve`'s request handler, called in-process)
answers the same list and rejects a misspelt field by name."""
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
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server

from align3gr_pipelines.serving.recommend import PromptSettings, Recommender
from align3gr_pipelines.serving.recommender_model import log_recommender
from tests.pipelines.inference.tiny_project import items_table, save_checkpoints
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_world

START_TIMEOUT_S = 120  # measured ~25 s on 2 busy cores: artifacts download, torch import, checkpoint load
MAX_BODY_BYTES = 200_000
REQUEST_TIMEOUT_S = 30


@dataclass
class Served:
    url: str
    log: Path
    recommender: Recommender
    catalogue: set[str]
    model_uri: str
    tracking_uri: str
    pid: int

    def post(self, body: bytes | dict) -> tuple[int, dict]:
        status, raw = self.post_raw(body)
        return status, json.loads(raw or b"{}")

    def post_raw(self, body: bytes | dict) -> tuple[int, bytes]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}/invocations", data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except OSError as err:
            pytest.fail(f"the model server did not answer: {err}\n--- server log ---\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else "(no log)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    # End the process group we started (uvicorn and any worker it forked), nothing else.
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
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    env.pop("ALIGN3GR_TORCH_THREADS", None)  # the default (1) is under test
    for attempt in range(3):  # a port taken between choosing and binding it: retry on another
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "align3gr_pipelines.serving.server", "-m", model_uri, "--host", "127.0.0.1",
                 "--port", str(port), "--max-body-bytes", str(MAX_BODY_BYTES)],
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
            pytest.fail(f"the recommender server {why}\n--- server log ---\n{text[-4000:]}")
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
        yield Served(url, log, rec, set(world.item_scids["id"]), model_uri, tracking_uri, proc.pid)
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



BAD = [
    ({"inputs": [{"history": ["it1", "nope"], "k": 5}]}, "request 0: unknown item id(s) ['nope']"),
    ({"inputs": [{"history": [], "k": 5}]}, "request 0: 'history' is empty"),
    ({"inputs": [{"history": ["it1"], "k": 41}]}, "request 0: 'k' = 41 is outside 1..40"),
    ({"inputs": [{"histori": ["it1"], "k": 5}]}, "request 0: unknown field(s) ['histori'] (did you mean 'history'?)"),
    ({"inputs": [{"history": ["it1"], "K": 3}]}, "request 0: unknown field(s) ['K'] (did you mean 'k'?)"),
    ({"inputs": [{"history": ["it1"], "k": 3, "user": "u1"}]}, "request 0: unknown field(s) ['user'] (did you mean 'user_id'?)"),
    ({"inputs": [{"history": "it1", "k": "five"}]}, "request 0: 'history' must be a list of item ids, got 'it1' (a string"),
    ({"inputs": [{"history": ["it1"] * 1001, "k": 3}]}, "request 0: 'history' has 1001 items, more than the 1000"),
    ({"inputs": [{"history": ["it1"], "k": 3}] * 257}, "requests: 257 requests in one call, more than the 256 allowed"),
    ({"history": ["it1"]}, "the body must be a JSON object with exactly the key 'inputs'"),
    (b"not json", "the body is not valid JSON"),
    (b"[" * 100_000, "the body nests JSON arrays/objects too deeply"),
    ({"inputs": [{"history": ["it1", "z" * 150_000], "k": 3}]}, "request 0: unknown item id(s) ['zzzzzzz"),
]


@pytest.mark.parametrize("body, message", BAD, ids=["unknown-item", "empty-history", "k-too-large", "misspelt-field", "K",
                                                   "user", "string-history", "long-history", "too-many-requests",
                                                   "no-inputs-key", "not-json", "100k-deep", "huge-item-id"])
def test_bad_request_gets_a_short_400_naming_the_problem_first(served, body, message):
    status, raw = served.post_raw(body)
    assert status == 400, (raw[:500], served.log_tail())
    answer = json.loads(raw)
    assert answer["message"].startswith(message), answer
    assert len(raw) < 600  # never the request again, whatever it held


def test_a_50_mb_body_is_refused_before_it_is_read(served):
    def rss_kib() -> int:
        status = Path(f"/proc/{served.pid}/status")
        return int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmRSS:"))) if status.exists() else 0

    before = rss_kib()
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=REQUEST_TIMEOUT_S) as conn:
        conn.sendall(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 50000000\r\n\r\n" + b'{"inputs": [' + b" " * 65_536)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply) < reply.index(b"\r\n\r\n") + 4 + 100:
            chunk = conn.recv(65_536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), reply[:300]
    assert json.loads(body)["message"].startswith(f"the body is 50000000 bytes, over the server's limit of {MAX_BODY_BYTES} bytes")
    assert rss_kib() - before < 20_000  # the 50 MB were never buffered (MLflow's server grew to 1.6 GB)
    assert served.post({"inputs": [{"history": ["it1"], "k": 2}]})[0] == 200  # and it still answers


def test_python_api_refuses_a_string_or_missing_history_by_name(served):
    rec = served.recommender
    with pytest.raises(ValueError, match=r"^recommend\(\): 'history' must be a list of item ids, got '123' \(a string; one item is \['123'\]\)"):
        rec.recommend("123")
    with pytest.raises(ValueError, match=r"^recommend\(\): 'history' must be a list of item ids, got None"):
        rec.recommend(None)
    with pytest.raises(ValueError, match=r"^recommend\(\): 'k' must be an integer >= 1, got '3'"):
        rec.recommend(["it1"], k="3")
    assert rec.recommend(("it1", "it2"), k=3) == rec.recommend(["it1", "it2"], k=3)


def test_mlflows_scoring_server_code_answers_alike_and_rejects_misspelt_fields(served, monkeypatch):
    """`mlflow models serve`'s request handler, in-process: the same list, the shared check (whose message
    MLflow prefixes with the input: use our server for anything beyond loopback), the serving thread count."""
    monkeypatch.delenv("ALIGN3GR_TORCH_THREADS", raising=False)
    before = torch.get_num_threads()
    mlflow.set_tracking_uri(served.tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(served.model_uri)
        assert torch.get_num_threads() == 1  # set by load_context: the documented default
    finally:
        torch.set_num_threads(before)

    def invoke(payload: dict) -> dict:
        result = scoring_server.invocations(json.dumps(payload), "application/json", model, model.metadata.get_input_schema())
        assert result.status == 200, result.response[:500]
        return json.loads(result.response)

    [answer] = invoke({"inputs": [{"history": ["it1", "it2", "it3"], "user_id": "u1", "k": 5}]})["predictions"]
    assert answer["items"] == served.recommender.recommend(["it1", "it2", "it3"], user_id="u1", k=5)
    with pytest.raises(MlflowException) as err:
        invoke({"inputs": [{"history": ["it1"], "K": 3}]})
    assert err.value.get_http_status_code() == 400
    assert "request 0: unknown field(s) ['K'] (did you mean 'k'?)" in err.value.message
