"""Each loader on tiny fixtures, and the clear error for each kind of bad input."""
from __future__ import annotations

import json

import pytest

from align3gr_pipelines.data.canonical import canonicalize
from align3gr_pipelines.data.errors import DataPrepError
from align3gr_pipelines.data.lcrec_json import read_lcrec_index
from align3gr_pipelines.data.sources import load_source
from align3gr_pipelines.data.splitting import leave_one_out

from .conftest import AMAZON_META, SHARED_DATA, params, write


def prepare(p: dict):
    raw = load_source(p, seed=0)
    return raw, canonicalize(raw, p)


# ---------------------------------------------------------------- movielens
@pytest.mark.parametrize("layout", ["ml_latest", "ml_100k", "ml_1m"])
def test_movielens_layouts(layout, request):
    folder = request.getfixturevalue(layout)
    raw, (items, users, inter, report) = prepare(params(source="movielens", movielens={"path": str(folder)}))
    assert report["users_dropped_short"] == 1  # user 4 has two ratings
    assert sorted(users["user_id"]) == ["1", "2", "3"]
    assert inter["user_id"].map(type).eq(str).all() and inter["item_id"].map(type).eq(str).all()
    assert inter.groupby("user_id")["timestamp"].is_monotonic_increasing.all()
    toy = items.set_index("item_id").loc["1"]
    assert toy["title"] == "Toy Story (1995)" and "Animation" in toy["categories"] and "1995" in toy["text"]
    assert items.set_index("item_id").loc["4", "title"] == "The Matrix (1999)"
    if layout == "ml_latest":
        assert inter["rating"].tolist()[:4] == [4.0, 3.5, 1.0, 5.0]
        assert len(raw.user_tags) == 2
    else:  # demographics become the profile
        profile = users.set_index("user_id")["profile"]
        assert profile["1"].startswith("Age") and ("technician" in profile["1"] or "under 18" in profile["1"])


def test_movielens_profiles_come_from_training_period_only(ml_latest):
    from align3gr_pipelines.data.profiles import build_user_profiles

    raw, (items, users, inter, _) = prepare(params(source="movielens", movielens={"path": str(ml_latest)}))
    out, sources = build_user_profiles(users, inter, items, raw.user_tags, {"liked_min": 4.0})
    prof = out.set_index("user_id")["profile"]
    assert "pixar" in prof["1"] and "mind-bending" not in prof["1"]  # the test item's tag is held out
    assert "Sci-Fi" not in prof["1"]  # movie 4 (Sci-Fi) is user 1's test item
    assert sources == {"tags": 1, "history": 2}
    # user 3 (train: movie 1 rated 5 → Adventure/Animation/Children); valid/test movies 4, 2 stay out
    assert "Animation" in prof["3"] and "Thriller" not in prof["3"]


def test_movielens_missing_folder_and_file(tmp_path, ml_latest):
    with pytest.raises(DataPrepError, match="folder not found"):
        load_source(params(source="movielens", movielens={"path": str(tmp_path / "nope")}), 0)
    with pytest.raises(DataPrepError, match="no MovieLens ratings file"):
        load_source(params(source="movielens", movielens={"path": str(tmp_path)}), 0)
    (ml_latest / "movies.csv").unlink()
    with pytest.raises(DataPrepError, match=r"movies.csv: file not found"):
        load_source(params(source="movielens", movielens={"path": str(ml_latest)}), 0)


def test_movielens_wrong_columns(ml_latest):
    write(ml_latest / "ratings.csv", "userId,movieId,score,timestamp\n1,1,4.0,100\n")
    with pytest.raises(DataPrepError, match=r"ratings.csv: header lacks column\(s\) \['rating'\]"):
        load_source(params(source="movielens", movielens={"path": str(ml_latest)}), 0)


