"""Every persisted artifact is written atomically: a save that dies midway keeps the previous file and
leaves no temporary behind, the bytes are kedro-datasets' own, every catalog entry of every env uses an
atomic class, and the orphans of a killed writer are cleaned by the next save (never a live writer's)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from kedro.io import AbstractDataset, DatasetError  # noqa: E402
from kedro_datasets.json import JSONDataset  # noqa: E402
from kedro_datasets.matplotlib import MatplotlibDataset  # noqa: E402
from kedro_datasets.pandas import ParquetDataset  # noqa: E402
from kedro_datasets.text import TextDataset  # noqa: E402

from align3gr_pipelines.datasets import (  # noqa: E402
    AtomicJSONDataset,
    AtomicMatplotlibDataset,
    AtomicParquetDataset,
    AtomicTextDataset,
    CheckpointDataset,
)
from align3gr_pipelines.datasets import atomic_io  # noqa: E402
from align3gr_pipelines.datasets.atomic_datasets import AtomicSaveMixin  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _figure(label: str) -> Any:
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1, 2], [0, 1, 4], label=label)
    ax.set_title(label)
    return fig


def _table(n: int) -> pd.DataFrame:
    return pd.DataFrame({"user_id": range(n), "item": [f"i{k}" for k in range(n)], "score": [k / 7 for k in range(n)]})


# (atomic class, kedro-datasets class it replaces, file name, first value, second value)
CASES = [
    (AtomicJSONDataset, JSONDataset, "m.json", {"recall@10": 0.5, "rows": [1, 2]},
     {"recall@10": 0.75, "rows": list(range(500))}),
    (AtomicTextDataset, TextDataset, "m.md", "| a |\n|---|\n| 1 |\n", "| b |\n" * 500),
    (AtomicParquetDataset, ParquetDataset, "r.parquet", _table(5), _table(2000)),
    (AtomicMatplotlibDataset, MatplotlibDataset, "c.png", "first", "second"),
]
IDS = [c[0].__name__ for c in CASES]


def _value(cls: type, value: Any) -> Any:
    return _figure(value) if cls is AtomicMatplotlibDataset else value


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.mark.parametrize("atomic, plain, name, first, second", CASES, ids=IDS)
def test_bytes_are_kedro_datasets_own(tmp_path, atomic, plain, name, first, second):
    """Local behaviour is unchanged: the atomic class writes exactly what the class it replaces wrote."""
    a, p = tmp_path / "atomic" / name, tmp_path / "plain" / name
    atomic(filepath=str(a)).save(_value(atomic, first))
    plain(filepath=str(p)).save(_value(atomic, first))
    assert a.read_bytes() == p.read_bytes() and a.stat().st_size > 0
    if atomic is not AtomicMatplotlibDataset:
        loaded = atomic(filepath=str(a)).load()
        if isinstance(first, pd.DataFrame):
            pd.testing.assert_frame_equal(loaded, first)
        else:
            assert loaded == first
    assert _siblings(a) == [name]


class _DiesMidway:
    """A file handle that writes the first half of what it is given, then raises (a kill mid-save)."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh

    def write(self, data: Any) -> int:
        self._fh.write(data[: max(1, len(data) // 2)])
        self._fh.flush()
        raise OSError("killed midway (simulated)")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> "_DiesMidway":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._fh.close()


@pytest.mark.parametrize("atomic, plain, name, first, second", CASES, ids=IDS)
def test_a_save_dying_midway_keeps_the_previous_file_and_no_temporary(
    tmp_path, monkeypatch, atomic, plain, name, first, second
):
    target = tmp_path / "out" / name
    ds = atomic(filepath=str(target))
    ds.save(_value(atomic, first))
    before = target.read_bytes()
    written: list[str] = []
    real_open = ds._fs.open

    def dying_open(path: str, *args: Any, **kwargs: Any) -> Any:
        written.append(path)
        return _DiesMidway(real_open(path, *args, **kwargs))

    monkeypatch.setattr(ds._fs, "open", dying_open)
    with pytest.raises(DatasetError, match="killed midway"):
        ds.save(_value(atomic, second))
    # the partial bytes went to a hidden sibling, never to the target, and that sibling is gone
    assert written and all(Path(w).name.startswith(f".{name}.tmp-") for w in written)
    assert target.read_bytes() == before
    assert _siblings(target) == [name]
    monkeypatch.undo()
    ds.save(_value(atomic, second))  # and the next save works
    assert target.read_bytes() != before and _siblings(target) == [name]


def test_the_plain_kedro_dataset_would_have_truncated_the_file(tmp_path, monkeypatch):
    """What the atomic classes fix (issue 28): the same dying write truncates a kedro-datasets file."""
    target = tmp_path / "recommendations.parquet"
    ds = ParquetDataset(filepath=str(target))
    ds.save(_table(50))
    real_open = ds._fs.open
    monkeypatch.setattr(ds._fs, "open", lambda *a, **k: _DiesMidway(real_open(*a, **k)))
    with pytest.raises(DatasetError):
        ds.save(_table(60))
    monkeypatch.undo()
    with pytest.raises(DatasetError):
        ParquetDataset(filepath=str(target)).load()


def test_parquet_rejects_what_it_cannot_write(tmp_path):
    with pytest.raises(DatasetError, match="expected a pandas DataFrame, got list"):
        AtomicParquetDataset(filepath=str(tmp_path / "x.parquet")).save([1, 2])
    with pytest.raises(DatasetError, match="partition_cols"):
        AtomicParquetDataset(filepath=str(tmp_path / "x.parquet"),
                             save_args={"partition_cols": ["user_id"]}).save(_table(3))
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(DatasetError, match="is a directory"):
        AtomicParquetDataset(filepath=str(tmp_path / "d.parquet")).save(_table(3))


def test_matplotlib_list_of_figures_writes_every_file_atomically(tmp_path):
    target = tmp_path / "plots"
    AtomicMatplotlibDataset(filepath=str(target)).save([_figure("a"), _figure("b")])
    assert sorted(p.name for p in target.iterdir()) == ["0.png", "1.png"]


# --- every catalog entry --------------------------------------------------------------------------

ATOMIC_BASES = (AtomicSaveMixin, CheckpointDataset)
NOT_PERSISTED = {"MemoryDataset", "kedro.io.MemoryDataset"}


def _catalog_entries() -> dict[str, tuple[Path, dict[str, Any]]]:
    entries: dict[str, tuple[Path, dict[str, Any]]] = {}
    files = sorted((ROOT / "conf").glob("*/catalog*.yml")) + sorted((ROOT / "conf").glob("*/catalog*/**/*.yml"))
    for path in files:
        for name, config in (yaml.safe_load(path.read_text()) or {}).items():
            if name.startswith("_") or not isinstance(config, dict):
                continue  # YAML anchors / templates
            entries[f"{path.parent.name}:{name}"] = (path, config)
    return entries


def _is_mlflow(type_name: str) -> bool:
    return "mlflow" in type_name.lower()


def test_every_persisted_catalog_entry_of_every_env_is_atomic(tmp_path):
    entries = _catalog_entries()
    assert len(entries) >= 40, sorted(entries)  # the catalogs were found and parsed
    checked, offenders = 0, []
    for key, (path, config) in entries.items():
        type_name = str(config.get("type", ""))
        if type_name in NOT_PERSISTED or _is_mlflow(type_name):
            continue
        # ${globals:data_root} -> a scratch folder, {stage} patterns -> a concrete name
        text = json.dumps(config).replace("${globals:data_root}", str(tmp_path))
        concrete = json.loads(re.sub(r"\{[a-z_]+\}", "x", text))
        dataset = AbstractDataset.from_config(key.split(":", 1)[1], concrete)
        checked += 1
        if not isinstance(dataset, ATOMIC_BASES):
            offenders.append(f"{path.relative_to(ROOT)}: {key} ({type_name})")
    assert not offenders, "catalog entries that are not written atomically:\n" + "\n".join(offenders)
    assert checked >= 40


def test_the_catalog_check_catches_a_plain_entry():
    plain = AbstractDataset.from_config("x", {"type": "json.JSONDataset", "filepath": "x.json"})
    assert not isinstance(plain, ATOMIC_BASES)
    assert isinstance(AbstractDataset.from_config("x", {"type": "align3gr_pipelines.datasets.AtomicJSONDataset",
                                                          "filepath": "x.json"}), ATOMIC_BASES)


# --- orphans of a killed writer -------------------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (then, then))


def _orphan_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    d = parent / name
    (d / "model").mkdir(parents=True)
    (d / "model" / "weights.bin").write_bytes(b"half")
    return d


class _Note:
    def __init__(self, text: str) -> None:
        self.text = text

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "weights.txt").write_text(self.text)

    @classmethod
    def from_pretrained(cls, path: str) -> "_Note":
        return cls((Path(path) / "weights.txt").read_text())


def test_the_next_save_removes_orphans_but_never_a_live_writers_temporary(tmp_path):
    models = tmp_path / "06_models"
    host = atomic_io._HOST
    dead = _orphan_dir(models, f".sft_model.tmp-{host}-{_dead_pid()}-0000aaaa")  # killed writer, this host
    live = _orphan_dir(models, f".sft_model.tmp-{host}-{os.getpid()}-0000bbbb")  # a concurrent writer
    live_silent = _orphan_dir(models, f".sft_model.tmp-{host}-{os.getpid()}-0000cccc")  # pid recycled?
    _age(live_silent, 2 * 3600)
    legacy_fresh = _orphan_dir(models, ".sft_model.tmp-0000dddd")  # before pids were in the name
    legacy_old = _orphan_dir(models, ".sft_model.tmp-0000eeee")
    _age(legacy_old, 20 * 60)
    other_host = _orphan_dir(models, f".sft_model.tmp-ffffff-{_dead_pid()}-0000ffff")  # cannot see its pid
    old_swap = _orphan_dir(models, f".sft_model.old-{host}-{_dead_pid()}-00001111")
    unrelated = _orphan_dir(models, f".sft_model_b.tmp-{host}-{_dead_pid()}-00002222")  # another target's
    ds = CheckpointDataset(str(models / "sft_model"), f"{__name__}._Note")
    ds.save(_Note("v1"))
    assert ds.load().text == "v1"
    remaining = {p.name for p in models.iterdir()}
    assert remaining == {"sft_model", live.name, legacy_fresh.name, other_host.name, unrelated.name}
    assert not dead.exists() and not live_silent.exists() and not legacy_old.exists() and not old_swap.exists()


def test_stale_temporary_files_of_a_file_target_are_cleaned_too(tmp_path):
    target = tmp_path / "recommendations.parquet"
    orphan = tmp_path / f".recommendations.parquet.tmp-{atomic_io._HOST}-{_dead_pid()}-0000abcd"
    orphan.write_bytes(b"PAR1 half")
    AtomicParquetDataset(filepath=str(target)).save(_table(3))
    assert _siblings(target) == ["recommendations.parquet"]


def test_parse_temp_name_reads_host_and_pid():
    assert atomic_io.parse_temp_name("x.json", ".x.json.tmp-abc123-42-deadbeef") == atomic_io.TempName("abc123", 42)
    assert atomic_io.parse_temp_name("x.json", ".x.json.old-deadbeef") == atomic_io.TempName(None, None)
    assert atomic_io.parse_temp_name("x.json", ".x.jsonx.tmp-deadbeef") is None
    assert atomic_io.parse_temp_name("x.json", "x.json") is None
    name = Path(atomic_io.temp_sibling("a/b/x.json")).name
    assert atomic_io.parse_temp_name("x.json", name) == atomic_io.TempName(atomic_io._HOST, os.getpid())


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    from align3gr_pipelines.datasets import AtomicParquetDataset

    target, flag = sys.argv[1], sys.argv[2]

    def stuck(self, fh, **kwargs):
        fh.write(b"PAR1" + b"x" * 4096)  # part of the file, then the process hangs until it is killed
        fh.flush()
        open(flag, "w").close()
        time.sleep(120)

    pd.DataFrame.to_parquet = stuck
    AtomicParquetDataset(filepath=target).save(pd.DataFrame({"a": [1, 2, 3]}))
    """
)


def test_kill_9_during_a_save_keeps_the_previous_file_and_the_next_save_cleans_up(tmp_path):
    target = tmp_path / "07_model_output" / "recommendations.parquet"
    ds = AtomicParquetDataset(filepath=str(target))
    ds.save(_table(10))
    before = target.read_bytes()
    flag = tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target), str(flag)],
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    try:
        deadline = time.monotonic() + 90
        while not flag.exists():
            assert proc.poll() is None, "the writer exited before it started writing"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == before  # the killed save never touched the artifact
    orphans = [n for n in _siblings(target) if n != target.name]
    assert len(orphans) == 1 and orphans[0].startswith(f".recommendations.parquet.tmp-{atomic_io._HOST}-{proc.pid}-")
    pd.testing.assert_frame_equal(ds.load(), _table(10))
    ds.save(_table(12))  # the writer's pid is dead: its orphan goes
    assert _siblings(target) == ["recommendations.parquet"]
    pd.testing.assert_frame_equal(ds.load(), _table(12))
