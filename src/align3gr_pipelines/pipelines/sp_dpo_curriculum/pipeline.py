"""The `sp_dpo_curriculum` stage wiring: (pairs → train) × easy → medium → hard, each stage's policy
feeding the next stage as both its starting point and its reference."""
from functools import partial, update_wrapper

from kedro.pipeline import Node, Pipeline

from align3gr_pipelines.pipelines import stage_pipeline

from .nodes import INPUT_POLICY, STAGES, build_self_play_pairs, train_self_play_stage


def _for_stage(func, stage: str):
    # A named partial, so Kedro logs and kedro-viz show the function's name.
    return update_wrapper(partial(func, stage=stage), func)


def create_pipeline(**kwargs) -> Pipeline:
    nodes = []
    for stage in STAGES:
        policy = INPUT_POLICY[stage]
        nodes += [
            Node(
                _for_stage(build_self_play_pairs, stage),
                inputs=[policy, "sft_examples", "train_sequences", "item_scids", "user_scids", "params:sp_dpo_curriculum",
                        "params:seed"],
                outputs=[f"sp_dpo_pairs_{stage}", f"sp_dpo_mining_{stage}"],
                name=f"build_sp_dpo_pairs_{stage}",
            ),
            Node(
                _for_stage(train_self_play_stage, stage),
                inputs=[policy, f"sp_dpo_pairs_{stage}", f"sp_dpo_mining_{stage}", "item_scids", "seq_eval_prompts",
                        "params:sp_dpo_curriculum", "params:seed"],
                outputs=[f"sp_dpo_model_{stage}", f"sp_dpo_metrics_{stage}", f"sp_dpo_plot_{stage}"],
                name=f"train_sp_dpo_{stage}",
            ),
        ]
    return stage_pipeline("sp_dpo_curriculum", nodes)
