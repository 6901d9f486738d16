"""A Kedro dataset for a `save_pretrained` directory, written atomically, on local disk or any fsspec store.

Any object with ``save_pretrained(path)`` and a class with ``from_pretrained(path)`` can be stored:
Hugging Face models, our ``RecLM`` bundle (model + tokenizer + SCID vocabulary + metadata), the SASRec
collaborative encoder and the SC tokenizer. Locally the directory is written beside its final place and
then renamed; on an object store (``s3://``, ``gcs://``, ``memory://`` ...) it is uploaded under a temporary
prefix and then copied into place (``atomic_io.write_dir_atomically``). Either way a completion marker is
written last, so a killed run never leaves a half-written checkpoint where a finished one was, and
``exists`` (needed by ``--only-missing-outputs``) and ``load`` only see complete checkpoints.
"""
from __future__ import annotations

import importlib
import json
import posixpath
import time
import uuid
from copy import deepcopy
from pathlib import Path
from typing import Any

import fsspec
from kedro.io import AbstractDataset, DatasetError
from kedro.io.core import get_protocol_and_path

from .atomic_io import downloaded_dir, is_local, write_dir_atomically

COMPLETE_MARKER = "_CHECKPOINT_COMPLETE.json"


def _import_class(path: str) -> type:
    module_name, _, cls_name = path.rpartition(".")
    if not module_name:
        raise DatasetError(f"CheckpointDataset: 'load_class' must be a dotted path like 'pkg.module.Class', got {path!r}")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise DatasetError(f"CheckpointDataset: cannot import load_class {path!r}: {exc}") from exc


class CheckpointDataset(AbstractDataset[Any, Any]):
    """Saves ``obj.save_pretrained(dir)`` atomically; loads ``load_class.from_pretrained(dir, **load_args)``.

    Catalog example::

        sft_model:
          type: align3gr_pipelines.datasets.CheckpointDataset
          path: data/06_models/sft_model        # or s3://bucket/06_models/sft_model
          load_class: align3gr_pipelines.lm.rec_lm.RecLM
          optional: true      # load() gives None when the checkpoint was never written
          # credentials / fs_args: passed to the fsspec filesystem, as for kedro-datasets' datasets
    """

    def __init__(  # noqa: PLR0913
        self,
        path: str,
        load_class: str,
        load_args: dict[str, Any] | None = None,
        optional: bool = False,
        metadata: dict[str, Any] | None = None,
        credentials: dict[str, Any] | None = None,
        fs_args: dict[str, Any] | None = None,
    ) -> None:
        protocol, fs_path = get_protocol_and_path(str(path))
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol, **deepcopy(credentials or {}), **deepcopy(fs_args or {}))
        # Locally a Path as given (relative to the working directory, as before); remotely the store's key.
        self._path: Path | str = Path(fs_path) if is_local(self._fs) else fs_path.rstrip("/")
        # optional: loading a checkpoint that was never written gives None, so a consumer such as
        # evaluation can skip a stage that was not run instead of failing.
        self._optional = optional
        self._load_class = load_class
        self._load_args = dict(load_args or {})
        self.metadata = metadata

    @property
    def _location(self) -> str:
        return str(self._path) if is_local(self._fs) else f"{self._protocol}://{self._path}"

    def local_path(self) -> Path | None:
        """The checkpoint's local directory; None when it lives on a remote store."""
        return self._path if isinstance(self._path, Path) else None

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "protocol": self._protocol, "load_class": self._load_class,
                "optional": self._optional}

    def _marker_path(self) -> str:
        return posixpath.join(str(self._path), COMPLETE_MARKER)

    def load(self) -> Any:
        if self._optional and not self._exists():
            return None
        if not self._exists():
            raise DatasetError(
                f"CheckpointDataset: no complete checkpoint at {self._location} "
                f"(missing {COMPLETE_MARKER}); run the stage that writes it first"
            )
        cls = _import_class(self._load_class)
        if is_local(self._fs):
            return cls.from_pretrained(str(self._path), **self._load_args)
        return self._load_remote(cls)

    def _load_remote(self, cls: type) -> Any:
        marker = self._fs.cat_file(self._marker_path())
        with downloaded_dir(self._fs, str(self._path), skip=frozenset({COMPLETE_MARKER})) as local:
            obj = cls.from_pretrained(local, **self._load_args)
        # A save that replaced the checkpoint while its files were downloading would have mixed two versions.
        self._fs.invalidate_cache(str(self._path))
        try:
            unchanged = self._fs.cat_file(self._marker_path()) == marker
        except FileNotFoundError:
            unchanged = False
        if not unchanged:
            raise DatasetError(f"CheckpointDataset: the checkpoint at {self._location} was replaced while it was "
                               "loading; load it again")
        return obj

    def save(self, data: Any) -> None:
        if not hasattr(data, "save_pretrained"):
            raise DatasetError(
                f"CheckpointDataset({self._location}): expected an object with save_pretrained(), "
                f"got {type(data).__name__}"
            )
        marker = {"saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "class": type(data).__qualname__}
        if not is_local(self._fs):
            # Tells a reader whether the checkpoint it downloaded was replaced meanwhile (see _load_remote).
            marker["write_id"] = uuid.uuid4().hex
        write_dir_atomically(
            self._fs,
            str(self._path),
            lambda tmp: data.save_pretrained(tmp),
            marker=(COMPLETE_MARKER, json.dumps(marker, indent=2).encode("utf-8")),
        )

    def _exists(self) -> bool:
        if is_local(self._fs):
            return (Path(self._path) / COMPLETE_MARKER).is_file()
        self._fs.invalidate_cache(str(self._path))
        return bool(self._fs.isfile(self._marker_path()))

    def _release(self) -> None:
        pass
