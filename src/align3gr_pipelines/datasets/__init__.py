"""Kedro dataset classes of this project (the only Kedro imports allowed outside pipelines/)."""
from .checkpoint_dataset import CheckpointDataset

__all__ = ["CheckpointDataset"]
