"""The code MLflow runs to build the served recommender (MLflow "models from code": the model is this file
plus its artifacts, not a pickled object). Logged by `recommender_model.log_recommender`."""
from mlflow.models import set_model

from align3gr_pipelines.serving.recommender_model import RecommenderModel

set_model(RecommenderModel())