def test_movielens_malformed_lines_skip_or_fail(ml_latest):
    text = (ml_latest / "ratings.csv").read_text()
    write(ml_latest / "ratings.csv", text + "1,2,four,500\n3,3\n")
    raw, (_, _, inter, report) = prepare(params(source="movielens", movielens={"path": str(ml_latest)}))
    assert list(report["malformed_lines_skipped"].values()) == [2]
    assert len(raw.interactions) == 13
    with pytest.raises(DataPrepError, match=r"ratings.csv, line 15: column rating: cannot parse 'four'"):
        load_source(params(source="movielens", malformed_lines="fail", movielens={"path": str(ml_latest)}), 0)
    with pytest.raises(DataPrepError, match="malformed_lines must be 'skip' or 'fail'"):
        load_source(params(source="movielens", malformed_lines="ignore", movielens={"path": str(ml_latest)}), 0)


@pytest.mark.parametrize("bad, expect", [("7.5", r"outside \[0.5, 5.0\]"), ("nan", "missing/NaN")])
def test_movielens_bad_ratings(ml_latest, bad, expect):
    write(ml_latest / "ratings.csv", (ml_latest / "ratings.csv").read_text() + f"2,1,{bad},140\n")
    with pytest.raises(DataPrepError, match=rf"ratings.csv: column rating has 1 .*{expect}"):
        prepare(params(source="movielens", movielens={"path": str(ml_latest)}))


def test_movielens_duplicate_ids(ml_latest, ml_100k):
    write(ml_latest / "movies.csv", (ml_latest / "movies.csv").read_text() + '3,"Other (2000)",Drama\n')
    with pytest.raises(DataPrepError, match=r"movies.csv: column movie id must be unique.*'3'"):
        load_source(params(source="movielens", movielens={"path": str(ml_latest)}), 0)
    write(ml_100k / "u.user", (ml_100k / "u.user").read_text() + "2|30|F|artist|11111\n")
    with pytest.raises(DataPrepError, match=r"u.user: column user_id must be unique"):
        prepare(params(source="movielens", movielens={"path": str(ml_100k)}))


def test_empty_after_k_core_and_unknown_source(ml_latest):
    with pytest.raises(DataPrepError, match=r"nothing left after 4-core filtering \(parameter data_prep.k_core=4\)"):
        prepare(params(source="movielens", k_core=4, movielens={"path": str(ml_latest)}))
    with pytest.raises(DataPrepError, match=r"data_prep.source must be one of .*got 'netflix'"):
        load_source(params(source="netflix"), 0)


# ---------------------------------------------------------------- lcrec_json
def test_lcrec_json(lcrec):
    raw, (items, users, inter, report) = prepare(params(source="lcrec_json", lcrec_json={"path": str(lcrec)}))
    assert report["users_dropped_short"] == 1
    assert inter[inter["user_id"] == "2"]["item_id"].tolist() == ["4", "0", "1", "2", "3"]
    it = items.set_index("item_id")
    assert it.loc["0", "brand"] == "Yamaha" and it.loc["0", "categories"] == "Musical Instruments, Strings"
    assert it.loc["1", "description"] == "Quick-release capo"
    assert inter["rating"].isna().all()
    assert any("no ratings" in n for n in report["notes"])


def test_lcrec_json_without_item_text(lcrec):
    (lcrec / "Tiny.item.json").unlink()
    raw, (items, *_ , report) = prepare(params(source="lcrec_json", lcrec_json={"path": str(lcrec)}))
    assert items["title"].str.startswith("Item ").all()
    assert any("items have no text" in n for n in report["notes"])


def test_lcrec_json_bad_input(lcrec):
    p = params(source="lcrec_json", lcrec_json={"path": str(lcrec)})
    write(lcrec / "Tiny.inter.json", '{"0": [1, 2, 3], "1": "oops", "2": [0, 1, 2]}')
    raw = load_source(p, 0)
    assert raw.report["malformed_lines_skipped"] == {str(lcrec / "Tiny.inter.json"): 1}
    with pytest.raises(DataPrepError, match=r"Tiny.inter.json, line 2: user '1': expected a list of item ids"):
        load_source(params(source="lcrec_json", malformed_lines="fail", lcrec_json={"path": str(lcrec)}), 0)
    write(lcrec / "Tiny.inter.json", '{"0": [1, 2, 3],')
    with pytest.raises(DataPrepError, match=r"Tiny.inter.json: not valid JSON \(line 1"):
        load_source(p, 0)
    (lcrec / "Tiny.inter.json").unlink()
    with pytest.raises(DataPrepError, match=r"Tiny.inter.json: file not found"):
        load_source(p, 0)


