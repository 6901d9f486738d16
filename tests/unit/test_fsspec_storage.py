"""Shared storage: the project's datasets and the lineage store work on any fsspec URL, and stay atomic
where the store cannot rename (temporary key, then move; a checkpoint's completion marker last).

Every test runs on ``memory://`` and, when moto and s3fs are installed, on a real S3 API served by moto
on loopback (``ThreadedMotoServer``)."""
from __future__ import annotations

import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from kedro.io import DatasetError  # noqa: E402

from align3gr_pipelines.datasets import (  # noqa: E402
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    AtomicParquetDataset,
    AtomicTextDataset,
    CheckpointDataset,
)
from align3gr_pipelines.datasets import atomic_io  # noqa: E402
from align3gr_pipelines.datasets.checkpoint_dataset import COMPLETE_MARKER  # noqa: E402
from align3gr_pipelines.tracking.lineage import LineageRecord, LineageStore, lineage_root  # noqa: E402

BUCKET = "align3gr-test"


@dataclass
class Store:
    """A place on a filesystem: ``url(rel)`` for the catalog, ``key(rel)`` for the filesystem itself."""

    protocol: str
    root: str  # the filesystem's own path of this test's folder
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem(self.protocol, **self.options)

    def key(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        # memory:///x, not memory://x: Kedro reads the first segment of memory://x as a host and drops it.
        sep = ":///" if self.protocol == "memory" else "://"
        return f"{self.protocol}{sep}{self.key(rel).lstrip('/')}"

    def listing(self, rel: str) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.key(rel), detail=False))

    def dataset_kwargs(self) -> dict[str, Any]:
        return {"credentials": dict(self.options)} if self.options else {}


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, Any] | None]:
    try:
        import boto3
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        pytest.skip(f"moto[server] and s3fs are not installed ({exc.name}); the memory:// runs still cover the code")
        return
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    # get_host_and_port appeared in moto 5.0.13; before it, the werkzeug server's address
    host, port = server.get_host_and_port() if hasattr(server, "get_host_and_port") else server._server.server_address[:2]
    endpoint = f"http://{host}:{port}"
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield options
    server.stop()


@pytest.fixture(params=["memory", "s3"])
def store(request) -> Iterator[Store]:
    folder = f"t{uuid.uuid4().hex[:10]}"
    if request.param == "memory":
        where = Store("memory", f"/{folder}")
    else:
        where = Store("s3", f"{BUCKET}/{folder}", request.getfixturevalue("s3_server"))
    yield where
    fs = where.fs
    fs.invalidate_cache()
    if fs.exists(where.root):
        fs.rm(where.root, recursive=True)


def _table(n: int) -> pd.DataFrame:
    return pd.DataFrame({"user_id": range(n), "score": [k / 3 for k in range(n)]})


def _figure() -> Any:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1], [1, 0])
    return fig


# --- files ----------------------------------------------------------------------------------------

FILE_CASES = [
    (AtomicJSONDataset, "metrics.json", {"a": 1}, {"a": 2, "b": list(range(300))}),
    (AtomicTextDataset, "metrics.md", "# one\n", "# two\n" * 300),
    (AtomicParquetDataset, "recs.parquet", _table(4), _table(900)),
]


@pytest.mark.parametrize("cls, name, first, second", FILE_CASES, ids=[c[0].__name__ for c in FILE_CASES])
def test_files_round_trip_and_leave_no_temporary_key(store, cls, name, first, second):
    ds = cls(filepath=store.url(f"08_reporting/{name}"), **store.dataset_kwargs())
    assert not ds.exists()
    ds.save(first)
    ds.save(second)
    assert ds.exists()
    again = cls(filepath=store.url(f"08_reporting/{name}"), **store.dataset_kwargs()).load()
    if isinstance(second, pd.DataFrame):
        pd.testing.assert_frame_equal(again, second)
    else:
        assert again == second
    assert store.listing("08_reporting") == [name]


