"""An HTTP server for the logged recommender that a hostile client cannot knock over.

    python -m align3gr_pipelines.serving.server -m runs:/<run_id>/recommender --host 127.0.0.1 --port 5001

It speaks `mlflow models serve`'s protocol for this model (``POST /invocations`` with
``{"inputs": [...]}`` -> ``{"predictions": [{"items": [...]}]}``, ``GET /ping`` and ``/health``) and
answers the same lists, from the same logged model, but unlike MLflow's scoring server it

- refuses a body over ``--max-body-bytes`` (default 1 MiB, env ``ALIGN3GR_MAX_BODY_BYTES``) with 413
  before reading it whole (MLflow reads any size: a 50 MB body took its worker to 1.6 GB);
- answers every client error as ``{"error_code": ..., "message": ...}`` with the cause first and no copy
  of the input (MLflow's 400s repeat the request twice, ahead of the cause);
- answers JSON nested too deep for the parser with 400, not 500;
- decodes one request batch at a time per worker: concurrent decodes would share the worker's torch
  threads (ALIGN3GR_TORCH_THREADS, see recommender_model.py) and all slow down; scale with ``--workers``.

Requests are checked by `recommend.parse_requests`, as in the Python API; the per-call bounds (requests
per call, history length) are the logged model's settings.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import threading
import traceback
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from align3gr_pipelines.serving.recommend import RequestError, quote

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Answer = Callable[[Any], list[list[dict[str, Any]]]]

MODEL_ENV = "ALIGN3GR_MODEL_URI"
MAX_BODY_ENV = "ALIGN3GR_MAX_BODY_BYTES"
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 256 requests x 20 recent item ids fit many times over
PAYLOAD_KEYS = ("inputs",)
LOGGED_CHARS = 500


class ClientError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parse_payload(body: bytes) -> Any:
    """The ``inputs`` list of a request body; `ClientError` (400) when the body is not that."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ClientError(400, "BAD_REQUEST", f"the body is not UTF-8 text (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ClientError(400, "BAD_REQUEST", f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ClientError(400, "BAD_REQUEST", "the body nests JSON arrays/objects too deeply; a request is {\"inputs\": [{...}, ...]}") from None
    if not isinstance(payload, dict) or set(payload) != set(PAYLOAD_KEYS):
        got = f"keys {quote(sorted(map(str, payload)))}" if isinstance(payload, dict) else f"a JSON {type(payload).__name__}"
        raise ClientError(400, "BAD_REQUEST", f"the body must be a JSON object with exactly the key 'inputs' (a list of requests), got {got}")
    return payload["inputs"]


class RecommenderApp:
    """The ASGI application around ``answer`` (raw requests -> ranked lists, raising `RequestError`)."""

    def __init__(self, answer: Answer, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        if int(max_body_bytes) < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes!r}")
        self.answer, self.max_body_bytes = answer, int(max_body_bytes)
        self._decoding = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        try:
            if path in ("/ping", "/health"):
                await _respond(send, 200, b"\n")
            elif path != "/invocations":
                raise ClientError(404, "ENDPOINT_NOT_FOUND", f"no endpoint {quote(path)}; POST /invocations, GET /ping")
            elif method != "POST":
                raise ClientError(405, "BAD_REQUEST", f"/invocations takes POST, got {quote(method)}")
            else:
                await self._invocations(scope, receive, send)
        except ClientError as err:
            await _respond(send, err.status, _error(err.code, err.message))

    async def _invocations(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        mime, _, options = headers.get("content-type", "").partition(";")
        if mime.strip().lower() != "application/json" or options.strip().lower() not in ("", "charset=utf-8"):
            raise ClientError(415, "BAD_REQUEST", f"content type must be application/json (UTF-8), got {quote(headers.get('content-type', ''))}")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ClientError(413, "REQUEST_LIMIT_EXCEEDED", self._too_large(f"{declared} bytes"))
        body = await self._read_body(receive)
        requests = parse_payload(body)
        try:
            lists = await asyncio.to_thread(self._answer_locked, requests)
        except RequestError as exc:
            raise ClientError(400, "INVALID_PARAMETER_VALUE", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the client gets no details; the log has them
            # Frames, and the message cut short: an exception quoting a hostile input must not flood the log
            # (rich logging's highlighter took > 10 min on a 1 MB message).
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("recommender server: a request failed: %s: %s\n%s", type(exc).__name__, str(exc)[:LOGGED_CHARS], frames)
            await _respond(send, 500, _error("INTERNAL_ERROR", "the recommender failed on this request; the server log has the cause"))
            return
        out = {"predictions": [{"items": items} for items in lists]}
        await _respond(send, 200, json.dumps(out).encode())

    def _answer_locked(self, requests: Any) -> list[list[dict[str, Any]]]:
        with self._decoding:
            return self.answer(requests)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientError(400, "BAD_REQUEST", "the client disconnected before the body ended")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # a chunked body declares no length: count as it arrives
                raise ClientError(413, "REQUEST_LIMIT_EXCEEDED", self._too_large(f"more than {self.max_body_bytes} bytes"))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: str) -> str:
        return (f"the body is {size}, over the server's limit of {self.max_body_bytes} bytes; send fewer requests per call "
                f"or only the most recent items of each history (limit: --max-body-bytes / {MAX_BODY_ENV})")


def _error(code: str, message: str) -> bytes:
    return json.dumps({"error_code": code, "message": message}).encode()


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def load_app(model_uri: str, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> RecommenderApp:
    """The app for a logged recommender (``runs:/<run_id>/recommender``, a models:/ URI or a local path)."""
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    if not hasattr(model, "answer"):
        raise ValueError(f"{model_uri}: not a recommender logged by align3gr_pipelines (log_recommender / the inference pipeline)")
    return RecommenderApp(model.answer, max_body_bytes)


def create_app() -> RecommenderApp:
    """uvicorn's factory, configured by the environment (set by `main`, read by every worker)."""
    uri = os.environ.get(MODEL_ENV)
    if not uri:
        raise ValueError(f"{MODEL_ENV} is not set: the URI of the logged recommender to serve")
    raw = os.environ.get(MAX_BODY_ENV, str(DEFAULT_MAX_BODY_BYTES))
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_BODY_ENV} must be a positive number of bytes, got {quote(raw)}")
    return load_app(uri, int(raw))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m align3gr_pipelines.serving.server", description=__doc__.split("\n")[0])
    parser.add_argument("-m", "--model-uri", required=True, help="the logged recommender, e.g. runs:/<run_id>/recommender")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    parser.add_argument("--max-body-bytes", type=int, default=int(os.environ.get(MAX_BODY_ENV, DEFAULT_MAX_BODY_BYTES)))
    args = parser.parse_args(argv)
    if args.max_body_bytes < 1:
        parser.error(f"--max-body-bytes must be >= 1, got {args.max_body_bytes}")
    os.environ[MODEL_ENV], os.environ[MAX_BODY_ENV] = args.model_uri, str(args.max_body_bytes)
    import uvicorn

    uvicorn.run("align3gr_pipelines.serving.server:create_app", factory=True, host=args.host, port=args.port, workers=args.workers)


if __name__ == "__main__":
    main()