def test_lcrec_index_is_noted_and_read(lcrec):
    """data_prep does not read {name}.index.json (its tables stay as they were) but says it is there;
    read_lcrec_index gives tokenization the codes as ints, one list per item, levels in order."""
    p = params(source="lcrec_json", lcrec_json={"path": str(lcrec)})
    before = prepare(p)[1]
    index = {str(i): [f"<a_{i % 2}>", f"<b_{i}>", "<c_7>"] for i in range(5)}
    write(lcrec / "Tiny.index.json", json.dumps(index))
    items, users, inter, report = prepare(p)[1]
    for a, b in zip(before[:3], (items, users, inter)):
        assert a.equals(b)
    assert any("Tiny.index.json" in n and "item_features: lcrec_codes" in n for n in report["notes"])
    assert read_lcrec_index(lcrec / "Tiny.index.json") == {str(i): [i % 2, i, 7] for i in range(5)}
    assert read_lcrec_index(write(lcrec / "ints.json", json.dumps({"7": [3, 4]}))) == {"7": [3, 4]}


@pytest.mark.parametrize("content, expect", [
    ('{"0": ["<a_1>", "<b_2>"], "1": ["<a_1>"]}', r"bad.json: item '1' has 1 code levels, the first item 2"),
    ('{"0": ["<b_1>", "<a_2>"]}', r"bad.json: item '0', level 0: expected a code token like '<a_12>'"),
    ('{"0": ["<a_x>"]}', r"bad.json: item '0', level 0: expected a code token"),
    ('{"0": "<a_1>"}', r"bad.json: item '0': expected a non-empty list of code tokens"),
    ('[1, 2]', r"bad.json: expected a non-empty JSON object mapping item id"),
])
def test_lcrec_index_errors_name_the_file_and_what_was_expected(tmp_path, content, expect):
    with pytest.raises(DataPrepError, match=expect):
        read_lcrec_index(write(tmp_path / "bad.json", content))


def test_lcrec_index_missing_file_names_the_parameter(tmp_path):
    with pytest.raises(DataPrepError, match=r"nope.index.json: LC-Rec index file not found.*tokenization.semantic_encoder.lcrec_index"):
        read_lcrec_index(tmp_path / "nope.index.json")


# ---------------------------------------------------------------- amazon2018
def test_amazon2018(amazon):
    p = params(source="amazon2018", amazon2018={k: amazon[k] for k in ("ratings_path", "meta_path", "reviews_path")})
    raw, (items, users, inter, report) = prepare(p)
    assert report["duplicate_interactions_removed"] == 1 and report["k_core"] == 2
    assert sorted(users["user_id"]) == ["u1", "u2", "u3"] and sorted(items["item_id"]) == ["A1", "A2", "A3"]
    a1 = items.set_index("item_id").loc["A1"]
    assert a1["title"] == "Guitar Strings & More" and a1["description"] == "Bright strings"
    u1 = inter[inter["user_id"] == "u1"]
    assert u1["item_id"].tolist() == ["A1", "A2", "A3"] and u1["review"].iloc[0] == "Great Love these strings"


def test_amazon2018_with_header_and_2014_meta(amazon):
    d = amazon["dir"]
    write(d / "r.csv", "reviewerID,asin,overall,unixReviewTime\n" + "".join(
        f"u{u},A{i},5,{10 * u + i}\n" for u in range(1, 4) for i in range(1, 4)))
    write(d / "m.json", "".join(repr({"asin": f"A{i}", "title": f"T{i}", "categories": [["Music", "Gear"]]}) + "\n"
                                for i in range(1, 4)))
    raw, (items, _, inter, _) = prepare(params(source="amazon2018", amazon2018={
        "ratings_path": str(d / "r.csv"), "meta_path": str(d / "m.json")}))
    assert len(inter) == 9 and items["categories"].eq("Music, Gear").all()


