"""Four toy stages named like the real ones; `full` / `__default__` chain them."""
from kedro.pipeline import Pipeline, node

from toy_align3gr import nodes


def register_pipelines() -> dict[str, Pipeline]:
    stages = {
        "data_prep": Pipeline(
            [node(nodes.make_items, ["params:toy_data_prep", "params:seed"], ["items", "data_fingerprint"], name="make_items")]
        ),
        "tokenization": Pipeline(
            [
                node(nodes.embed_items, ["items", "params:toy_tokenization"], "item_embeddings", name="embed_items"),
                node(
                    nodes.quantize_items,
                    ["item_embeddings", "items", "params:toy_tokenization", "params:seed"],
                    ["item_scids", "tokenization_metrics", "codebook_usage_plot"],
                    name="quantize_items",
                ),
            ]
        ),
        "sft_train": Pipeline(
            [
                node(
                    nodes.train_scorer,
                    ["item_scids", "items", "params:toy_train", "params:seed"],
                    ["toy_model", "sft_train_metrics"],
                    name="train_scorer",
                )
            ]
        ),
        "evaluation": Pipeline(
            [
                node(
                    nodes.evaluate_scorer,
                    ["toy_model", "item_scids", "items"],
                    ["evaluation_metrics", "evaluation_metrics_md"],
                    name="evaluate_scorer",
                )
            ]
        ),
    }
    full = sum(stages.values(), Pipeline([]))
    return {**stages, "full": full, "__default__": full}
