"""The `rf_dpo` stage wiring: feedback levels → recommendations of the final SP-DPO policy →
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
        Node(
            recommend_for_feedback,
            inputs=["sp_dpo_model_hard", "train_sequences", "rf_dpo_feedback_levels", "sft_examples", "item_scids",
                    "user_scids", "params:rf_dpo", "params:seed"],
            outputs="rf_dpo_recommendations",
            name="recommend_for_rf_feedback",
        ),
    ]
    for stage in STAGES:
        nodes += [
            Node(
                _for_stage(build_rf_pairs, stage),
                inputs=["rf_dpo_recommendations", "rf_dpo_feedback_levels", "item_scids", "params:rf_dpo"],
                outputs=f"rf_dpo_pairs_{stage}",
                name=f"build_rf_dpo_pairs_{stage}",
            ),
            Node(
                _for_stage(train_rf_stage, stage),
                inputs=[INPUT_POLICY[stage], f"rf_dpo_pairs_{stage}", "params:rf_dpo", "params:seed"],
                outputs=[f"rf_dpo_model_{stage}", f"rf_dpo_metrics_{stage}", f"rf_dpo_plot_{stage}"],
                name=f"train_rf_dpo_{stage}",
            ),
        ]
    return stage_pipeline("rf_dpo", nodes)
