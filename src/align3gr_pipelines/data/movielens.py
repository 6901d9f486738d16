"""MovieLens in its three common layouts, found by file name in one folder.

- ML-100K: ``u.data`` (tab: user, item, rating, timestamp), ``u.item`` (``|``: id, title, release date,
  video date, IMDb URL, 19 genre flags), ``u.user`` (``|``: id, age, gender, occupation, zip).
- ML-1M: ``ratings.dat``, ``movies.dat``, ``users.dat`` (``::``-separated, Latin-1).
- ml-latest(-small): ``ratings.csv``, ``movies.csv``, ``tags.csv`` (headers, quoted titles).

Item text comes from title, year and genres; user profiles from demographics where the layout has them,
else they are left empty here and built from tags or training-period history downstream.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd

from .canonical import TAG_COLUMNS, RawTables
from .errors import DataPrepError, MalformedLines
from .textio import TextDecoding, read_table, require_file, to_float, to_int, warn_replaced

log = logging.getLogger(__name__)

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]
ML1M_AGES = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
ML1M_OCCUPATIONS = [
    "other", "academic/educator", "artist", "clerical/admin", "college/grad student", "customer service",
    "doctor/health care", "executive/managerial", "farmer", "homemaker", "K-12 student", "lawyer", "programmer",
    "retired", "sales/marketing", "scientist", "self-employed", "technician/engineer", "tradesman/craftsman",
    "unemployed", "writer",
]
_YEAR = re.compile(r"^(.*?)\s*\((\d{4})(?:[-–]\d{0,4})?\)\s*$")


def detect_layout(folder: Path) -> str:
    if (folder / "u.data").is_file():
        return "ml-100k"
    if (folder / "ratings.dat").is_file():
        return "ml-1m"
    if (folder / "ratings.csv").is_file():
        return "ml-latest"
    raise DataPrepError(
        f"{folder}: no MovieLens ratings file found; expected u.data (ML-100K), ratings.dat (ML-1M) or "
        "ratings.csv (ml-latest / ml-latest-small) (parameter data_prep.movielens.path)"
    )


def _split_title(title: str) -> tuple[str, str | None]:
    m = _YEAR.match(title.strip())
    return (m.group(1).strip(), m.group(2)) if m else (title.strip(), None)


def _movie_items(ids: list, titles: list[str], genres: list[list[str]]) -> pd.DataFrame:
    rows = []
    for mid, raw_title, gs in zip(ids, titles, genres):
        title, year = _split_title(raw_title)
        # ML titles put the article last ("Matrix, The"); put it back in front so the text reads naturally.
        m = re.match(r"^(.*), (The|A|An|Les|La|Le|Il|Das|Der|Die|El)$", title)
        if m:
            title = f"{m.group(2)} {m.group(1)}"
        gs = [g for g in gs if g and g not in ("(no genres listed)", "unknown")]
        desc = " ".join(
            x for x in (f"A {year} film." if year else "A film.", f"Genres: {', '.join(gs)}." if gs else "") if x
        )
        rows.append((str(mid), f"{title} ({year})" if year else title, desc, None, ", ".join(gs) or None))
    return pd.DataFrame(rows, columns=["item_id", "title", "description", "brand", "categories"])


def load_movielens(path: str | None, malformed: str = "skip", text: TextDecoding | None = None) -> RawTables:
    """``text.encoding`` None keeps each file's release encoding: Latin-1 for ML-1M and ML-100K's
    ``u.item`` and ``u.user``, UTF-8 for the rest (ml-latest, and ML-100K's all-digit ``u.data``)."""
    text = text or TextDecoding(parameter="data_prep.movielens.encoding")
    if path is None or not Path(path).is_dir():
        raise DataPrepError(
            f"{path}: folder not found; expected a MovieLens folder (parameter data_prep.movielens.path)"
        )
    folder = Path(path)
    layout = detect_layout(folder)
    counters: list[MalformedLines] = []

    def counter(p: Path) -> MalformedLines:
        c = MalformedLines(str(p), malformed)
        counters.append(c)
        return c

    users = pd.DataFrame(columns=["user_id", "profile"])
    tags = pd.DataFrame(columns=TAG_COLUMNS)
    empty_files: list[str] = []
    if layout == "ml-100k":
        rp = require_file(folder / "u.data", "ML-100K ratings (user, item, rating, timestamp; tab-separated)",
                          "data_prep.movielens.path")
        ip = require_file(folder / "u.item", "ML-100K movies (id|title|date|video date|url|19 genre flags)",
                          "data_prep.movielens.path")
        inter = read_table(rp, ["user_id", "item_id", "rating", "timestamp"],
                           {"user_id": to_int, "item_id": to_int, "rating": to_float, "timestamp": to_int},
                           counter(rp), text, sep="\t")
        cols = ["item_id", "title", "date", "video", "url", *[f"g{k}" for k in range(19)]]
        raw = read_table(ip, cols, {"item_id": to_int, **{f"g{k}": to_int for k in range(19)}}, counter(ip), text,
                         sep="|", encoding="latin-1")
        genres = [[ML100K_GENRES[k] for k in range(19) if r[f"g{k}"] == 1] for _, r in raw.iterrows()]
        items = _movie_items(raw["item_id"].tolist(), raw["title"].tolist(), genres)
        up = folder / "u.user"
        if up.is_file():
            u = read_table(up, ["user_id", "age", "gender", "occupation", "zip"], {"user_id": to_int, "age": to_int},
                           counter(up), text, sep="|", encoding="latin-1")
            users = pd.DataFrame({
                "user_id": u["user_id"].astype(str),
                "profile": [f"Age {a}, {'male' if g == 'M' else 'female' if g == 'F' else g}, occupation: {o}."
                            for a, g, o in zip(u["age"], u["gender"], u["occupation"])],
            })
        files = (rp, ip, up)
    elif layout == "ml-1m":
        rp = require_file(folder / "ratings.dat", "ML-1M ratings (UserID::MovieID::Rating::Timestamp)",
                          "data_prep.movielens.path")
        ip = require_file(folder / "movies.dat", "ML-1M movies (MovieID::Title::Genres)", "data_prep.movielens.path")
        inter = read_table(rp, ["user_id", "item_id", "rating", "timestamp"],
                           {"user_id": to_int, "item_id": to_int, "rating": to_float, "timestamp": to_int},
                           counter(rp), text, sep="::", encoding="latin-1")
        raw = read_table(ip, ["item_id", "title", "genres"], {"item_id": to_int}, counter(ip), text, sep="::",
                         encoding="latin-1")
        items = _movie_items(raw["item_id"].tolist(), raw["title"].tolist(), [g.split("|") for g in raw["genres"]])
        up = folder / "users.dat"
        if up.is_file():
            u = read_table(up, ["user_id", "gender", "age", "occupation", "zip"],
                           {"user_id": to_int, "age": to_int, "occupation": to_int}, counter(up), text, sep="::",
                           encoding="latin-1")
            users = pd.DataFrame({
                "user_id": u["user_id"].astype(str),
                "profile": [
                    f"Age {ML1M_AGES.get(a, a)}, {'male' if g == 'M' else 'female' if g == 'F' else g}, "
                    f"occupation: {ML1M_OCCUPATIONS[o] if 0 <= o < len(ML1M_OCCUPATIONS) else o}."
                    for a, g, o in zip(u["age"], u["gender"], u["occupation"])
                ],
            })
        files = (rp, ip, up)
    else:
        rp = require_file(folder / "ratings.csv", "ratings (userId,movieId,rating,timestamp)", "data_prep.movielens.path")
        ip = require_file(folder / "movies.csv", "movies (movieId,title,genres)", "data_prep.movielens.path")
        inter = read_table(rp, ["userId", "movieId", "rating", "timestamp"],
                           {"userId": to_int, "movieId": to_int, "rating": to_float, "timestamp": to_int},
                           counter(rp), text, header=True).rename(columns={"userId": "user_id", "movieId": "item_id"})
        raw = read_table(ip, ["movieId", "title", "genres"], {"movieId": to_int}, counter(ip), text, header=True)
        items = _movie_items(raw["movieId"].tolist(), raw["title"].tolist(), [g.split("|") for g in raw["genres"]])
        tp = folder / "tags.csv"
        if tp.is_file():
            tags = read_table(tp, ["userId", "movieId", "tag", "timestamp"],
                              {"userId": to_int, "movieId": to_int, "timestamp": to_int}, counter(tp), text, header=True)
            tags = tags.rename(columns={"userId": "user_id", "movieId": "item_id"})
            if tags.empty:
                # Not an error (profiles fall back to the training-period history), but not silent either.
                empty_files.append(str(tp))
                log.warning("%s: no tags (the file is empty, holds only its header, or every line was malformed); "
                            "user profiles come from the training-period history instead", tp)
        files = (rp, ip, tp)

    dup = items["item_id"][items["item_id"].duplicated()]
    if len(dup):
        raise DataPrepError(f"{ip}: column movie id must be unique, found duplicated id(s) {dup.iloc[:3].tolist()}")
    skipped = {c.path: c.count for c in counters if c.count}
    for c in counters:
        if c.count:
            log.warning("%s: skipped %d malformed line(s), e.g. %s", c.path, c.count, "; ".join(c.examples[:3]))
    inter["review"] = None
    return RawTables(
        items=items,
        users=users,
        interactions=inter[["user_id", "item_id", "timestamp", "rating", "review"]],
        user_tags=tags,
        has_ratings=True,
        report={
            "source": "movielens",
            "layout": layout,
            "interactions_file": str(files[0]),
            "items_file": str(files[1]),
            "users_file": str(files[2]),
            "malformed_lines_skipped": skipped,
            "decode_errors_replaced": warn_replaced(text, log),
            "empty_files": empty_files,
            "notes": [],
        },
    )
