"""data_prep's input checks: undecodable bytes, out-of-range timestamps, conflicting duplicates, empty tags.

Each check is exercised through the loader or canonicalize on tiny files written here, so the tests see what
a run sees: the error text (file, line, byte offset / column, count, examples), or the counts in the report.
"""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from align3gr_pipelines.data.canonical import RawTables, canonicalize, timestamp_bound
from align3gr_pipelines.data.errors import DataPrepError, MalformedLines
from align3gr_pipelines.data.sources import check_params, load_source
from align3gr_pipelines.data.textio import TextDecoding, decoded_lines, read_table, to_int

RATINGS = [(1, 1, 4.0, 100), (1, 2, 3.5, 200), (1, 3, 1.0, 300), (2, 1, 2.0, 110), (2, 2, 4.5, 120), (2, 3, 0.5, 130)]


def params(**overrides) -> dict:
    p = {"source": "movielens", "movielens": {"path": None}, "lcrec_json": {"path": None, "name": "Tiny"},
         "amazon2018": {"ratings_path": None, "meta_path": None, "reviews_path": None, "k_core": 0},
         "malformed_lines": "skip", "rating_range": [0.5, 5.0], "k_core": 0, "min_interactions": 3, "max_history": 5}
    for key, value in overrides.items():
        p[key] = dict(p[key], **value) if isinstance(value, dict) and isinstance(p.get(key), dict) else value
    return p


def ml_latest(folder: Path, ratings=RATINGS, movies: bytes | None = None, tags: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ratings))
    (folder / "movies.csv").write_bytes(movies if movies is not None else
                                        b'movieId,title,genres\n1,"Toy Story (1995)",Animation\n2,Heat (1995),Crime\n'
                                        b"3,Amelie (2001),Romance\n")
    if tags is not None:
        (folder / "tags.csv").write_bytes(tags)
    return folder


def ml_params(folder: Path, **overrides) -> dict:
    return params(movielens={"path": str(folder), **overrides.pop("movielens", {})}, **overrides)


# ---------------------------------------------------------------- undecodable bytes
def test_invalid_utf8_byte_names_the_file_line_and_byte_offset(tmp_path):
    movies = b'movieId,title,genres\n1,"Toy Story (1995)",Animation\n2,"Caf\xe9 (1999)",Drama\n3,Amelie (2001),Romance\n'
    folder = ml_latest(tmp_path / "ml", movies=movies)
    offset = movies.index(b"\xe9")
    with pytest.raises(DataPrepError, match=rf"movies.csv, line 3, byte offset {offset}: invalid utf-8 byte\(s\) "
                                            r"b'\\xe9'.*data_prep.movielens.encoding.*on_decode_error: replace"):
        load_source(ml_params(folder), 0)


def test_replace_mode_counts_each_file_and_warns(tmp_path, caplog):
    movies = (b'movieId,title,genres\n1,"Toy \xff Story (1995)",Animation\n2,Heat (1995),Crime\n'
              b"3,Am\xe9lie \xe9 (2001),Romance\n")
    tags = b"userId,movieId,tag,timestamp\n1,1,pix\xc3ar,150\n"
    folder = ml_latest(tmp_path / "ml", movies=movies, tags=tags)
    with caplog.at_level(logging.WARNING):
        raw = load_source(ml_params(folder, on_decode_error="replace"), 0)
    assert raw.report["decode_errors_replaced"] == {str(folder / "movies.csv"): 3, str(folder / "tags.csv"): 1}
    titles = raw.items.set_index("item_id")["title"]
    assert titles["1"] == "Toy \ufffd Story (1995)" and titles["3"] == "Am\ufffdlie \ufffd (2001)"
    assert raw.user_tags["tag"].tolist() == ["pix\ufffdar"]
    assert any("movies.csv: replaced 3 undecodable byte sequence(s)" in r.getMessage() for r in caplog.records)
    # the same files, valid: nothing replaced, nothing reported
    clean = load_source(ml_params(ml_latest(tmp_path / "ok", tags=b"userId,movieId,tag,timestamp\n1,1,pixar,150\n"),
                                  on_decode_error="replace"), 0)
    assert clean.report["decode_errors_replaced"] == {}


