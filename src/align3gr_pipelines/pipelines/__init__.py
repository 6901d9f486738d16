"""The seven stages of the DAG, each a Kedro modular pipeline named after its package."""
from __future__ import annotations

from collections.abc import Iterable

from kedro.pipeline import Node, Pipeline

# The paper's alignment level each stage serves, as a node tag (a filter in kedro-viz).
ALIGNMENT_LEVEL = {
    "data_prep": "data",
    "tokenization": "token",
    "sft_data": "behaviour",
    "sft_train": "behaviour",
    "sp_dpo_curriculum": "preference",
    "rf_dpo": "preference",
    "evaluation": "evaluation",
    "inference": "inference",  # not a stage of `full`: it serves the trained model
}


def stage_pipeline(stage: str, nodes: Iterable[Node]) -> Pipeline:
    """`nodes` as the modular pipeline `stage`, so kedro-viz draws the stage as one collapsible node.

    Only the node names gain the namespace (`tokenization.embed_semantics`). Datasets and parameters keep
    their catalog names: the stages share them (`items`, `item_scids`, the checkpoints...), and each stage
    must still run alone on the artifacts the previous stages persisted.
    """
    return Pipeline(list(nodes), namespace=stage, prefix_datasets_with_namespace=False, tags=[ALIGNMENT_LEVEL[stage]])
