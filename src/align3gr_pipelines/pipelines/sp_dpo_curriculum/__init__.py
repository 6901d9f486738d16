"""The `sp_dpo_curriculum` stage."""
from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
