"""Dataset statistics and a content fingerprint of the canonical tables."""
from __future__ import annotations

import hashlib

import pandas as pd


def table_digest(df: pd.DataFrame) -> str:
    """sha256 of a table's columns, dtypes and values in row order (CSV text is version-stable enough)."""
    h = hashlib.sha256()
    h.update(repr([(c, str(df[c].dtype)) for c in df.columns]).encode())
    h.update(df.to_csv(index=False, lineterminator="\n", float_format="%.6g").encode())
    return h.hexdigest()


def fingerprint(tables: dict[str, pd.DataFrame], params: dict) -> dict:
    digests = {name: table_digest(df) for name, df in sorted(tables.items())}
    combined = hashlib.sha256("".join(f"{k}:{v};" for k, v in digests.items()).encode()).hexdigest()
    return {
        "fingerprint": combined,
        "tables": digests,
        "rows": {name: int(len(df)) for name, df in sorted(tables.items())},
        "source": params.get("source"),
    }


def dataset_stats(
    items: pd.DataFrame,
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    train_sequences: pd.DataFrame,
    valid: pd.DataFrame,
    test: pd.DataFrame,
    feedback: pd.DataFrame,
    report: dict,
) -> dict:
    n_u, n_i, n = len(users), len(items), len(interactions)
    seq_len = interactions.groupby("user_id").size()
    hist_len = train_sequences["history"].map(len) if len(train_sequences) else pd.Series(dtype=float)
    levels = feedback["level"].value_counts()
    level_counts = {lv: int(levels.get(lv, 0)) for lv in ("disliked", "neutral", "liked")}
    total = max(1, sum(level_counts.values()))
    rating = interactions["rating"]
    return {
        "source": report.get("source"),
        "n_users": n_u,
        "n_items": n_i,
        "n_interactions": n,
        "density": n / max(1, n_u * n_i),
        "sequence_length": {
            "mean": float(seq_len.mean()),
            "median": float(seq_len.median()),
            "min": int(seq_len.min()),
            "max": int(seq_len.max()),
        },
        "n_train_sequences": int(len(train_sequences)),
        "mean_train_history_length": float(hist_len.mean()) if len(hist_len) else 0.0,
        "n_valid": int(len(valid)),
        "n_test": int(len(test)),
        "ratings": {
            "present": int(rating.notna().sum()),
            "min": float(rating.min()) if rating.notna().any() else None,
            "max": float(rating.max()) if rating.notna().any() else None,
            "mean": float(rating.mean()) if rating.notna().any() else None,
            "half_stars": bool(((rating.dropna() * 2) % 2 == 1).any()),
        },
        "reviews_present": int(interactions["review"].notna().sum()),
        "feedback_levels": level_counts,
        "feedback_level_share": {k: v / total for k, v in level_counts.items()},
        "feedback_by_split": {
            str(s): {str(k): int(v) for k, v in g["level"].value_counts().items()}
            for s, g in feedback.groupby("split")
        },
        "feedback_sources": {str(k): int(v) for k, v in feedback["source"].value_counts().items()},
        "items_with_text": int((items["title"].notna() | items["description"].notna()).sum()),
        "users_profile_source": report.get("profile_sources", {}),
        "cleaning": {
            k: report[k]
            for k in (
                "malformed_lines_skipped", "decode_errors_replaced", "empty_files", "timestamps_out_of_range_dropped",
                "duplicate_interactions_removed", "duplicate_interactions", "k_core", "k_core_users_removed",
                "k_core_interactions_removed", "users_dropped_short", "items_dropped_unused",
                "items_without_metadata",
            )
            if k in report
        },
        "notes": report.get("notes", []),
    }
