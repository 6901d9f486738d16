"""A Kedro dataset for a `save_pretrained` directory, written atomically.

Any object with ``save_pretrained(path)`` and a class with ``from_pretrained(path)`` can be stored:
Hugging Face models, our ``RecLM`` bundle (model + tokenizer + SCID vocabulary + metadata), the SASRec
collaborative encoder and the SC tokenizer. The directory is written beside its final place and then
renamed, so a killed run never leaves a half-written checkpoint where a finished one was, and
``exists`` (needed by ``--only-missing-outputs``) only sees complete checkpoints.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

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
          path: data/06_models/sft_model
          load_class: align3gr_pipelines.lm.rec_lm.RecLM
          optional: true      # load() gives None when the checkpoint was never written
    """

    def __init__(
        self,
        path: str,
        load_class: str,
        load_args: dict[str, Any] | None = None,
        optional: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = Path(path)
        # optional: loading a checkpoint that was never written gives None, so a consumer such as
        # evaluation can skip a stage that was not run instead of failing.
        self._optional = optional
        self._load_class = load_class
        self._load_args = dict(load_args or {})
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path), "load_class": self._load_class, "optional": self._optional}

    def load(self) -> Any:
        if self._optional and not self._exists():
            return None
        if not self._exists():
            raise DatasetError(
                f"CheckpointDataset: no complete checkpoint at {self._path} "
                f"(missing {COMPLETE_MARKER}); run the stage that writes it first"
            )
        cls = _import_class(self._load_class)
        return cls.from_pretrained(str(self._path), **self._load_args)

    def save(self, data: Any) -> None:
        if not hasattr(data, "save_pretrained"):
            raise DatasetError(
                f"CheckpointDataset({self._path}): expected an object with save_pretrained(), got {type(data).__name__}"
            )
        parent = self._path.parent
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{self._path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            data.save_pretrained(str(tmp))
            marker = {"saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "class": type(data).__qualname__}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
            old = None
            if self._path.exists():
                old = parent / f".{self._path.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(self._path, old)
            os.replace(tmp, self._path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _exists(self) -> bool:
        return (self._path / COMPLETE_MARKER).is_file()

    def _release(self) -> None:
        pass
