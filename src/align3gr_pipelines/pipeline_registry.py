"""Registers each stage by name, `full` = every registered stage in DAG order, `__default__` = `full`."""
from __future__ import annotations

from kedro.framework.project import find_pipelines
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
    found = find_pipelines(raise_errors=True)
    pipelines = {name: found[name] for name in STAGES if name in found}
    full = Pipeline([])
    for name in STAGES:
        if name in pipelines:
            full += pipelines[name]
    pipelines["full"] = full
    pipelines["__default__"] = full
    return pipelines