def test_source_encoding_parameter_overrides_the_release_encoding(tmp_path):
    movies = "movieId,title,genres\n1,Toy Story (1995),Animation\n2,Heat (1995),Crime\n3,Amélie (2001),Romance\n"
    folder = ml_latest(tmp_path / "ml", movies=movies.encode("cp1252"))
    with pytest.raises(DataPrepError, match=r"movies.csv, line 4, byte offset \d+: invalid utf-8"):
        load_source(ml_params(folder), 0)
    raw = load_source(ml_params(folder, movielens={"encoding": "cp1252"}), 0)
    assert raw.items.set_index("item_id").loc["3", "title"] == "Amélie (2001)"


def test_ml1m_stays_latin1_by_default(tmp_path):
    d = tmp_path / "ml-1m"
    d.mkdir()
    (d / "ratings.dat").write_text("".join(f"{u}::{i}::{int(r + 0.5)}::{t}\n" for u, i, r, t in RATINGS))
    (d / "movies.dat").write_bytes("1::Amélie (2001)::Romance\n2::Heat (1995)::Crime\n3::Se7en (1995)::Crime\n"
                                   .encode("latin-1"))
    raw = load_source(params(movielens={"path": str(d)}), 0)
    assert raw.items.set_index("item_id").loc["1", "title"] == "Amélie (2001)"
    assert raw.report["decode_errors_replaced"] == {}


def test_lcrec_json_and_gzipped_amazon_metadata(tmp_path):
    d = tmp_path / "lcrec"
    d.mkdir()
    (d / "Tiny.inter.json").write_text(json.dumps({"0": [0, 1, 2], "1": [1, 2, 0]}))
    item = b'{\n"0": {"title": "Guitar"},\n"1": {"title": "Cap\xf6"},\n"2": {"title": "Tuner"}\n}\n'
    (d / "Tiny.item.json").write_bytes(item)
    lp = params(source="lcrec_json", lcrec_json={"path": str(d)})
    offset = item.index(b"\xf6")
    with pytest.raises(DataPrepError, match=rf"Tiny.item.json, line 3, byte offset {offset}: invalid utf-8"):
        load_source(lp, 0)
    raw = load_source(dict(lp, on_decode_error="replace"), 0)
    assert raw.items.set_index("item_id").loc["1", "title"] == "Cap\ufffd"
    assert raw.report["decode_errors_replaced"] == {str(d / "Tiny.item.json"): 1}

    ratings = tmp_path / "ratings.csv"
    ratings.write_text("A1,u1,5,100\nA2,u1,4,200\nA3,u1,3,300\n")
    meta = tmp_path / "meta.json.gz"
    lines = [json.dumps({"asin": f"A{i}", "title": f"T{i}"}).encode() + b"\n" for i in (1, 2)]
    lines.append(b'{"asin": "A3", "title": "Str\x80p"}\n')
    with gzip.open(meta, "wb") as f:
        f.write(b"".join(lines))
    ap = params(source="amazon2018", amazon2018={"ratings_path": str(ratings), "meta_path": str(meta)})
    offset = len(lines[0]) + len(lines[1]) + lines[2].index(b"\x80")
    with pytest.raises(DataPrepError, match=rf"meta.json.gz, line 3, byte offset \(decompressed\) {offset}: "
                                            r".*data_prep.amazon2018.encoding"):
        load_source(ap, 0)
    raw = load_source(dict(ap, on_decode_error="replace"), 0)
    assert raw.report["decode_errors_replaced"] == {str(meta): 1}


def test_line_endings_and_quoted_newlines_read_as_before(tmp_path):
    """Bytes are split into lines the way `open(newline="")` did: \\n, \\r\\n and a lone \\r each end a line,
    and a quoted CSV field may span lines; line numbers in errors count physical lines."""
    p = tmp_path / "movies.csv"
    p.write_bytes(b'movieId,title\r\n1,"Two\r\nlines"\r\n2,Old Mac\r3,Last\n')
    bad = MalformedLines(str(p), "skip")
    df = read_table(p, ["movieId", "title"], {"movieId": to_int}, bad, TextDecoding(), header=True)
    assert df.values.tolist() == [[1, "Two\r\nlines"], [2, "Old Mac"], [3, "Last"]] and bad.count == 0
    assert list(decoded_lines(p, TextDecoding())) == ["movieId,title\r\n", '1,"Two\r\n', 'lines"\r\n', "2,Old Mac\r",
                                                      "3,Last\n"]
    p.write_bytes(b"a\r\nb\rc\xff\n")
    with pytest.raises(DataPrepError, match=r"line 3, byte offset 6:"):
        list(decoded_lines(p, TextDecoding()))


