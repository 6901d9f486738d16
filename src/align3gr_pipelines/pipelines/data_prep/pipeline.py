"""The `data_prep` stage: raw source → canonical tables → leave-one-out splits, feedback, stats."""
from kedro.pipeline import Pipeline, node

from align3gr_pipelines.pipelines import stage_pipeline

from .nodes import (
    build_feedback_table,
    build_users,
    clean_tables,
    fingerprint_tables,
    load_raw,
    split_sequences,
    summarize,
)

TABLES = ["items", "users", "interactions", "train_sequences", "valid", "test", "feedback"]


def create_pipeline(**kwargs) -> Pipeline:
    return stage_pipeline(
        "data_prep",
        [
            node(
                load_raw,
                ["params:data_prep", "params:seed"],
                ["data_prep_raw_items", "data_prep_raw_users", "data_prep_raw_interactions",
                 "data_prep_raw_user_tags", "data_prep_raw_report"],
                name="load_raw_source",
            ),
            node(
                clean_tables,
                ["data_prep_raw_items", "data_prep_raw_users", "data_prep_raw_interactions",
                 "data_prep_raw_report", "params:data_prep"],
                ["items", "data_prep_users_base", "interactions", "data_prep_clean_report"],
                name="canonicalize_tables",
            ),
            node(split_sequences, ["interactions", "params:data_prep"], ["train_sequences", "valid", "test"],
                 name="leave_one_out_split"),
            node(
                build_users,
                ["data_prep_users_base", "interactions", "items", "data_prep_raw_user_tags", "params:data_prep"],
                ["users", "data_prep_profile_sources"],
                name="build_user_profiles",
            ),
            node(build_feedback_table, ["interactions", "params:data_prep"], "feedback", name="feedback_levels"),
            node(
                summarize,
                [*TABLES, "data_prep_clean_report", "data_prep_profile_sources"],
                "dataset_stats",
                name="dataset_statistics",
            ),
            node(fingerprint_tables, [*TABLES, "params:data_prep"], "data_fingerprint", name="data_fingerprint"),
        ],
    )
