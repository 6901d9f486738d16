"""The `inference` pipeline: a Parquet file of requests -> constrained top-K per request (07_model_output),
and the recommender logged to MLflow as a servable model. Also `load_recommender`, the Python API."""
from .pipeline import create_pipeline
from .project import load_recommender

__all__ = ["create_pipeline", "load_recommender"]
