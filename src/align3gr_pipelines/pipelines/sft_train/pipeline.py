"""The `sft_train` stage wiring: SFT examples + SCIDs -> the SFT RecLM, its metrics and training curve."""
from kedro.pipeline import Pipeline, node

from align3gr_pipelines.pipelines import stage_pipeline

from .nodes import plot_training_curve, train_sft_model


def create_pipeline(**kwargs) -> Pipeline:
    return stage_pipeline(
        "sft_train",
        [
            node(
                train_sft_model,
                inputs=["sft_examples", "item_scids", "user_scids", "sasrec_model", "params:sft_train", "params:seed",
                        "seq_eval_prompts"],
                outputs=["sft_model", "sft_train_metrics"],
                name="train_sft_model",
            ),
            node(plot_training_curve, inputs="sft_train_metrics", outputs="sft_training_curve", name="plot_sft_training_curve"),
        ],
    )
