"""A local Parquet dataset written atomically: the table goes to a hidden file beside its final place and
is renamed over it, so a reader (or `--only-missing-outputs`) never sees a half-written file, and a run
that fails keeps the previous file intact."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
from kedro.io import AbstractDataset, DatasetError


class AtomicParquetDataset(AbstractDataset[pd.DataFrame, pd.DataFrame]):
    """Catalog example::

        inference_recommendations:
          type: align3gr_pipelines.datasets.atomic_parquet.AtomicParquetDataset
          filepath: data/07_model_output/inference_recommendations.parquet
    """

    def __init__(self, filepath: str, load_args: dict[str, Any] | None = None, save_args: dict[str, Any] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self._load_args = dict(load_args or {})
        self._save_args = {"index": False, **(save_args or {})}
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "load_args": self._load_args, "save_args": self._save_args}

    def load(self) -> pd.DataFrame:
        if not self._filepath.is_file():
            raise DatasetError(f"AtomicParquetDataset: no file at {self._filepath}")
        return pd.read_parquet(self._filepath, **self._load_args)

    def save(self, data: pd.DataFrame) -> None:
        if not isinstance(data, pd.DataFrame):
            raise DatasetError(f"AtomicParquetDataset({self._filepath}): expected a pandas DataFrame, got {type(data).__name__}")
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._filepath.with_name(f".{self._filepath.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            data.to_parquet(tmp, **self._save_args)
            os.replace(tmp, self._filepath)
        finally:
            tmp.unlink(missing_ok=True)

    def _exists(self) -> bool:
        return self._filepath.is_file()
