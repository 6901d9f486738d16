"""Kedro dataset classes of this project (the only Kedro imports allowed outside pipelines/), and
``atomic_io``, the Kedro-free atomic writes they share with the lineage store.

Every persisted catalog entry uses one of these classes, so no artifact is ever half-written.
The classes are imported on first use: ``atomic_io`` alone must not pull in Kedro or Matplotlib.
"""
from __future__ import annotations

import importlib
from typing import Any

_CLASSES = {
    "CheckpointDataset": ".checkpoint_dataset",
    "AtomicParquetDataset": ".atomic_parquet",
    "AtomicJSONDataset": ".atomic_datasets",
    "AtomicTextDataset": ".atomic_datasets",
    "AtomicMatplotlibDataset": ".atomic_datasets",
}

__all__ = sorted(_CLASSES)


def __getattr__(name: str) -> Any:
    if name not in _CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_CLASSES[name], __name__), name)
