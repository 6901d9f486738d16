"""align3gr_pipelines.tracking.lineage on its own: fingerprints, the atomic record store, staleness rules."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from align3gr_pipelines.tracking.lineage import (
    FRESH,
    MISSING,
    STALE,
    UNTRACKED,
    LineageRecord,
    LineageStore,
    StalenessChecker,
    fingerprint_path,
    fingerprint_value,
    path_stat,
)


def test_value_fingerprint_ignores_key_order_but_not_values() -> None:
    assert fingerprint_value({"a": 1, "b": {"c": [1, 2]}}) == fingerprint_value({"b": {"c": [1, 2]}, "a": 1})
    assert fingerprint_value({"a": 1}) != fingerprint_value({"a": 2})
    assert fingerprint_value({"a": 1}) != fingerprint_value({"a": 1.5})


def test_directory_fingerprint_skips_completion_marker_and_temporaries(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "model").mkdir(parents=True)
    (ckpt / "model" / "weights.bin").write_bytes(b"\x00\x01")
    (ckpt / "config.json").write_text("{}")
    before = fingerprint_path(ckpt)
    (ckpt / "_CHECKPOINT_COMPLETE.json").write_text('{"saved_at": "now"}')
    (ckpt / ".weights.bin.tmp-1234").write_text("partial")
    assert fingerprint_path(ckpt) == before
    (ckpt / "model" / "weights.bin").write_bytes(b"\x00\x02")
    changed = fingerprint_path(ckpt)
    assert changed != before
    # A renamed file is a different artifact even with the same bytes.
    (ckpt / "model" / "weights.bin").rename(ckpt / "model" / "other.bin")
    assert fingerprint_path(ckpt) != changed
    assert path_stat(ckpt)["files"] == 2


def _record(name: str, content: str | None, params=None, inputs=None, path: str = "") -> LineageRecord:
    return LineageRecord(dataset=name, node=f"make_{name}", path=path, content=content, stat=None,
                         params=params or {}, inputs=inputs or {})


def test_store_replaces_records_atomically(tmp_path: Path) -> None:
    store = LineageStore(tmp_path / ".lineage")
    store.write(_record("item_scids", "aaaa", {"params:t": "p1"}))
    assert store.read("item_scids").params == {"params:t": "p1"}
    # A record that cannot be serialized must leave the previous one intact and no temporary behind.
    broken = _record("item_scids", "bbbb", {"params:t": object()})  # type: ignore[dict-item]
    with pytest.raises(TypeError):
        store.write(broken)
    assert store.read("item_scids").content == "aaaa"
    assert [p.name for p in store.root.iterdir()] == ["item_scids.json"]
    assert json.loads((store.root / "item_scids.json").read_text())["recipe"] == store.read("item_scids").recipe
    (store.root / "item_scids.json").write_text("{not json")
    with pytest.raises(ValueError, match="item_scids.json"):
        store.read("item_scids")


def test_checker_follows_parameters_inputs_and_upstream(tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.bin" for name in ("items", "scids", "model", "report")}
    for name, path in files.items():
        path.write_text(name)
    store = LineageStore(tmp_path / ".lineage")
    params = {"params:prep": fingerprint_value({"n": 1}), "params:tok": fingerprint_value({"k": 4})}
    fp = {name: fingerprint_path(path) for name, path in files.items()}
    store.write(_record("items", fp["items"], {"params:prep": params["params:prep"]}))
    store.write(_record("scids", fp["scids"], {"params:tok": params["params:tok"]}, {"items": fp["items"]}))
    store.write(_record("model", fp["model"], {}, {"scids": fp["scids"]}))
    current = dict(params)

    def checker() -> StalenessChecker:
        return StalenessChecker(store, current.get, lambda name: files.get(name))

    assert {n: s.status for n, s in checker().check_all(["items", "scids", "model", "report"]).items()} == {
        "items": FRESH, "scids": FRESH, "model": FRESH, "report": UNTRACKED,
    }
    current["params:tok"] = fingerprint_value({"k": 8})
    verdicts = checker().check_all(["items", "scids", "model"])
    assert verdicts["items"].status == FRESH
    assert verdicts["scids"].status == STALE and "parameter 'params:tok' changed" in verdicts["scids"].reasons[0]
    assert verdicts["model"].status == STALE and verdicts["model"].reasons == ["input 'scids' is stale"]
    current["params:tok"] = params["params:tok"]
    files["items"].write_text("items, edited by hand")
    verdicts = checker().check_all(["items", "scids"])
    assert verdicts["items"].status == STALE and "its file changed" in verdicts["items"].reasons[0]
    assert "input 'items' was rebuilt or changed since it was built" in verdicts["scids"].reasons
    files["model"].unlink()
    assert checker().check("model").status == MISSING
    del current["params:prep"]
    assert "parameter 'params:prep' no longer exists" in checker().check("items").reasons
