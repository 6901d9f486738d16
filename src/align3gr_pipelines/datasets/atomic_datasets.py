"""kedro-datasets' JSON, text and Matplotlib datasets, saved atomically.

kedro-datasets opens the final path and writes into it, so a run killed during a save leaves a truncated
file (once a 0-byte ``recommendations.parquet``), and ``kedro run --only-missing-outputs`` then takes it
for a finished output. These subclasses write the same bytes to a temporary sibling and move it over the
final path (``atomic_io.write_file_atomically``); loading, previews (kedro-viz), credentials, ``fs_args``
and versioning are the parent's.

Catalog example::

    evaluation_metrics_json:
      type: align3gr_pipelines.datasets.AtomicJSONDataset
      filepath: ${globals:data_root}/08_reporting/evaluation/metrics.json
"""
from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from kedro.io.core import get_filepath_str
from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset
from kedro_datasets.text import TextDataset

from .atomic_io import write_file_atomically


class AtomicSaveMixin:
    """For kedro-datasets' fsspec datasets (``_fs``, ``_protocol``, ``_get_save_path``, ``_invalidate_cache``)."""

    _fs: Any
    _protocol: str

    def _save_path(self) -> str:
        return get_filepath_str(self._get_save_path(), self._protocol)  # type: ignore[attr-defined]

    def _write_atomically(self, path: str, write: Callable[[str], None]) -> None:
        write_file_atomically(self._fs, path, write)
        self._invalidate_cache()  # type: ignore[attr-defined]


class AtomicJSONDataset(AtomicSaveMixin, JSONDataset):
    """``json.JSONDataset`` written atomically."""

    def save(self, data: Any) -> None:
        def write(tmp: str) -> None:
            with self._fs.open(tmp, **self._fs_open_args_save) as fh:
                json.dump(data, fh, **self._save_args)

        self._write_atomically(self._save_path(), write)


class AtomicTextDataset(AtomicSaveMixin, TextDataset):
    """``text.TextDataset`` written atomically."""

    def save(self, data: str) -> None:
        def write(tmp: str) -> None:
            with self._fs.open(tmp, **self._fs_open_args_save) as fh:
                fh.write(data)

        self._write_atomically(self._save_path(), write)


class AtomicMatplotlibDataset(AtomicSaveMixin, MatplotlibDataset):
    """``matplotlib.MatplotlibDataset`` with every image file written atomically (a list or dict of
    figures: each file on its own, as the parent writes them one by one)."""

    def _save_to_fs(self, full_key_path: str, plot: Any) -> None:
        # Rendered before anything is opened, so a figure that fails to draw touches no file.
        buffer = io.BytesIO()
        plot.savefig(buffer, **self._save_args)
        content = buffer.getvalue()

        def write(tmp: str) -> None:
            with self._fs.open(tmp, **self._fs_open_args_save) as fh:
                fh.write(content)

        write_file_atomically(self._fs, full_key_path, write)
