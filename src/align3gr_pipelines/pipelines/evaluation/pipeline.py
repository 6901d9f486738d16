"""The `evaluation` stage wiring: cases and prompts → one recommender node per baseline and per LM
checkpoint (plus the BCE SASRec it trains, `sasrec_bce_model`) → `recommendations` → metrics table
(Parquet, Markdown, JSON) with the feedback exposure section (its own Parquet and JSON) and comparison chart."""
from kedro.pipeline import Pipeline, node

from align3gr_pipelines.pipelines import stage_pipeline

from .nodes import (
    LM_STAGES,
    build_eval_cases,
    build_eval_prompts,
    combine_recommendations,
    compute_metrics,
    fit_sasrec_bce,
    lm_node_func,
    plot_comparison,
    recommend_align3gr_cf,
    recommend_item_knn,
    recommend_most_popular,
    recommend_sasrec,
    recommend_sasrec_bce,
    report_feedback_exposure,
    report_preference_stages,
)


def create_pipeline(**kwargs) -> Pipeline:
    params = "params:evaluation"
    recommenders = [
        node(recommend_most_popular, ["eval_cases", "train_sequences", "item_scids", params],
             ["eval_recs_most_popular", "eval_info_most_popular"], name="recommend_most_popular"),
        node(recommend_item_knn, ["eval_cases", "train_sequences", "item_scids", params],
             ["eval_recs_item_knn", "eval_info_item_knn"], name="recommend_item_knn"),
        node(recommend_sasrec, ["eval_cases", "sasrec_model", "item_scids", params],
             ["eval_recs_sasrec", "eval_info_sasrec"], name="recommend_sasrec"),
        node(recommend_sasrec_bce, ["eval_cases", "sasrec_bce_model", "sasrec_bce_log", "item_scids", params],
             ["eval_recs_sasrec_bce", "eval_info_sasrec_bce"], name="recommend_sasrec_bce"),
    ]
    # The hybrid reads the SFT checkpoint's beam rows (SFT is always decoded; a DPO stage that kept its input
    # has no rows of its own), so it sits with the baselines, before the LM stages.
    recommenders.append(
        node(recommend_align3gr_cf, ["sft_model", "sasrec_model", "eval_prompts", "eval_cases", "eval_recs_sft", "eval_info_sft",
                                     "item_scids", params, "params:seed"],
             ["eval_recs_align3gr_cf", "eval_info_align3gr_cf"], name="recommend_align3gr_cf")
    )
    for dataset, label in LM_STAGES.items():
        recommenders.append(
            node(lm_node_func(dataset), [dataset, "eval_prompts", "item_scids", params],
                 [f"eval_recs_{label}", f"eval_info_{label}"], name=f"recommend_{label}")
        )
    # LM stages last and in DAG order: combine_recommendations reuses a stage's input rows by that order.
    parts = [name for n in recommenders for name in n.outputs]
    return stage_pipeline(
        "evaluation",
        [
            node(build_eval_cases, ["valid", "test", params, "params:seed"], "eval_cases", name="build_eval_cases"),
            node(build_eval_prompts, ["eval_cases", "seq_eval_prompts", "item_scids", "user_scids", params],
                 "eval_prompts", name="build_eval_prompts"),
            node(fit_sasrec_bce, ["items", "train_sequences", params, "params:tokenization", "params:seed"],
                 ["sasrec_bce_model", "sasrec_bce_log"], name="fit_sasrec_bce"),
            *recommenders,
            node(combine_recommendations, parts, ["recommendations", "eval_run_info"], name="combine_recommendations"),
            node(report_feedback_exposure, ["recommendations", "eval_cases", "feedback", "eval_run_info", params, "params:seed"],
                 ["evaluation_feedback_exposure", "evaluation_feedback_exposure_json", "evaluation_feedback_exposure_md"],
                 name="report_feedback_exposure"),
            node(compute_metrics, ["recommendations", "eval_cases", "eval_run_info", params, "params:seed",
                                   "evaluation_feedback_exposure_md"],
                 ["evaluation_metrics", "evaluation_metrics_md", "evaluation_metrics_json"], name="compute_evaluation_metrics"),
            node(plot_comparison, "evaluation_metrics", "evaluation_comparison_plot", name="plot_evaluation_comparison"),
            node(report_preference_stages, ["recommendations", "eval_cases", "feedback", params, "params:seed"],
                 ["evaluation_stage_report", "evaluation_stage_report_md"], name="report_preference_stages"),
        ],
    )
