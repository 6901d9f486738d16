"""CheckpointDataset: the save is atomic (a failure midway keeps the previous checkpoint and leaves no
temporary folder), a folder without the completion marker is not a checkpoint, and `optional` loads None."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from kedro.io import DatasetError

from align3gr_pipelines.datasets import CheckpointDataset
from align3gr_pipelines.datasets.checkpoint_dataset import COMPLETE_MARKER


class Note:
    """A minimal save_pretrained / from_pretrained object; `fail_after` makes save raise midway."""

    def __init__(self, text: str, fail_after: bool = False) -> None:
        self.text, self.fail_after = text, fail_after

    def save_pretrained(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "weights.txt").write_text(self.text)
        if self.fail_after:  # half the files written, then the process "dies"
            raise OSError("disk full (simulated)")
        (Path(path) / "config.json").write_text(json.dumps({"len": len(self.text)}))

    @classmethod
    def from_pretrained(cls, path: str) -> "Note":
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError("config.json")
        return cls((Path(path) / "weights.txt").read_text())


CLASS = f"{__name__}.Note"


def test_round_trip_and_marker(tmp_path):
    ds = CheckpointDataset(str(tmp_path / "ckpt"), CLASS)
    assert not ds.exists()
    ds.save(Note("v1"))
    assert ds.exists() and (tmp_path / "ckpt" / COMPLETE_MARKER).is_file()
    assert ds.load().text == "v1"
    ds.save(Note("v2"))  # replaces the previous one
    assert ds.load().text == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .tmp- or .old- folder left


def test_a_save_failing_midway_keeps_the_previous_checkpoint_and_no_temporary_folder(tmp_path):
    ds = CheckpointDataset(str(tmp_path / "ckpt"), CLASS)
    ds.save(Note("good"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    with pytest.raises(DatasetError, match="disk full"):
        ds.save(Note("half", fail_after=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert ds.load().text == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    # a first save that fails leaves nothing at all: no checkpoint, no temporary folder
    fresh = CheckpointDataset(str(tmp_path / "other"), CLASS)
    with pytest.raises(DatasetError, match="disk full"):
        fresh.save(Note("half", fail_after=True))
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_folder_without_the_marker_is_not_a_checkpoint(tmp_path):
    # e.g. a copy interrupted by hand, or save_pretrained output written outside the dataset
    half = tmp_path / "ckpt"
    Note("written by someone else").save_pretrained(str(half))
    ds = CheckpointDataset(str(half), CLASS)
    assert not ds.exists()
    with pytest.raises(DatasetError, match=f"no complete checkpoint at .*ckpt.*{COMPLETE_MARKER}"):
        ds.load()
    assert CheckpointDataset(str(half), CLASS, optional=True).load() is None
    assert CheckpointDataset(str(tmp_path / "never"), CLASS, optional=True).load() is None
    with pytest.raises(DatasetError, match="no complete checkpoint"):
        CheckpointDataset(str(tmp_path / "never"), CLASS).load()


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(DatasetError, match="expected an object with save_pretrained"):
        CheckpointDataset(str(tmp_path / "c"), CLASS).save("not a model")
    ds = CheckpointDataset(str(tmp_path / "c"), "NoDots")
    ds.save(Note("x"))
    with pytest.raises(DatasetError, match="dotted path"):
        ds.load()