def test_line_and_offset_stay_right_across_blocks(tmp_path, monkeypatch):
    """Valid blocks are decoded whole; the counts must carry over into the block that fails."""
    import align3gr_pipelines.data.textio as textio

    monkeypatch.setattr(textio, "_BLOCK", 8)  # a few lines per block
    data = b"".join(f"line {k}\r\n".encode() for k in range(1, 40)) + b"bad \xc3(\nafter\rend\n"
    p = tmp_path / "x.txt"
    p.write_bytes(data)
    offset = data.index(b"\xc3")
    with pytest.raises(DataPrepError, match=rf"line 40, byte offset {offset}:"):
        list(decoded_lines(p, TextDecoding()))
    text = TextDecoding(on_error="replace")
    lines = list(decoded_lines(p, text))
    assert lines[-3:] == ["bad \ufffd(\n", "after\r", "end\n"] and len(lines) == 42
    assert text.replaced == {str(p): 1}


@pytest.mark.parametrize("overrides, expect", [
    ({"on_decode_error": "ignore"}, r"data_prep.on_decode_error must be one of \['raise', 'replace'\]"),
    ({"movielens": {"encoding": "klingon"}}, r"data_prep.movielens.encoding: unknown text encoding 'klingon'"),
    ({"movielens": {"encoding": "utf-16"}}, r"data_prep.movielens.encoding: encoding 'utf-16' is not ASCII-compatible"),
    ({"timestamps": {"min": "yesterday"}}, r"data_prep.timestamps.min must be a date like '2100-01-01'"),
    ({"timestamps": {"min": "2020-01-01", "max": "2010-01-01"}}, r"data_prep.timestamps.min < max expected"),
    ({"timestamps": {"on_out_of_range": "clip"}}, r"data_prep.timestamps.on_out_of_range must be one of"),
    ({"conflicting_duplicates": "mean"}, r"data_prep.conflicting_duplicates must be one of \['first', 'last', 'raise'\]"),
])
def test_bad_settings_are_rejected_before_reading(tmp_path, overrides, expect):
    with pytest.raises(DataPrepError, match=expect):
        check_params(ml_params(tmp_path, **overrides))


# ---------------------------------------------------------------- timestamps
OUT_OF_RANGE = [*RATINGS, (1, 4, 5.0, -5), (2, 4, 4.0, 4_102_444_800 + 7)]  # 1969 and 2100-01-01 00:00:07


def movies4(folder: Path) -> Path:
    (folder / "movies.csv").write_text("movieId,title,genres\n" + "".join(f"{i},M{i} (2000),Drama\n" for i in range(1, 5)))
    return folder


def test_out_of_range_timestamps_raise_with_file_column_count_and_examples(tmp_path):
    folder = movies4(ml_latest(tmp_path / "ml", ratings=OUT_OF_RANGE))
    raw = load_source(ml_params(folder), 0)
    with pytest.raises(DataPrepError, match=r"ratings.csv: column timestamp has 2 of 8 value\(s\) outside "
                                            r"\[1970-01-01T00:00:00Z, 2100-01-01T00:00:00Z\).*"
                                            r"user 1, item 4: -5 \(1969-12-31T23:59:55Z\); "
                                            r"user 2, item 4: 4102444807 \(2100-01-01T00:00:07Z\).*on_out_of_range: drop"):
        canonicalize(raw, ml_params(folder))


def test_out_of_range_timestamps_dropped_and_counted(tmp_path, caplog):
    folder = movies4(ml_latest(tmp_path / "ml", ratings=OUT_OF_RANGE))
    p = ml_params(folder, timestamps={"on_out_of_range": "drop"})
    with caplog.at_level(logging.WARNING):
        _, _, inter, report = canonicalize(load_source(p, 0), p)
    assert report["timestamps_out_of_range_dropped"] == 2
    assert "4" not in set(inter["item_id"]) and len(inter) == 6
    assert any("dropped 2 of 8 interaction(s) with a timestamp outside" in r.getMessage() for r in caplog.records)
    # bounds as dates, integers or null; max is exclusive
    tight = ml_params(folder, timestamps={"min": 0, "max": "1970-01-01T00:04:00", "on_out_of_range": "drop"})
    _, _, inter, report = canonicalize(load_source(tight, 0), tight)
    # dropped: -5, 300 and 2100 (>= 240 s); user 1 keeps two ratings and falls below min_interactions
    assert report["timestamps_out_of_range_dropped"] == 3 and report["users_dropped_short"] == 1
    assert inter["timestamp"].tolist() == [110, 120, 130]
    open_ended = ml_params(folder, timestamps={"min": None, "max": None})
    assert canonicalize(load_source(open_ended, 0), open_ended)[3]["timestamps_out_of_range_dropped"] == 0


