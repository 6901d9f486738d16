"""Data sources and canonicalisation for the `data_prep` stage (no Kedro here).

Every loader returns a :class:`~align3gr_pipelines.data.canonical.RawTables`; the rest of the stage
(validation, k-core, leave-one-out split, feedback levels, statistics) works on those canonical tables.
"""
from .errors import DataPrepError

__all__ = ["DataPrepError"]
