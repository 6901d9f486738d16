"""How the DAG is laid out for kedro-viz, checked without a browser: one namespace and one alignment tag
per stage, shared datasets under their catalog names, and a layer on every catalog entry that no dataset
built from it precedes (kedro-viz turns every band off at the first such cycle)."""
from __future__ import annotations

from pathlib import Path

import pytest
from kedro.config import OmegaConfigLoader
from kedro.io import DataCatalog

from align3gr_pipelines.pipeline_registry import STAGES, register_pipelines
from align3gr_pipelines.pipelines import ALIGNMENT_LEVEL
from align3gr_pipelines.settings import CONFIG_LOADER_ARGS

REPO = Path(__file__).resolve().parents[2]
KEDRO_LAYERS = ("01_raw", "02_intermediate", "03_primary", "04_feature", "05_model_input", "06_models",
                "07_model_output", "08_reporting")


@pytest.fixture(scope="module")
def pipelines():
    return register_pipelines()


@pytest.fixture(scope="module")
def catalog() -> DataCatalog:
    args = {k: v for k, v in CONFIG_LOADER_ARGS.items() if k != "default_run_env"}
    conf = OmegaConfigLoader(conf_source=str(REPO / "conf"), env="local", **args)
    return DataCatalog.from_config(conf["catalog"])


def layer_of(catalog: DataCatalog, name: str) -> str | None:
    if name.startswith("params:") or name not in catalog:
        return None
    return ((catalog.get(name).metadata or {}).get("kedro-viz") or {}).get("layer")


def test_each_stage_is_one_namespace_with_its_alignment_tag(pipelines):
    for stage in STAGES:
        nodes = pipelines[stage].nodes
        assert {n.namespace for n in nodes} == {stage}
        assert all(n.name.startswith(f"{stage}.") for n in nodes)
        assert {tag for n in nodes for tag in n.tags} == {ALIGNMENT_LEVEL[stage]}
    names = pipelines["full"].datasets()
    assert {"items", "item_scids", "sft_model", "sp_dpo_model_hard", "recommendations"} <= names
    assert not [d for d in names if d.split(".")[0] in STAGES]  # no dataset got a stage prefix


def test_every_catalog_entry_has_a_kedro_layer(pipelines, catalog):
    persisted = [d for d in pipelines["full"].datasets() if not d.startswith("params:") and d in catalog]
    assert len(persisted) > 40
    missing = {d: layer_of(catalog, d) for d in persisted if layer_of(catalog, d) not in KEDRO_LAYERS}
    assert not missing


def test_no_dataset_is_built_from_a_later_layer(pipelines, catalog):
    full = pipelines["full"]
    producer = {out: n for n in full.nodes for out in n.outputs}

    def layered_sources(name: str, seen: set[str]) -> set[tuple[str, str]]:
        """The layered datasets `name` is built from, looking through in-memory datasets."""
        found: set[tuple[str, str]] = set()
        node = producer.get(name)
        for source in (node.inputs if node else []):
            if source in seen:
                continue
            seen.add(source)
            layer = layer_of(catalog, source)
            found |= {(source, layer)} if layer else layered_sources(source, seen)
        return found

    backwards = [
        f"{source} ({source_layer}) -> {name} ({layer})"
        for name in sorted(full.datasets())
        if (layer := layer_of(catalog, name))
        for source, source_layer in layered_sources(name, set())
        if KEDRO_LAYERS.index(source_layer) > KEDRO_LAYERS.index(layer)
    ]
    assert not backwards