def test_a_figure_lands_on_the_store(store):
    AtomicMatplotlibDataset(filepath=store.url("plots/c.png"), **store.dataset_kwargs()).save(_figure())
    assert store.fs.cat_file(store.key("plots/c.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert store.listing("plots") == ["c.png"]


class _DiesMidway:
    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def write(self, data: Any) -> int:
        self._fh.write(data[: max(1, len(data) // 2)])
        raise OSError("killed midway (simulated)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> "_DiesMidway":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()  # as fsspec does: an object store uploads what was buffered, a partial object


@pytest.mark.parametrize("cls, name, first, second", FILE_CASES, ids=[c[0].__name__ for c in FILE_CASES])
def test_a_save_dying_midway_keeps_the_previous_object(store, monkeypatch, cls, name, first, second):
    ds = cls(filepath=store.url(f"out/{name}"), **store.dataset_kwargs())
    ds.save(first)
    before = store.fs.cat_file(store.key(f"out/{name}"))
    opened: list[str] = []
    real_open = ds._fs.open

    def dying_open(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(path)
        return _DiesMidway(real_open(path, *args, **kwargs))

    monkeypatch.setattr(ds._fs, "open", dying_open)
    with pytest.raises(DatasetError, match="killed midway"):
        ds.save(second)
    monkeypatch.undo()
    assert opened and all(posixpath.basename(p).startswith(f".{name}.tmp-") for p in opened)
    store.fs.invalidate_cache()
    assert store.fs.cat_file(store.key(f"out/{name}")) == before
    assert store.listing("out") == [name]


def test_the_method_is_logged_once_per_filesystem(store, monkeypatch, caplog):
    monkeypatch.setattr(atomic_io, "_announced", set())
    with caplog.at_level(logging.INFO, logger=atomic_io.__name__):
        for k in range(3):
            AtomicJSONDataset(filepath=store.url(f"r/{k}.json"), **store.dataset_kwargs()).save({"k": k})
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Atomic artifacts")]
        assert said == [f"Atomic artifacts: files on {store.protocol}:// are written to a temporary key, then moved "
                        "(copied) over the final key (an object store cannot rename atomically)"]
        _ckpt(store).save(Note("x"))
        _ckpt(store).save(Note("y"))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Atomic artifacts: directories")]
    assert len(said) == 1 and "temporary prefix" in said[0] and "marker written last" in said[0]


# --- checkpoints ----------------------------------------------------------------------------------

class Note:
    """save_pretrained writes two files (one in a subfolder); `fail_after` dies after the first."""

    def __init__(self, text: str, fail_after: bool = False) -> None:
        self.text, self.fail_after = text, fail_after

    def save_pretrained(self, path: str) -> None:
        (Path(path) / "model").mkdir(parents=True, exist_ok=True)
        (Path(path) / "model" / "weights.txt").write_text(self.text)
        if self.fail_after:
            raise OSError("disk full (simulated)")
        (Path(path) / "config.json").write_text(f'{{"len": {len(self.text)}}}')

    @classmethod
    def from_pretrained(cls, path: str) -> "Note":
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path}/config.json")
        return cls((Path(path) / "model" / "weights.txt").read_text())


CLASS = f"{__name__}.Note"


def _ckpt(store: Store, optional: bool = False) -> CheckpointDataset:
    return CheckpointDataset(store.url("06_models/sft_model"), CLASS, optional=optional, **store.dataset_kwargs())


def test_checkpoint_round_trip_on_the_store(store):
    ds = _ckpt(store)
    assert not ds.exists() and _ckpt(store, optional=True).load() is None
    assert ds.local_path() is None and ds._describe()["protocol"] == store.protocol
    ds.save(Note("v1"))
    ds.save(Note("version two"))
    assert ds.exists() and ds.load().text == "version two"
    files = sorted(posixpath.relpath(p, store.key("06_models/sft_model"))
                   for p in store.fs.find(store.key("06_models/sft_model")))
    assert files == sorted([COMPLETE_MARKER, "config.json", "model/weights.txt"])
    assert store.listing("06_models") == ["sft_model"]  # no temporary prefix left


def test_a_checkpoint_save_failing_midway_keeps_the_previous_one(store):
    ds = _ckpt(store)
    ds.save(Note("good"))
    with pytest.raises(DatasetError, match="disk full"):
        ds.save(Note("half", fail_after=True))
    assert ds.load().text == "good"
    assert store.listing("06_models") == ["sft_model"]


def test_the_marker_is_written_last_and_a_copy_without_it_is_never_loaded(store, monkeypatch):
    ds = _ckpt(store)
    ds.save(Note("old"))
    fs = ds._fs
    order: list[str] = []
    real_copy, real_pipe = fs.copy, fs.pipe_file

    def copy(src: str, dst: str, *args: Any, **kwargs: Any) -> Any:
        order.append(posixpath.relpath(dst, store.key("06_models/sft_model")))
        return real_copy(src, dst, *args, **kwargs)

    def pipe_dies(path: str, *args: Any, **kwargs: Any) -> Any:
        order.append(posixpath.basename(path))
        raise OSError("killed before the marker (simulated)")

    monkeypatch.setattr(fs, "copy", copy)
    monkeypatch.setattr(fs, "pipe_file", pipe_dies)
    with pytest.raises(DatasetError, match="killed before the marker"):
        ds.save(Note("new"))
    assert sorted(order[:-1]) == ["config.json", "model/weights.txt"] and order[-1] == COMPLETE_MARKER
    # every file of the new checkpoint is in place, but without its marker it is not a checkpoint
    assert not ds.exists() and _ckpt(store, optional=True).load() is None
    with pytest.raises(DatasetError, match=f"no complete checkpoint at {store.protocol}://.*{COMPLETE_MARKER}"):
        ds.load()
    monkeypatch.setattr(fs, "pipe_file", real_pipe)
    ds.save(Note("new"))
    assert ds.load().text == "new" and store.listing("06_models") == ["sft_model"]


def test_a_checkpoint_replaced_while_it_downloads_is_refused(store, monkeypatch):
    ds = _ckpt(store)
    ds.save(Note("first"))
    real_from_pretrained = Note.from_pretrained

    def from_pretrained_while_a_save_lands(path: str) -> Note:
        _ckpt(store).save(Note("second"))  # another process replaces it meanwhile
        return real_from_pretrained(path)

    monkeypatch.setattr(Note, "from_pretrained", staticmethod(from_pretrained_while_a_save_lands))
    with pytest.raises(DatasetError, match="replaced while it was loading"):
        ds.load()


def test_stale_temporaries_on_the_store_are_cleaned_by_age_only(store):
    fs = store.fs
    host = atomic_io._HOST
    dead_here = store.key(f"06_models/.sft_model.tmp-{host}-999999-0000aaaa/model/w.bin")
    legacy = store.key("06_models/.sft_model.tmp-0000bbbb/w.bin")
    other = store.key("06_models/.other.tmp-0000cccc/w.bin")
    for key in (dead_here, legacy, other):
        fs.pipe_file(key, b"half")
    target = store.key("06_models/sft_model")
    # just written: a writer on another machine may own them, whatever pid they name
    assert atomic_io.clean_stale_temporaries(fs, target) == []
    later = time.time() + atomic_io.STALE_AFTER_S + 60
    removed = atomic_io.clean_stale_temporaries(fs, target, now=later)
    assert sorted(posixpath.basename(r) for r in removed) == [
        ".sft_model.tmp-0000bbbb", f".sft_model.tmp-{host}-999999-0000aaaa"]
    assert store.listing("06_models") == [".other.tmp-0000cccc"]


# --- lineage store --------------------------------------------------------------------------------

def _record(dataset: str, content: str) -> LineageRecord:
    return LineageRecord(dataset=dataset, node=f"make_{dataset}", path="x", content=content, stat=None,
                         params={"params:p": "abc"}, inputs={})


def test_lineage_store_on_the_store(store):
    root = lineage_root("/unused/project", store.url("data"))
    assert root == store.url("data/.lineage")
    lineage = LineageStore(root, store.options)
    assert lineage.read("item_scids") is None
    where = lineage.write(_record("item_scids", "aaaa"))
    assert where == store.url("data/.lineage/item_scids.json") == lineage.path_for("item_scids")
    lineage.write(_record("item_scids", "bbbb"))
    assert LineageStore(root, store.options).read("item_scids").content == "bbbb"
    assert store.listing("data/.lineage") == ["item_scids.json"]
    store.fs.pipe_file(store.key("data/.lineage/item_scids.json"), b"{not json")
    with pytest.raises(ValueError, match=r"lineage record .*item_scids.json is not valid JSON"):
        lineage.read("item_scids")
    lineage.delete("item_scids")
    assert lineage.read("item_scids") is None


def test_lineage_root_keeps_local_roots_under_the_project(tmp_path):
    assert lineage_root(tmp_path, "data") == tmp_path / "data" / ".lineage"
    assert lineage_root(tmp_path, "file:///srv/data") == Path("/srv/data/.lineage")
    store = LineageStore(lineage_root(tmp_path, "data"))
    assert store.root == tmp_path / "data" / ".lineage"
    assert store.write(_record("x", "c")) == tmp_path / "data" / ".lineage" / "x.json"
    assert os.listdir(tmp_path / "data" / ".lineage") == ["x.json"]
