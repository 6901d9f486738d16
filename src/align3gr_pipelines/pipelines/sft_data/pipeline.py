"""The `sft_data` stage wiring: canonical tables + SCIDs -> multi-task SFT examples and SEQ eval prompts."""
from kedro.pipeline import Pipeline, node

from align3gr_pipelines.pipelines import stage_pipeline

from .nodes import build_seq_eval_prompts, build_sft_examples


def create_pipeline(**kwargs) -> Pipeline:
    return stage_pipeline(
        "sft_data",
        [
            node(
                build_sft_examples,
                inputs=[
                    "items", "users", "interactions", "train_sequences", "valid", "test", "feedback",
                    "item_scids", "user_scids", "params:sft_data", "params:seed",
                ],
                outputs=["sft_examples", "sft_data_stats"],
                name="build_sft_examples",
            ),
            node(
                build_seq_eval_prompts,
                inputs=["valid", "test", "item_scids", "user_scids", "params:sft_data"],
                outputs="seq_eval_prompts",
                name="build_seq_eval_prompts",
            ),
        ],
    )