def test_amazon2018_bad_input(amazon):
    d = amazon["dir"]
    base = {"ratings_path": amazon["ratings_path"], "meta_path": amazon["meta_path"]}
    with pytest.raises(DataPrepError, match=r"nope.csv: file not found.*data_prep.amazon2018.ratings_path"):
        load_source(params(source="amazon2018", amazon2018={**base, "ratings_path": str(d / "nope.csv")}), 0)
    with pytest.raises(DataPrepError, match="parameter data_prep.amazon2018.meta_path is not set"):
        load_source(params(source="amazon2018", amazon2018={**base, "meta_path": None}), 0)
    # malformed metadata lines: skipped and counted, or fatal
    write(d / "meta2.json", "".join(json.dumps(m) + "\n" for m in AMAZON_META) + "{not json\n" + '{"title": "no asin"}\n')
    raw = load_source(params(source="amazon2018", amazon2018={**base, "meta_path": str(d / "meta2.json")}), 0)
    assert raw.report["malformed_lines_skipped"] == {str(d / "meta2.json"): 2}
    with pytest.raises(DataPrepError, match=r"meta2.json, line 5: not a metadata record"):
        load_source(params(source="amazon2018", malformed_lines="fail",
                           amazon2018={**base, "meta_path": str(d / "meta2.json")}), 0)
    # the same asin with different metadata
    write(d / "meta3.json", json.dumps({"asin": "A1", "title": "x"}) + "\n" + json.dumps({"asin": "A1", "title": "y"}) + "\n")
    with pytest.raises(DataPrepError, match=r"meta3.json, line 2: asin 'A1' appears again"):
        load_source(params(source="amazon2018", amazon2018={**base, "meta_path": str(d / "meta3.json")}), 0)
    # a header without a rating column
    write(d / "r2.csv", "asin,reviewerID,stars,unixReviewTime\nA1,u1,5,1\n")
    with pytest.raises(DataPrepError, match=r"r2.csv: header lacks a rating column"):
        load_source(params(source="amazon2018", amazon2018={**base, "ratings_path": str(d / "r2.csv")}), 0)
    # 0 stars is out of the rating range
    write(d / "r3.csv", "A1,u1,0,1\nA2,u1,5,2\nA3,u1,5,3\n")
    with pytest.raises(DataPrepError, match=r"r3.csv: column rating has 1 value\(s\) outside"):
        prepare(params(source="amazon2018", amazon2018={**base, "ratings_path": str(d / "r3.csv")}))
    # too sparse for the 5-core
    with pytest.raises(DataPrepError, match="nothing left after 5-core"):
        prepare(params(source="amazon2018", amazon2018={**base, "k_core": 5}))


# ---------------------------------------------------------------- the real data, when present
def test_movielens_on_ml_latest_small():
    folder = SHARED_DATA / "ml-latest-small"
    if not (folder / "ratings.csv").is_file():
        pytest.skip(f"{folder} not present (../shared/data is outside the repository)")
    raw, (items, users, inter, report) = prepare(params(source="movielens", movielens={"path": str(folder)}))
    assert len(users) == 610 and len(inter) == 100_836 and len(items) == 9_724
    assert inter["rating"].between(0.5, 5.0).all() and report["malformed_lines_skipped"] == {}
    train, valid, test = leave_one_out(inter, 20)
    assert len(valid) == len(test) == 610 and train["history"].map(len).max() == 20


def test_lcrec_json_on_instruments():
    folder = SHARED_DATA / "instruments-lcrec"
    if not (folder / "Instruments.inter.json").is_file():
        pytest.skip(f"{folder} not present (../shared/data is outside the repository)")
    raw, (items, users, inter, report) = prepare(
        params(source="lcrec_json", lcrec_json={"path": str(folder), "name": "Instruments"}))
    assert len(users) == 24_772 and len(items) == 9_922 and len(inter) == 206_153
    assert any("items have no text" in n for n in report["notes"])
    index = read_lcrec_index(folder / "Instruments.index.json")
    assert set(index) == set(items["item_id"]) and {len(c) for c in index.values()} == {4}
    assert max(max(c) for c in index.values()) == 255
    # LC-Rec's released codes are not quite unique: 25 items share their code tuple with another item
    assert len(index) - len({tuple(c) for c in index.values()}) == 25
