"""benchmarks/study_rekey.py: only added parameters let a cached stage carry over; the copy keeps the old entry."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import study_rekey  # noqa: E402


def test_param_diff_separates_added_removed_and_changed():
    old = {"a": 1, "b": {"c": 2, "d": 3}, "gone": True}
    new = {"a": 1, "b": {"c": 2, "d": 4, "e": {"f": 5}}, "x": None}
    assert study_rekey.param_diff(old, new) == {"added": ["b.e", "x"], "removed": ["gone"], "changed": ["b.d"]}
    assert study_rekey.param_diff(old, old) == {"added": [], "removed": [], "changed": []}
    assert study_rekey.param_diff(1, 2)["changed"] == ["<root>"]


def _entry(root: Path, stage: str, key: str, payload: str) -> Path:
    d = root / stage / key
    (d / "files").mkdir(parents=True)
    (d / "files" / "out.txt").write_text(payload)
    (d / "manifest.json").write_text(json.dumps({"stage": stage, "key": key}))
    return d


def test_rekey_entry_copies_and_records_its_origin(tmp_path):
    _entry(tmp_path, "data_prep", "old", "x")
    assert study_rekey.rekey_entry(tmp_path, "data_prep", "old", "new", ["data_prep.on_decode_error"]) == "copied"
    manifest = json.loads((tmp_path / "data_prep" / "new" / "manifest.json").read_text())
    assert manifest["key"] == "new"
    assert manifest["rekeyed_from"] == {"key": "old", "added_parameters": ["data_prep.on_decode_error"]}
    assert (tmp_path / "data_prep" / "new" / "files" / "out.txt").read_text() == "x"
    assert (tmp_path / "data_prep" / "old" / "manifest.json").exists()  # the old entry stays
    assert not list((tmp_path / "data_prep").glob(".*tmp"))


def test_rekey_entry_never_overwrites_and_reports_a_missing_source(tmp_path):
    _entry(tmp_path, "sft_train", "old", "x")
    _entry(tmp_path, "sft_train", "new", "y")
    assert study_rekey.rekey_entry(tmp_path, "sft_train", "old", "new", []) == "present"
    assert (tmp_path / "sft_train" / "new" / "files" / "out.txt").read_text() == "y"
    assert study_rekey.rekey_entry(tmp_path, "sft_train", "absent", "other", []) == "missing"
    assert not (tmp_path / "sft_train" / "other").exists()
