"""Fixtures for data_prep tests: tiny raw files written into tmp_path, and the shared data location."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
SHARED_DATA = REPO.parent / "shared" / "data"

BASE_PARAMS = {
    "source": "demo",
    "demo": {"n_users": 40, "n_items": 60, "mean_interactions": 8},
    "movielens": {"path": None},
    "lcrec_json": {"path": None, "name": "Tiny"},
    "amazon2018": {"ratings_path": None, "meta_path": None, "reviews_path": None, "k_core": 2},
    "malformed_lines": "skip",
    "rating_range": [0.5, 5.0],
    "k_core": 0,
    "min_interactions": 3,
    "max_history": 5,
    "feedback": {"disliked_max": 1, "liked_min": 4, "half_star": "up", "use_review_sentiment": True},
    "profile": {"liked_min": 4.0, "max_tags": 8, "max_categories": 3},
}


def params(**overrides) -> dict:
    p = json.loads(json.dumps(BASE_PARAMS))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(p.get(key), dict):
            p[key].update(value)
        else:
            p[key] = value
    return p


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding=encoding) as f:
            f.write(text)
    else:
        path.write_text(text, encoding=encoding)
    return path


# Four users, five movies; user 4 has only two ratings (dropped by the splitter).
ML_RATINGS = [
    (1, 1, 4.0, 100), (1, 2, 3.5, 200), (1, 3, 1.0, 300), (1, 4, 5.0, 400),
    (2, 2, 2.0, 110), (2, 3, 4.5, 120), (2, 5, 0.5, 130),
    (3, 1, 5.0, 50), (3, 5, 3.0, 60), (3, 4, 4.0, 70), (3, 2, 2.5, 80),
    (4, 1, 3.0, 10), (4, 2, 3.0, 20),
]
ML_MOVIES = [
    (1, "Toy Story (1995)", "Adventure|Animation|Children"),
    (2, "Heat (1995)", "Action|Crime|Thriller"),
    (3, "American President, The (1995)", "Comedy|Drama|Romance"),
    (4, "Matrix, The (1999)", "Action|Sci-Fi|Thriller"),
    (5, "Amelie (Fabuleux destin d'Amélie Poulain, Le) (2001)", "Comedy|Romance"),
]


@pytest.fixture
def ml_latest(tmp_path: Path) -> Path:
    d = tmp_path / "ml-latest"
    write(d / "ratings.csv", "userId,movieId,rating,timestamp\n" + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in ML_RATINGS))
    write(d / "movies.csv", "movieId,title,genres\n" + "".join(f'{i},"{t}",{g}\n' for i, t, g in ML_MOVIES))
    # user 1 tags movie 1 (training period) and movie 4 (its test item: must not reach the profile)
    write(d / "tags.csv", "userId,movieId,tag,timestamp\n1,1,pixar,150\n1,4,mind-bending,450\n")
    return d


@pytest.fixture
def ml_100k(tmp_path: Path) -> Path:
    d = tmp_path / "ml-100k"
    write(d / "u.data", "".join(f"{u}\t{i}\t{int(r + 0.5)}\t{t}\n" for u, i, r, t in ML_RATINGS))
    flags = {1: [3, 4, 5], 2: [1, 6, 16], 3: [5, 8, 14], 4: [1, 15, 16], 5: [5, 14]}
    lines = []
    for i, t, _ in ML_MOVIES:
        g = ["1" if k in flags[i] else "0" for k in range(19)]
        lines.append("|".join([str(i), t, "01-Jan-1995", "", "http://x"] + g) + "\n")
    write(d / "u.item", "".join(lines), encoding="latin-1")
    write(d / "u.user", "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n4|24|M|technician|43537\n")
    return d


@pytest.fixture
def ml_1m(tmp_path: Path) -> Path:
    d = tmp_path / "ml-1m"
    write(d / "ratings.dat", "".join(f"{u}::{i}::{int(r + 0.5)}::{t}\n" for u, i, r, t in ML_RATINGS), encoding="latin-1")
    write(d / "movies.dat", "".join(f"{i}::{t}::{g}\n" for i, t, g in ML_MOVIES), encoding="latin-1")
    write(d / "users.dat", "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n4::M::45::7::02460\n")
    return d


@pytest.fixture
def lcrec(tmp_path: Path) -> Path:
    d = tmp_path / "lcrec"
    write(d / "Tiny.inter.json", json.dumps({"0": [0, 1, 2, 3], "1": [2, 3, 4], "2": [4, 0, 1, 2, 3], "3": [1, 2]}))
    write(d / "Tiny.item.json", json.dumps({
        "0": {"title": "Yamaha Guitar Strings", "description": "Bright phosphor bronze strings.", "brand": "Yamaha",
              "categories": ["Musical Instruments", "Strings"]},
        "1": {"title": "Capo", "description": ["Quick-release", "capo"]},
        "2": {"title": "Guitar Tuner"},
        "3": {"title": "Gig Bag", "brand": "Gator"},
        "4": {"title": "Pick Set"},
    }))
    return d


AMAZON_META = [
    {"asin": "A1", "title": "Guitar Strings &amp; More", "description": ["<b>Bright</b> strings"], "brand": "Elixir",
     "category": ["Musical Instruments", "Strings"]},
    {"asin": "A2", "title": "Clip-on Tuner", "description": "Accurate tuner", "brand": "Snark", "category": ["Musical Instruments"]},
    {"asin": "A3", "title": "Capo", "brand": "Kyser", "category": ["Musical Instruments", "Capos"]},
    {"asin": "A4", "title": "Strap", "category": ["Musical Instruments"]},
]


@pytest.fixture
def amazon(tmp_path: Path) -> dict:
    d = tmp_path / "amazon"
    rows = [
        ("A1", "u1", 5, 100), ("A2", "u1", 4, 200), ("A3", "u1", 2, 300), ("A1", "u1", 5, 350),  # repeat of A1
        ("A1", "u2", 3, 110), ("A2", "u2", 1, 120), ("A3", "u2", 5, 130),
        ("A2", "u3", 4, 10), ("A3", "u3", 4, 20), ("A1", "u3", 5, 30),
        ("A4", "u4", 5, 40), ("A1", "u4", 4, 50),  # u4 and A4 fall out of the 2-core
    ]
    ratings = write(d / "ratings.csv", "".join(f"{i},{u},{r},{t}\n" for i, u, r, t in rows))
    meta = write(d / "meta.json.gz", "".join(json.dumps(m) + "\n" for m in AMAZON_META))
    reviews = write(d / "reviews.json.gz", json.dumps({"reviewerID": "u1", "asin": "A1", "overall": 5.0,
                                                        "summary": "Great", "reviewText": "Love these strings"}) + "\n")
    return {"ratings_path": str(ratings), "meta_path": str(meta), "reviews_path": str(reviews), "dir": d}
