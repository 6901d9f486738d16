"""Amazon Review Data (2018, Ni et al.): a per-category ratings CSV + metadata JSON(.gz) (+ reviews JSON(.gz)).

- ratings: ``item,user,rating,timestamp`` without header (the "ratings only" files), or with a header naming
  ``asin, reviewerID, overall, unixReviewTime`` (or ``item_id, user_id, rating, timestamp``);
- metadata: one JSON object per line with ``asin``, ``title``, ``description`` (str or list), ``brand``,
  ``category`` (list); the 2014 release's Python-literal lines are accepted too;
- reviews (optional): one JSON object per line with ``reviewerID``, ``asin``, ``reviewText``, ``summary``.

The standard preprocessing (one interaction per user–item pair, 5-core, chronological order) is applied by
:func:`align3gr_pipelines.data.canonical.canonicalize` with ``k_core`` from ``data_prep.amazon2018.k_core``.
"""
from __future__ import annotations

import ast
import html
import json
import logging
import re

import pandas as pd

from .canonical import RawTables
from .errors import DataPrepError, MalformedLines
from .textio import (
    TextDecoding,
    first_line,
    numbered_lines,
    read_table,
    require_file,
    to_float,
    to_int,
    warn_replaced,
)

log = logging.getLogger(__name__)

_TAG = re.compile(r"<[^>]+>")
_HEADER_ALIASES = {
    "item_id": ("asin", "item", "item_id", "parent_asin"),
    "user_id": ("reviewerID", "user", "user_id"),
    "rating": ("overall", "rating"),
    "timestamp": ("unixReviewTime", "timestamp"),
}


def _clean(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v)
    text = html.unescape(_TAG.sub(" ", str(value)))
    text = re.sub(r"\s+", " ", text).strip()
    return text or None


def _json_line(line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        obj = ast.literal_eval(line)  # the 2014 release is Python literals
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _read_ratings(path, bad: MalformedLines, text: TextDecoding) -> pd.DataFrame:
    first = first_line(path, text).strip().lstrip("\ufeff").split(",")
    names = [x.strip() for x in first]
    if any(any(n in aliases for aliases in _HEADER_ALIASES.values()) for n in names):
        rename = {}
        for canon, aliases in _HEADER_ALIASES.items():
            hit = [n for n in names if n in aliases]
            if not hit:
                raise DataPrepError(
                    f"{path}: header lacks a {canon} column; expected one of {list(aliases)}, found {names}"
                )
            rename[hit[0]] = canon
        df = read_table(path, list(rename), {k: (to_float if v == "rating" else to_int if v == "timestamp" else str)
                                             for k, v in rename.items()}, bad, text, header=True)
        return df.rename(columns=rename)
    return read_table(path, ["item_id", "user_id", "rating", "timestamp"], {"rating": to_float, "timestamp": to_int}, bad,
                      text)


def load_amazon2018(
    ratings_path: str | None,
    meta_path: str | None,
    reviews_path: str | None = None,
    malformed: str = "skip",
    text: TextDecoding | None = None,
) -> RawTables:
    text = text or TextDecoding(parameter="data_prep.amazon2018.encoding")
    rp = require_file(ratings_path, "an Amazon 2018 ratings CSV (item,user,rating,timestamp)", "data_prep.amazon2018.ratings_path")
    mp = require_file(meta_path, "Amazon 2018 metadata, one JSON object per line", "data_prep.amazon2018.meta_path")
    counters = [MalformedLines(str(rp), malformed), MalformedLines(str(mp), malformed)]
    inter = _read_ratings(rp, counters[0], text)

    rows: dict[str, tuple] = {}
    identical_dups = 0
    for no, line in numbered_lines(mp, text):
        try:
            obj = _json_line(line)
            asin = obj["asin"]
        except (ValueError, SyntaxError, KeyError, MemoryError, RecursionError) as exc:
            counters[1].bad(no, f"not a metadata record with an asin ({type(exc).__name__}: {str(exc)[:60]})")
            continue
        cats = obj.get("category", obj.get("categories"))
        if isinstance(cats, list) and cats and isinstance(cats[0], list):  # 2014: list of category paths
            cats = cats[0]
        cats = [c for c in (_clean(c) for c in (cats or [])) if c]
        record = (_clean(obj.get("title")), _clean(obj.get("description")), _clean(obj.get("brand")),
                  ", ".join(dict.fromkeys(cats)) or None)
        asin = str(asin)
        if asin in rows:
            if rows[asin] != record:
                raise DataPrepError(
                    f"{mp}, line {no}: asin {asin!r} appears again with different metadata; expected unique item ids"
                )
            identical_dups += 1
            continue
        rows[asin] = record
    items = pd.DataFrame([(k, *v) for k, v in rows.items()],
                         columns=["item_id", "title", "description", "brand", "categories"])
    notes = []
    if identical_dups:
        notes.append(f"{mp}: {identical_dups} repeated identical metadata record(s) collapsed")

    inter["review"] = None
    if reviews_path:
        vp = require_file(reviews_path, "Amazon 2018 reviews, one JSON object per line", "data_prep.amazon2018.reviews_path")
        vbad = MalformedLines(str(vp), malformed)
        counters.append(vbad)
        texts: dict[tuple[str, str], str] = {}
        for no, line in numbered_lines(vp, text):
            try:
                obj = _json_line(line)
                key = (str(obj["reviewerID"]), str(obj["asin"]))
            except (ValueError, SyntaxError, KeyError) as exc:
                vbad.bad(no, f"not a review record with reviewerID and asin ({type(exc).__name__})")
                continue
            review = " ".join(x for x in (_clean(obj.get("summary")), _clean(obj.get("reviewText"))) if x)
            if review and key not in texts:
                texts[key] = review
        inter["review"] = [texts.get((u, i)) for u, i in zip(inter["user_id"], inter["item_id"])]

    for c in counters:
        if c.count:
            log.warning("%s: skipped %d malformed line(s), e.g. %s", c.path, c.count, "; ".join(c.examples[:3]))
    return RawTables(
        items=items,
        users=pd.DataFrame(columns=["user_id", "profile"]),
        interactions=inter[["user_id", "item_id", "timestamp", "rating", "review"]],
        has_ratings=True,
        report={"source": "amazon2018", "interactions_file": str(rp), "items_file": str(mp),
                "users_file": f"{rp} (users)", "malformed_lines_skipped": {c.path: c.count for c in counters if c.count},
                "decode_errors_replaced": warn_replaced(text, log), "notes": notes},
    )
