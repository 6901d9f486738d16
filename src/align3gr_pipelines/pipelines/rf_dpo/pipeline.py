"""The `rf_dpo` stage wiring: feedback levels → per stage: recommendations of the stage's own input policy →
(pairs → train) × easy → hard, each stage's policy being the next stage's start and reference."""
from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from align3gr_pipelines.pipelines import stage_pipeline

from .nodes import INPUT_POLICY, STAGES, build_rf_pairs, recommend_for_feedback, resolve_feedback_levels, train_rf_stage


def _for_stage(func, stage: str):
    return update_wrapper(partial(func, stage=stage), func)


def create_pipeline(**kwargs) -> Pipeline:
    nodes = [
        Node(
            resolve_feedback_levels,
            inputs=["feedback", "interactions", "params:rf_dpo", "params:seed"],
            outputs=["rf_dpo_feedback_levels", "rf_dpo_metrics_feedback"],
            name="resolve_rf_feedback_levels",
        ),
    ]
    for stage in STAGES:
        nodes += [
            Node(
                _for_stage(recommend_for_feedback, stage),
                inputs=[INPUT_POLICY[stage], "train_sequences", "rf_dpo_feedback_levels", "sft_examples", "item_scids",
                        "user_scids", "params:rf_dpo", "params:seed"],
                outputs=f"rf_dpo_recommendations_{stage}",
                name=f"recommend_for_rf_feedback_{stage}",
            ),
            Node(
                _for_stage(build_rf_pairs, stage),
                inputs=[f"rf_dpo_recommendations_{stage}", "rf_dpo_feedback_levels", "item_scids", "params:rf_dpo"],
                outputs=f"rf_dpo_pairs_{stage}",
                name=f"build_rf_dpo_pairs_{stage}",
            ),
            Node(
                _for_stage(train_rf_stage, stage),
                inputs=[INPUT_POLICY[stage], f"rf_dpo_pairs_{stage}", f"rf_dpo_recommendations_{stage}",
                        "rf_dpo_feedback_levels", "item_scids", "seq_eval_prompts", "params:rf_dpo", "params:seed"],
                outputs=[f"rf_dpo_model_{stage}", f"rf_dpo_metrics_{stage}", f"rf_dpo_plot_{stage}"],
                name=f"train_rf_dpo_{stage}",
            ),
        ]
    return stage_pipeline("rf_dpo", nodes)