def test_timestamps_in_milliseconds_get_a_hint(tmp_path):
    folder = ml_latest(tmp_path / "ml", ratings=[(u, i, r, t * 1000 + 1_500_000_000_000) for u, i, r, t in RATINGS])
    with pytest.raises(DataPrepError, match=r"6 of 6 .*look like milliseconds"):
        canonicalize(load_source(ml_params(folder), 0), ml_params(folder))


def test_lcrec_positions_are_not_timestamps(tmp_path):
    d = tmp_path / "lcrec"
    d.mkdir()
    (d / "Tiny.inter.json").write_text(json.dumps({"0": [0, 1, 2], "1": [1, 2, 0]}))
    p = params(source="lcrec_json", lcrec_json={"path": str(d)}, timestamps={"min": "2000-01-01"})
    _, _, inter, report = canonicalize(load_source(p, 0), p)
    assert len(inter) == 6 and report["timestamps_out_of_range_dropped"] is None


def test_timestamp_bound_forms():
    assert timestamp_bound("1970-01-02", "min") == 86_400
    assert timestamp_bound("1970-01-01T01:00:00+01:00", "min") == 0
    assert timestamp_bound("-5", "min") == -5 and timestamp_bound(7, "max") == 7 and timestamp_bound(None, "max") is None


# ---------------------------------------------------------------- duplicates
def dup_tables(rows: list[tuple]) -> RawTables:
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "title": list("ABCD")})
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp", "rating"])
    return RawTables(items, pd.DataFrame(columns=["user_id"]), inter, report={"interactions_file": "r.csv"})


DUPS = [
    ("u", "a", 10, 5.0), ("u", "b", 20, 4.0), ("u", "b", 20, 1.0),  # conflicting: same time, ratings 4 vs 1
    ("u", "c", 30, 3.0), ("u", "c", 30, 3.0),  # exact
    ("u", "d", 40, 2.0), ("u", "a", 50, 1.0),  # a again, later: a repeat
]


@pytest.mark.parametrize("rule, b_rating", [("first", 4.0), ("last", 1.0)])
def test_conflicting_and_exact_duplicates_are_counted_apart(rule, b_rating, caplog):
    with caplog.at_level(logging.WARNING):
        _, _, inter, report = canonicalize(dup_tables(DUPS), params(conflicting_duplicates=rule))
    assert report["duplicate_interactions"] == {"exact": 1, "conflicting": 1, "repeated": 1, "conflict_rule": rule}
    assert report["duplicate_interactions_removed"] == 3
    assert inter["item_id"].tolist() == ["a", "b", "c", "d"] and inter["rating"].tolist() == [5.0, b_rating, 3.0, 2.0]
    assert any("1 interaction(s) repeat a user, item and timestamp with a different rating" in r.getMessage()
               and f"kept the {rule}" in r.getMessage() for r in caplog.records)


def test_conflicting_duplicates_can_be_an_error():
    with pytest.raises(DataPrepError, match=r"r.csv: 1 user–item–timestamp triple\(s\) appear more than once with a "
                                            r"different rating.*user u, item b, timestamp 20: ratings \[4.0, 1.0\]"):
        canonicalize(dup_tables(DUPS), params(conflicting_duplicates="raise"))
    # exact duplicates alone are no conflict
    _, _, _, report = canonicalize(dup_tables([r for r in DUPS if r[3] != 1.0 or r[1] != "b"]),
                                   params(conflicting_duplicates="raise"))
    assert report["duplicate_interactions"]["conflicting"] == 0 and report["duplicate_interactions"]["exact"] == 1


# ---------------------------------------------------------------- empty tags.csv
@pytest.mark.parametrize("content", [b"", b"userId,movieId,tag,timestamp\n"])
def test_empty_tags_file_is_reported(tmp_path, caplog, content):
    folder = ml_latest(tmp_path / "ml", tags=content)
    with caplog.at_level(logging.WARNING):
        raw = load_source(ml_params(folder), 0)
    assert raw.report["empty_files"] == [str(folder / "tags.csv")] and raw.user_tags.empty
    assert any(str(folder / "tags.csv") in r.getMessage() and "no tags" in r.getMessage() for r in caplog.records)
    ok = load_source(ml_params(ml_latest(tmp_path / "ok", tags=b"userId,movieId,tag,timestamp\n1,1,pixar,150\n")), 0)
    assert ok.report["empty_files"] == []
