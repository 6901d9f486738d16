"""`kedro run --pipelines=inference` on a trained-project stand-in (the real conf/, kedro-mlflow tracking to
a SQLite store): the recommendations file equals the Python API's answer, the logged MLflow model answers
the same, and a bad request stops the run with nothing written."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from align3gr_pipelines.pipelines.inference import load_recommender
from align3gr_pipelines.serving.recommend import RequestError

from .tiny_project import REQUESTS, make_project

OUTPUT = Path("data/07_model_output/inference_recommendations.parquet")


def kedro_run(project: Path, **kwargs) -> None:
    """`kedro run --pipelines=inference` in this process (every hook runs, kedro-mlflow's included)."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, **kwargs) as session:
        session.run(pipeline_names=["inference"])


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Iterator[Path]:
    root, _ = make_project(tmp_path_factory.mktemp("inference") / "proj")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        kedro_run(root)
        yield root


@pytest.fixture(autouse=True, scope="module")
def _restore_mlflow() -> Iterator[None]:
    # kedro-mlflow points this process's MLflow at the test's store; later tests must not log there.
    before = mlflow.get_tracking_uri()
    yield
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(before)


def test_kedro_run_and_python_api_return_identical_top_k(project):
    out = pd.read_parquet(project / OUTPUT)
    rec = load_recommender(project)
    assert rec.stage == "sp_dpo_easy"  # the newest stage present (sft_model is older)
    pd.testing.assert_frame_equal(out, rec.recommend_frame(REQUESTS, default_k=10))
    assert out.groupby("request_id", sort=False).size().to_dict() == {"a": 5, "b": 3, "c": 10, "d": 12}
    for req in REQUESTS.to_dict("records"):
        k = 10 if pd.isna(req["k"]) else int(req["k"])
        mine = rec.recommend(list(req["history"]), user_id=req["user_id"], k=k)
        part = out[out["request_id"] == req["request_id"]]
        assert part["item_id"].tolist() == [r["item_id"] for r in mine]
        assert part["title"].tolist() == [f"Title of {r['item_id']}" for r in mine]
    # another checkpoint gives other lists: the file really comes from the newest one
    sft = load_recommender(project, checkpoint="sft")
    assert sft.recommend(["it1", "it2", "it3"], "u1", 5) != rec.recommend(["it1", "it2", "it3"], "u1", 5)
    info = json.loads((project / "data/08_reporting/inference/run_info.json").read_text())
    assert info["model"] == "sp_dpo_easy" and info["n_requests"] == 4 and info["prompt"]["max_history"] == 20  # conf/base sft_data.max_history


def test_logged_model_answers_like_the_python_api(project, monkeypatch):
    model = json.loads((project / "data/08_reporting/inference/model.json").read_text())
    assert model["logged"] and model["model_uri"].startswith("runs:/") and model["model_uri"].endswith("/recommender")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    run = mlflow.get_run(model["model_uri"].split("/")[1])
    assert run.info.status == "FINISHED" and run.data.params["inference.beam_width"] == "20"  # kedro-mlflow's run
    served = mlflow.pyfunc.load_model(model["model_uri"])
    answer = served.predict([{"history": ["it1", "it2", "it3"], "user_id": "u1", "k": 5}])
    expected = load_recommender(project).recommend(["it1", "it2", "it3"], user_id="u1", k=5)
    assert [item.model_dump() for item in answer[0].items] == expected


@pytest.mark.parametrize(
    "bad, message",
    [
        (REQUESTS.assign(history=[["it1"], ["nope"], ["it2"], ["it3"]]), r"request 'b' \(row 1\): unknown item id\(s\) \['nope'\]"),
        (REQUESTS.assign(k=[5, 3, 41, 12]), r"request 'c' \(row 2\): 'k' = 41 is outside 1..40"),
        (REQUESTS.drop(columns="history"), r"requests table: no 'history' column"),
    ],
    ids=["unknown-item", "k-too-large", "no-history-column"],  # every check: test_recommend.py
)
def test_a_bad_request_stops_the_run_and_writes_nothing(project, tmp_path, monkeypatch, bad, message):
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    requests = project / "data/01_raw/inference_requests.parquet"
    good = requests.read_bytes()
    written = {p: p.read_bytes() for p in (project / "data").rglob("*") if p.is_file() and ".lineage" not in p.parts}
    bad.to_parquet(requests, index=False)
    try:
        with pytest.raises(RequestError, match=message):
            kedro_run(project)
    finally:
        requests.write_bytes(good)
    now = {p: p.read_bytes() for p in (project / "data").rglob("*") if p.is_file() and ".lineage" not in p.parts}
    assert now == written  # the previous recommendations, run info and model URI are untouched; no temp files


def test_inference_is_registered_but_not_part_of_full():
    from align3gr_pipelines.pipeline_registry import register_pipelines

    pipes = register_pipelines()
    names = {n.name for n in pipes["inference"].nodes}
    assert names == {"inference.load_recommender", "inference.recommend_requests", "inference.log_servable_model"}
    assert not names & {n.name for n in pipes["full"].nodes}
    assert pipes["inference"].outputs() >= {"inference_recommendations", "inference_model"}
