"""Tiny contract-shaped tables (data_prep + tokenization outputs) for the SFT tests.

Random but seeded: items with unique titles, brands and categories; users with chronological sequences of
distinct items, leave-one-out splits, rating-based feedback and short reviews; random item SCIDs (unique)
and user SCIDs made with `codes_to_tokens`, as tokenization would hand them over.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from align3gr_pipelines.tokenizer.scid import codes_to_tokens

CATEGORIES = ["Guitars", "Drums", "Keyboards", "Microphones", "Cables", "Amplifiers"]
BRANDS = ["Fender", "Yamaha", "Roland", "Shure", "Boss"]
ADJECTIVES = ["bright", "warm", "compact", "vintage", "studio", "travel", "deluxe", "classic"]
REVIEWS = {5: "Great sound and solid build. Love it", 4: "Good value for the money", 3: "It is okay, nothing special",
           2: "Feels cheap, returned soon", 1: "Broke after a week. Avoid"}


def _scids(n: int, levels: int, codebook: int, kind: str, rng: np.random.Generator, unique: bool) -> list[list[int]]:
    if unique:
        flat = rng.choice(codebook**levels, size=n, replace=False)
        return [[int(f) // codebook**(levels - 1 - lv) % codebook for lv in range(levels)] for f in flat]
    return rng.integers(0, codebook, size=(n, levels)).tolist()


def make_tables(
    n_users: int = 30, n_items: int = 40, min_len: int = 6, max_len: int = 12, levels: int = 3, codebook: int = 8,
    max_history: int = 20, seed: int = 0, with_users: bool = True,
) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    item_ids = [f"it{k}" for k in range(n_items)]
    cats = [CATEGORIES[k % len(CATEGORIES)] for k in range(n_items)]
    items = pd.DataFrame({
        "item_id": item_ids,
        "title": [f"{ADJECTIVES[k % len(ADJECTIVES)].title()} {cats[k][:-1]} Model {k}" for k in range(n_items)],
        "description": [f"A {ADJECTIVES[k % len(ADJECTIVES)]} {cats[k].lower()} item." for k in range(n_items)],
        "brand": [BRANDS[k % len(BRANDS)] for k in range(n_items)],
        "categories": [f"Musical Instruments, {c}" for c in cats],
    })
    items["text"] = items["title"] + ". " + items["description"]
    user_ids = [f"u{k}" for k in range(n_users)]
    users = pd.DataFrame({"user_id": user_ids,
                          "profile": [f"A {ADJECTIVES[k % len(ADJECTIVES)]} player who likes {CATEGORIES[k % 6].lower()}"
                                      for k in range(n_users)]})
    inter_rows, train_rows, valid_rows, test_rows, fb_rows = [], [], [], [], []
    for u in user_ids:
        n = int(rng.integers(min_len, max_len + 1))
        seq = [item_ids[i] for i in rng.choice(n_items, size=n, replace=False)]
        ratings = rng.integers(1, 6, size=n)
        for p, (it, r) in enumerate(zip(seq, ratings)):
            inter_rows.append((u, it, 1_000 + p * 10, float(r), REVIEWS[int(r)] if p % 3 else None))
            split = "train" if p < n - 2 else ("valid" if p == n - 2 else "test")
            level = "liked" if r >= 4 else ("neutral" if r >= 2 else "disliked")
            fb_rows.append((u, it, level, "rating", float(r), 1_000 + p * 10, split))
        for p in range(1, n - 2):
            train_rows.append((u, seq[:p][-max_history:], seq[p], p))
        valid_rows.append((u, seq[: n - 2][-max_history:], seq[n - 2], n - 2))
        test_rows.append((u, seq[: n - 1][-max_history:], seq[n - 1], n - 1))
    cols = ["user_id", "history", "target", "position"]
    item_codes = _scids(n_items, levels, codebook, "item", rng, unique=True)
    user_codes = _scids(n_users, levels, codebook, "user", rng, unique=False)
    return {
        "items": items,
        "users": users,
        "interactions": pd.DataFrame(inter_rows, columns=["user_id", "item_id", "timestamp", "rating", "review"]),
        "train_sequences": pd.DataFrame(train_rows, columns=cols),
        "valid": pd.DataFrame(valid_rows, columns=cols),
        "test": pd.DataFrame(test_rows, columns=cols),
        "feedback": pd.DataFrame(fb_rows, columns=["user_id", "item_id", "level", "source", "rating", "timestamp", "split"]),
        "item_scids": pd.DataFrame({"id": item_ids, "codes": item_codes,
                                    "tokens": [codes_to_tokens(c, "item") for c in item_codes]}),
        "user_scids": pd.DataFrame({"id": user_ids, "codes": user_codes,
                                    "tokens": [codes_to_tokens(c, "user") for c in user_codes]})
        if with_users else pd.DataFrame({"id": pd.Series([], dtype=str), "codes": pd.Series([], dtype=object),
                                         "tokens": pd.Series([], dtype=str)}),
    }
