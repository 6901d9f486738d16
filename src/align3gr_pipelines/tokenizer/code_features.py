"""Item content from released item codes, for data without item text (LC-Rec's Instruments release).

LC-Rec built its 4-level item codes with an RQ-VAE over LLM embeddings of the item texts, so the codes are the
content signal the release keeps. An RQ-VAE reconstructs an item as the sum of one codeword per level; here
every (level, code) gets a fixed random unit vector (seeded by (seed, level, code) alone, so an item's feature
depends only on its own codes and the seed, never on the rest of the catalogue), weighted by
``level_decay ** level`` as the residual levels of an RQ-VAE shrink, summed and L2-normalised. Two items then
have cosine similarity ~ the weight share of the levels whose codes they share: 0.75 of it is the first
level's with the default decay 0.5 over 4 levels.

A user's feature is the normalised mean of the features of the items in their training-period history (what
a profile "built from history" says about their taste, in the same space as the items).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def code_vector(level: int, code: int, dim: int, seed: int) -> np.ndarray:
    """The fixed unit vector of one (level, code) pair."""
    v = np.random.default_rng([int(seed), int(level), int(code)]).standard_normal(dim)
    return v / np.linalg.norm(v)


def item_code_features(codes: np.ndarray | Sequence[Sequence[int]], dim: int = 128, level_decay: float = 0.5,
                       seed: int = 0) -> np.ndarray:
    """codes [n, L] (non-negative ints) -> float32 [n, dim], unit rows: sum_l level_decay**l * v(l, code_l)."""
    codes = np.asarray(codes, dtype=np.int64)
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"item_code_features: expected codes of shape [n_items, levels >= 1], got {codes.shape}")
    if dim < 1 or not level_decay > 0:
        raise ValueError(f"item_code_features: need dim >= 1 and level_decay > 0, got dim={dim}, level_decay={level_decay}")
    if len(codes) and codes.min() < 0:
        raise ValueError("item_code_features: codes must be non-negative")
    out = np.zeros((len(codes), dim), dtype=np.float64)
    for level in range(codes.shape[1]):
        column = codes[:, level]
        uniq, inverse = np.unique(column, return_inverse=True)
        table = np.stack([code_vector(level, c, dim, seed) for c in uniq]) if len(uniq) else np.zeros((0, dim))
        out += (level_decay**level) * table[inverse.reshape(-1)]
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def history_features(histories: Sequence[Sequence[int]], item_features: np.ndarray) -> np.ndarray:
    """Per user, the L2-normalised mean of the item feature rows listed in their history (row indices into
    ``item_features``); a zero row for an empty history (no signal, as a zero CF row)."""
    item_features = np.asarray(item_features, dtype=np.float32)
    out = np.zeros((len(histories), item_features.shape[1]), dtype=np.float32)
    for r, rows in enumerate(histories):
        if len(rows):
            mean = item_features[np.asarray(rows, dtype=np.int64)].mean(0)
            norm = float(np.linalg.norm(mean))
            out[r] = mean / norm if norm > 0 else mean
    return out
