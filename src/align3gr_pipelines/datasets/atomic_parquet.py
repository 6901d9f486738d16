"""``pandas.ParquetDataset`` written atomically: the table goes to a hidden sibling (a temporary key on an
object store) and is moved over its final place, so a reader (or ``--only-missing-outputs``) never sees
a half-written file, and a run that fails keeps the previous file intact. Loading, ``load_args``,
``save_args`` (pandas' defaults, as in kedro-datasets), credentials and versioning are the parent's."""
from __future__ import annotations

import pandas as pd
from kedro.io import DatasetError
from kedro_datasets.pandas import ParquetDataset

from .atomic_datasets import AtomicSaveMixin
from .atomic_io import is_local


class AtomicParquetDataset(AtomicSaveMixin, ParquetDataset):
    """Catalog example::

        recommendations:
          type: align3gr_pipelines.datasets.AtomicParquetDataset
          filepath: ${globals:data_root}/07_model_output/recommendations.parquet
          save_args: {index: false}   # optional: any DataFrame.to_parquet argument
    """

    def save(self, data: pd.DataFrame) -> None:
        save_path = self._save_path()
        if not isinstance(data, pd.DataFrame):
            raise DatasetError(
                f"AtomicParquetDataset({save_path}): expected a pandas DataFrame, got {type(data).__name__}"
            )
        if "partition_cols" in self._save_args:
            raise DatasetError(f"AtomicParquetDataset({save_path}): save_args 'partition_cols' writes a directory "
                               "of files, which this dataset does not do; drop it (or use a PartitionedDataset)")
        if is_local(self._fs) and self._fs.isdir(save_path):
            raise DatasetError(f"AtomicParquetDataset({save_path}): that path is a directory, expected a file path")

        def write(tmp: str) -> None:
            with self._fs.open(tmp, **self._fs_open_args_save) as fh:
                data.to_parquet(fh, **self._save_args)

        self._write_atomically(save_path, write)
