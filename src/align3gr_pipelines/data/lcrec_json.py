"""The LC-Rec / LETTER JSON release (Amazon Instruments, Beauty, Yelp as used by the Align3GR paper).

- ``{name}.inter.json``: ``{user: [item, ...]}`` already in chronological order (no timestamps, no ratings);
- ``{name}.item.json`` (optional): ``{item: {"title", "description", "brand", "categories", ...}}``;
- ``{name}.user.json`` (optional): ``{user: "text"}``, ``{user: {"profile": "text"}}``, or LC-Rec's
  ``{"user_explicit_preference": {user: [text, ...]}, ...}`` (only the explicit preferences are used: LC-Rec's
  "vague intentions" are written from the target item and would leak it).
- ``{name}.index.json`` (optional, not read by data_prep): LC-Rec's item codes, ``{item: ["<a_12>", "<b_200>",
  ...]}``, one token per level. ``read_lcrec_index`` reads it for the tokenization stage (item features from
  the codes where items have no text, or the codes themselves as item SCIDs); data_prep only notes that it
  is there.

Timestamps are the position in the user's list (the order is all the release keeps).
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd

from .canonical import RawTables
from .errors import DataPrepError, MalformedLines
from .textio import TextDecoding, read_text, require_file, warn_replaced

log = logging.getLogger(__name__)

_CODE_RE = re.compile(r"^<([a-z])_(\d+)>$")


def _read_json(path: Path, text: TextDecoding | None = None) -> object:
    text = text or TextDecoding(parameter="data_prep.lcrec_json.encoding")
    try:
        return json.loads(read_text(path, text))
    except json.JSONDecodeError as exc:
        raise DataPrepError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from exc


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        parts = [_text(v) for v in value]
        value = " ".join(p for p in parts if p)
    value = str(value).strip()
    return value or None


def load_lcrec_json(
    path: str | None, name: str | None, malformed: str = "skip", text: TextDecoding | None = None
) -> RawTables:
    text = text or TextDecoding(parameter="data_prep.lcrec_json.encoding")
    if path is None or not Path(path).is_dir():
        raise DataPrepError(f"{path}: folder not found; expected an LC-Rec dataset folder (parameter data_prep.lcrec_json.path)")
    if not name:
        raise DataPrepError("parameter data_prep.lcrec_json.name is not set; expected the dataset name, e.g. Instruments")
    folder = Path(path)
    ip = require_file(folder / f"{name}.inter.json", "{user: [item, ...]} interactions", "data_prep.lcrec_json.path/name")
    bad = MalformedLines(str(ip), malformed)
    inter_json = _read_json(ip, text)
    if not isinstance(inter_json, dict):
        raise DataPrepError(f"{ip}: expected a JSON object mapping user id to a list of item ids, got {type(inter_json).__name__}")
    users, items_col, ts = [], [], []
    for k, (user, seq) in enumerate(inter_json.items(), start=1):
        if not isinstance(seq, list) or not all(isinstance(x, (int, str)) and not isinstance(x, bool) for x in seq):
            bad.bad(k, f"user {user!r}: expected a list of item ids, got {str(seq)[:60]}")
            continue
        for pos, item in enumerate(seq):
            users.append(str(user))
            items_col.append(str(item))
            ts.append(pos)
    interactions = pd.DataFrame({"user_id": users, "item_id": items_col, "timestamp": ts, "rating": None, "review": None})

    notes = [f"{ip}: no timestamps; the list order is taken as chronological (timestamp = position)",
             f"{ip}: no ratings or reviews; the feedback table will be empty"]
    mp = folder / f"{name}.item.json"
    item_ids = sorted(set(items_col), key=lambda x: (len(x), x))
    if mp.is_file():
        meta = _read_json(mp, text)
        if not isinstance(meta, dict):
            raise DataPrepError(f"{mp}: expected a JSON object mapping item id to its fields, got {type(meta).__name__}")
        mbad = MalformedLines(str(mp), malformed)
        rows = []
        for k, (item, fields) in enumerate(meta.items(), start=1):
            if not isinstance(fields, dict):
                mbad.bad(k, f"item {item!r}: expected an object of fields, got {str(fields)[:60]}")
                continue
            cats = fields.get("categories", fields.get("category"))
            if isinstance(cats, list):
                cats = ", ".join(str(c) for c in cats if str(c).strip())
            rows.append((str(item), _text(fields.get("title")), _text(fields.get("description")),
                         _text(fields.get("brand")), _text(cats)))
        items = pd.DataFrame(rows, columns=["item_id", "title", "description", "brand", "categories"])
        if mbad.count:
            log.warning("%s: skipped %d malformed entries", mp, mbad.count)
        missing = len(set(items_col) - set(items["item_id"]))
        if missing:
            notes.append(f"{mp}: {missing} interacted item(s) have no entry; their text is empty")
    else:
        items = pd.DataFrame({"item_id": item_ids, "title": None, "description": None, "brand": None, "categories": None})
        notes.append(f"{mp}: not found; items have no text (titles are placeholders, semantic IDs carry no content)")
        mbad = None
    # Items with no text at all still need *some* text for the encoder; say which item it is.
    items["title"] = [t if t else f"Item {i}" for i, t in zip(items["item_id"], items["title"])]

    up = folder / f"{name}.user.json"
    profiles = pd.DataFrame(columns=["user_id", "profile"])
    if up.is_file():
        uj = _read_json(up, text)
        if isinstance(uj, dict) and "user_explicit_preference" in uj:
            uj = uj["user_explicit_preference"]
        if not isinstance(uj, dict):
            raise DataPrepError(f"{up}: expected a JSON object mapping user id to profile text")
        rows = []
        for user, v in uj.items():
            if isinstance(v, dict):
                v = v.get("profile", v.get("text"))
            rows.append((str(user), _text(v)))
        profiles = pd.DataFrame(rows, columns=["user_id", "profile"])
    xp = folder / f"{name}.index.json"
    if xp.is_file():
        notes.append(f"{xp}: LC-Rec's item codes are there; tokenization can use them "
                     "(tokenization.semantic_encoder.item_features: lcrec_codes, tokenization.item_scids_from: lcrec_index)")
    for note in notes:
        log.warning(note)
    skipped = {c.path: c.count for c in (bad, mbad) if c is not None and c.count}
    return RawTables(
        items=items,
        users=profiles,
        interactions=interactions,
        has_ratings=False,
        has_timestamps=False,
        report={"source": "lcrec_json", "interactions_file": str(ip), "items_file": str(mp), "users_file": str(up),
                "malformed_lines_skipped": skipped, "decode_errors_replaced": warn_replaced(text, log),
                "notes": notes},
    )


def _code(token: object, level: int, item: str, path: Path) -> int:
    """``"<a_12>"`` at level 0 -> 12 (the letter must be the level's: a, b, c, ...); a plain int passes."""
    if isinstance(token, int) and not isinstance(token, bool) and token >= 0:
        return token
    m = _CODE_RE.match(str(token).strip())
    if m is None or ord(m.group(1)) - ord("a") != level:
        raise DataPrepError(
            f"{path}: item {item!r}, level {level}: expected a code token like '<{chr(ord('a') + level)}_12>' "
            f"(LC-Rec's index format) or a non-negative int, got {token!r}"
        )
    return int(m.group(2))


def read_lcrec_index(path: str | Path) -> dict[str, list[int]]:
    """LC-Rec's ``{name}.index.json`` -> ``{item_id: [code of level 0, level 1, ...]}``.

    Every item must have the same number of levels; item ids are strings, as in the canonical tables.
    """
    p = Path(path)
    if not p.is_file():
        raise DataPrepError(f"{p}: LC-Rec index file not found; expected {{item: ['<a_12>', '<b_200>', ...]}} "
                            "(LC-Rec's {name}.index.json, parameter tokenization.semantic_encoder.lcrec_index)")
    raw = _read_json(p, TextDecoding(parameter="tokenization.semantic_encoder.lcrec_index"))
    if not isinstance(raw, dict) or not raw:
        raise DataPrepError(f"{p}: expected a non-empty JSON object mapping item id to its list of code tokens, "
                            f"got {type(raw).__name__}")
    out: dict[str, list[int]] = {}
    n_levels: int | None = None
    for item, tokens in raw.items():
        if not isinstance(tokens, list) or not tokens:
            raise DataPrepError(f"{p}: item {item!r}: expected a non-empty list of code tokens, got {str(tokens)[:60]}")
        if n_levels is None:
            n_levels = len(tokens)
        elif len(tokens) != n_levels:
            raise DataPrepError(f"{p}: item {item!r} has {len(tokens)} code levels, the first item {n_levels}; "
                                "expected the same number of levels for every item")
        out[str(item)] = [_code(t, level, str(item), p) for level, t in enumerate(tokens)]
    return out
