"""The one request check (`parse_requests`) and the HTTP server's guards (`server.RecommenderApp`), without a
model: hostile inputs get a short 4xx naming the cause first, never a copy of the input."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from align3gr_pipelines.serving.recommend import Request, RequestError, RequestLimits, parse_requests, quote
from align3gr_pipelines.serving.recommender_model import torch_threads
from align3gr_pipelines.serving.server import RecommenderApp

GOOD = {"history": ["it1", "it2"], "user_id": "u1", "k": 3}
BIG = "x" * 1_000_000


@pytest.mark.parametrize(
    "raw, message",
    [
        ([{"history": ["it1"], "K": 3}], r"^request 0: unknown field\(s\) \['K'\] \(did you mean 'k'\?\)"),
        ([{"history": ["it1"], "k": 3, "user": "u1"}], r"unknown field\(s\) \['user'\] \(did you mean 'user_id'\?\)"),
        ([{"histroy": ["it1"], "k": 3, "zzz": 1}], r"\['histroy', 'zzz'\] \(did you mean 'history' for 'histroy'\?\)"),
        ([{"history": "123", "k": 3}], r"^request 0: 'history' must be a list of item ids, got '123' \(a string; one item is \['123'\]\)"),
        ([{"history": None, "k": 3}], r"'history' must be a list of item ids, got None \(the field is missing or null\)"),
        ([{"history": {"it1"}, "k": 3}], r"'history' must be a list of item ids, got \{'it1'\}"),
        ([{"history": ["it1"] * 11, "k": 3}], r"'history' has 11 items, more than the 10 a request may send"),
        ([{"history": [[[["it1"]]]], "k": 3}], r"request 0.history\[0\]: item ids must be non-empty strings or integers"),
        ([GOOD] * 5, r"^requests: 5 requests in one call, more than the 4 allowed"),
        ({"inputs": [GOOD]}, r"^requests: expected a list of request objects, got dict"),
        ("it1", r"^requests: expected a list of request objects, got str 'it1'"),
    ],
    ids=["K", "user", "two-unknown", "string-history", "null-history", "set-history", "long-history", "nested",
         "too-many", "not-a-list", "string"],
)
def test_bad_requests_name_the_problem_first(raw, message):
    with pytest.raises(RequestError, match=message):
        parse_requests(raw, RequestLimits(max_requests=4, max_history_items=10))


def test_a_valid_request_parses_and_offline_tables_have_no_count_bound():
    assert parse_requests([GOOD, {"history": [7, "it2"], "k": 1, "user_id": None}]) == [
        Request(["it1", "it2"], 3, "u1"), Request(["7", "it2"], 1, None)]
    assert len(parse_requests([GOOD] * 300, RequestLimits(max_requests=None))) == 300
    with pytest.raises(ValueError, match="max_history_items must be >= 1"):
        RequestLimits(max_history_items=0)


@pytest.mark.parametrize("value", [BIG, [BIG] * 1000, {"a": [BIG]}, b"y" * 10_000_000, list(range(10**6))])
def test_quoted_values_stay_short(value):
    assert len(quote(value)) <= 63


def test_a_huge_value_is_never_echoed():
    for raw in ([{"history": [BIG], "k": "five"}], [{"history": BIG, "k": 1}], [{BIG: 1, "history": ["a"], "k": 1}],
                [{"history": ["a"], "k": 1, "user_id": [BIG]}], [{"history": [BIG] * 5000, "k": 1}]):
        with pytest.raises(RequestError) as err:
            parse_requests(raw)
        assert len(str(err.value)) < 300, str(err.value)[:300]


@pytest.mark.parametrize(
    "env, config, expected",
    [({}, None, 1), ({}, {"torch_threads": 3}, 3), ({"ALIGN3GR_TORCH_THREADS": "2"}, {"torch_threads": 3}, 2),
     ({"ALIGN3GR_TORCH_THREADS": "0"}, None, None), ({"ALIGN3GR_TORCH_THREADS": ""}, None, 1)],
)
def test_torch_threads_from_env_then_model_config_then_one(env, config, expected):
    assert torch_threads(env, config) == expected


@pytest.mark.parametrize("env, config", [({"ALIGN3GR_TORCH_THREADS": "many"}, None), ({"ALIGN3GR_TORCH_THREADS": "-1"}, None),
                                         ({}, {"torch_threads": 1.5})])
def test_a_bad_thread_count_is_refused_by_name(env, config):
    with pytest.raises(ValueError, match="(ALIGN3GR_TORCH_THREADS|model_config torch_threads) must be an integer >= 0"):
        torch_threads(env, config)


# ---- the HTTP server's ASGI app, driven in-process ----

def fake_answer(requests):
    return [[{"rank": 1, "item_id": r.history[0], "title": "", "score": -1.0}] for r in parse_requests(requests, RequestLimits(4, 10))]


def call(app, body: bytes | list[bytes], *, method="POST", path="/invocations", headers=None):
    """(status, parsed body, how many body chunks the app read) for one request."""
    chunks = body if isinstance(body, list) else [body]
    if headers is None:
        headers = {"content-type": "application/json"}
        if not isinstance(body, list):
            headers["content-length"] = str(len(body))
    scope = {"type": "http", "method": method, "path": path, "headers": [(k.encode(), v.encode()) for k, v in headers.items()]}
    read, sent = [0], []

    async def receive():
        n = read[0]
        read[0] += 1
        if n < len(chunks):
            return {"type": "http.request", "body": chunks[n], "more_body": n < len(chunks) - 1}
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = sent[0]["status"]
    raw = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(raw) if raw.strip() else None, read[0], len(raw)


@pytest.fixture
def app():
    return RecommenderApp(fake_answer, max_body_bytes=10_000)


def test_an_answer_has_mlflows_shape(app):
    status, body, _, _ = call(app, json.dumps({"inputs": [GOOD, {"history": ["it9"], "k": 1}]}).encode())
    assert status == 200
    assert [p["items"][0]["item_id"] for p in body["predictions"]] == ["it1", "it9"]
    assert call(app, b"", method="GET", path="/ping")[0] == 200


@pytest.mark.parametrize(
    "body, status, start",
    [
        (b"[" * 5_000 + b"]" * 5_000, 400, "the body nests JSON arrays/objects too deeply"),
        (b"not json" + b"x" * 9_000, 400, "the body is not valid JSON: Expecting value at line 1 column 1"),
        (b"\xff\xfe" * 100, 400, "the body is not UTF-8 text"),
        (json.dumps({"inputs": [GOOD], "params": {}}).encode(), 400, "the body must be a JSON object with exactly the key 'inputs'"),
        (json.dumps([GOOD]).encode(), 400, "the body must be a JSON object with exactly the key 'inputs'"),
        (json.dumps({"inputs": [{"history": ["it1"], "K": 3}]}).encode(), 400, "request 0: unknown field(s) ['K'] (did you mean 'k'?)"),
        (json.dumps({"inputs": [GOOD] * 5}).encode(), 400, "requests: 5 requests in one call, more than the 4"),
        (json.dumps({"inputs": [{"history": ["y" * 9_000], "k": "x" * 100}]}).encode(), 400, "request 0: 'k' must be an integer"),
    ],
    ids=["deep", "not-json", "not-utf8", "extra-key", "list-body", "K", "too-many", "long-values"],
)
def test_client_errors_put_the_cause_first_and_never_echo_the_body(app, body, status, start):
    got, answer, _, size = call(app, body)
    assert got == status and answer["message"].startswith(start), answer
    assert size < 400  # the whole error answer, whatever the body was


def test_a_body_over_the_limit_is_refused_before_it_is_read(app):
    # declared: refused without reading a byte of it
    status, answer, read, _ = call(app, b"{}", headers={"content-type": "application/json", "content-length": "50000000"})
    assert status == 413 and answer["message"].startswith("the body is 50000000 bytes, over the server's limit of 10000 bytes")
    assert read == 0
    # streamed without a length: refused at the first chunk past the limit, the rest never read
    status, answer, read, _ = call(app, [b"[" + b" " * 4_000] * 100)
    assert status == 413 and answer["message"].startswith("the body is more than 10000 bytes") and read == 3


@pytest.mark.parametrize(
    "method, path, headers, status",
    [("GET", "/invocations", {"content-type": "application/json"}, 405), ("POST", "/predict", {}, 404),
     ("POST", "/invocations", {"content-type": "text/csv"}, 415), ("POST", "/invocations", {"content-type": "application/json; charset=latin-1"}, 415)],
)
def test_wrong_endpoint_method_or_content_type(app, method, path, headers, status):
    assert call(app, b"{}", method=method, path=path, headers=headers)[0] == status


def test_a_failure_inside_the_model_is_a_500_without_its_details(caplog):
    def broken(requests):
        raise RuntimeError("secret internals " + BIG)

    with caplog.at_level(logging.ERROR, logger="align3gr_pipelines.serving.server"):
        status, answer, _, size = call(RecommenderApp(broken), json.dumps({"inputs": [GOOD]}).encode())
    assert status == 500 and "secret" not in answer["message"] and size < 300
    # the log says what failed and where, cut short (rich logging hung for minutes on the 1 MB message)
    [record] = caplog.records
    assert "RuntimeError: secret internals" in record.getMessage() and "in broken" in record.getMessage()
    assert len(record.getMessage()) < 3_000
