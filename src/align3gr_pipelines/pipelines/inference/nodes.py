"""Nodes of the `inference` pipeline: thin orchestration over `align3gr_pipelines.serving.recommend` (requests ->
lists) and `align3gr_pipelines.serving.recommender_model` (the MLflow pyfunc)."""
from __future__ import annotations

import logging
import time
from typing import Any

import pandas as pd

from align3gr_pipelines.serving.recommend import Recommender, build_recommender
from align3gr_pipelines.serving.recommender_model import log_recommender

log = logging.getLogger(__name__)


def load_recommender_node(
    item_scids: pd.DataFrame, items: pd.DataFrame, user_scids: pd.DataFrame, sasrec_model: Any, sft_data_params: dict[str, Any],
    params: dict[str, Any],
) -> Recommender:
    """The checkpoint named by `inference.checkpoint` (null: the newest stage), prompts as sft_data shapes them,
    ranked by `inference.ranker` (SASRec, None when never trained, is used by the `align3gr_cf` hybrid only)."""
    return build_recommender(item_scids, items[["item_id", "title"]], user_scids, sft_data_params, params, sasrec=sasrec_model)


def recommend_requests(recommender: Recommender, inference_requests: pd.DataFrame, params: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per recommended item (request_id, user_id, rank, item_id, title, score, model). Every request
    is checked before any is decoded, so a bad one stops the run before anything is written."""
    t0 = time.perf_counter()
    recs = recommender.recommend_frame(inference_requests, default_k=int(params["default_k"]))
    seconds = time.perf_counter() - t0
    n = len(inference_requests)
    log.info("inference: %d requests answered by %s in %.1f s", n, recommender.label, seconds)
    info = {"model": recommender.label, "checkpoint": str(recommender.checkpoint_dir), "n_requests": n,
            "seconds": seconds, "ms_per_request": 1000 * seconds / max(n, 1), **recommender.settings()}
    return recs, info


def log_servable_model(recommender: Recommender, inference_info: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Logs the recommender to the run's MLflow as a pyfunc model (when `inference.log_model`); after the
    requests were answered (`inference_info`), so a run stopped by a bad request logs no model. `reuse_model_uri`
    is set by the tracking hooks when a model built from the same checkpoint, catalogue and settings is already
    logged: that model is named instead of logging another full copy."""
    if not params.get("log_model", True):
        return {"logged": False, "reason": "inference.log_model is false"}
    reused = params.get("reuse_model_uri")
    uri = str(reused) if reused else log_recommender(recommender, name=str(params.get("model_name", "recommender")))
    return {"logged": not reused, "model_uri": uri, "model": recommender.label, "checkpoint": str(recommender.checkpoint_dir),
            "answered_requests": int(inference_info["n_requests"]),
            **({"reason": "same checkpoint, catalogue and settings as this logged model"} if reused else {}),
            "serve": f"python -m align3gr_pipelines.serving.server -m {uri} --host 127.0.0.1 --port 5001"}
