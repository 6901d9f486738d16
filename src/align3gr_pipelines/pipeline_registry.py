"""Registers each stage by name, `full` = every stage in DAG order, `__default__` = `full`."""
from __future__ import annotations

import importlib

from kedro.pipeline import Pipeline

STAGES = (
    "data_prep",
    "tokenization",
    "sft_data",
    "sft_train",
    "sp_dpo_curriculum",
    "rf_dpo",
    "evaluation",
)


def register_pipelines() -> dict[str, Pipeline]:
    # Explicit imports rather than kedro's find_pipelines: since Kedro 1.x the CLI narrows discovery to
    # the requested names, and `full` is not a module of its own.
    pipelines = {
        name: importlib.import_module(f"align3gr_pipelines.pipelines.{name}").create_pipeline() for name in STAGES
    }
    full = Pipeline([])
    for name in STAGES:
        full += pipelines[name]
    pipelines["full"] = full
    pipelines["__default__"] = full
    # Not a stage of `full`: answers requests with a trained checkpoint, and logs the servable model.
    pipelines["inference"] = importlib.import_module("align3gr_pipelines.pipelines.inference").create_pipeline()
    return pipelines
