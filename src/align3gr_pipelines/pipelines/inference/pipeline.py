"""The `inference` wiring: checkpoint + catalogue -> recommender -> recommendations for a requests file, and
the recommender logged to MLflow as a servable pyfunc model. Not part of `full`: it runs after training."""
from kedro.pipeline import Pipeline, node

from align3gr_pipelines.pipelines import stage_pipeline

from .nodes import load_recommender_node, log_servable_model, recommend_requests


def create_pipeline(**kwargs) -> Pipeline:
    params = "params:inference"
    return stage_pipeline(
        "inference",
        [
            node(load_recommender_node, ["item_scids", "items", "user_scids", "sasrec_model", "params:sft_data", params],
                 "inference_recommender", name="load_recommender"),
            node(recommend_requests, ["inference_recommender", "inference_requests", params],
                 ["inference_recommendations", "inference_info"], name="recommend_requests"),
            node(log_servable_model, ["inference_recommender", "inference_info", params], "inference_model", name="log_servable_model"),
        ],
    )
