"""Nodes of the `data_prep` stage: thin orchestration over align3gr_pipelines.data.

Every check on the input runs in the first two nodes, before any output is saved, so a run that fails on
bad input leaves the previous run's outputs intact.
"""
from __future__ import annotations

import logging

import pandas as pd

from align3gr_pipelines.data.canonical import TAG_COLUMNS, RawTables, canonicalize
from align3gr_pipelines.data.feedback import build_feedback
from align3gr_pipelines.data.profiles import build_user_profiles
from align3gr_pipelines.data.sources import check_params, load_source
from align3gr_pipelines.data.splitting import holdout_sizes, leave_one_out
from align3gr_pipelines.data.stats import dataset_stats, fingerprint

log = logging.getLogger(__name__)


def load_raw(params: dict, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    check_params(params)
    raw = load_source(params, seed)
    report = dict(raw.report, has_ratings=raw.has_ratings, has_timestamps=raw.has_timestamps)
    tags = raw.user_tags if raw.user_tags is not None else pd.DataFrame(columns=TAG_COLUMNS)
    log.info(
        "data_prep source=%s: %d items, %d users, %d interactions, %d tags",
        report.get("source"), len(raw.items), raw.interactions["user_id"].nunique(), len(raw.interactions), len(tags),
    )
    return raw.items, raw.users, raw.interactions, tags, report


def clean_tables(
    raw_items: pd.DataFrame, raw_users: pd.DataFrame, raw_interactions: pd.DataFrame, raw_report: dict, params: dict
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    raw = RawTables(raw_items, raw_users, raw_interactions, has_ratings=raw_report["has_ratings"],
                    has_timestamps=raw_report.get("has_timestamps", True),
                    report={k: v for k, v in raw_report.items() if k not in ("has_ratings", "has_timestamps")})
    items, users, interactions, report = canonicalize(raw, params)
    log.info(
        "canonical: %d users, %d items, %d interactions (dropped %d users with < %d interactions, %d duplicates)",
        len(users), len(items), len(interactions), report["users_dropped_short"],
        params.get("min_interactions", 3), report["duplicate_interactions_removed"],
    )
    for note in report.get("notes", []):
        log.warning(note)
    return items, users, interactions, report


def split_sequences(interactions: pd.DataFrame, params: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    k_valid, k_test = holdout_sizes(params.get("holdout"))
    train, valid, test = leave_one_out(interactions, int(params.get("max_history", 20)), k_valid, k_test)
    log.info("split: %s, %d train / %d valid / %d test cases over %d users", (params.get("holdout") or {}).get("mode", "leave_one_out"),
             len(train), len(valid), len(test), test["user_id"].nunique())
    return train, valid, test


def build_users(
    users_base: pd.DataFrame, interactions: pd.DataFrame, items: pd.DataFrame, user_tags: pd.DataFrame, params: dict
) -> tuple[pd.DataFrame, dict]:
    users, sources = build_user_profiles(users_base, interactions, items, user_tags, params.get("profile", {}) or {},
                                         holdout_sizes(params.get("holdout")))
    log.info("user profiles by source: %s", sources)
    return users, sources


def build_feedback_table(interactions: pd.DataFrame, params: dict) -> pd.DataFrame:
    fb = build_feedback(interactions, params.get("feedback", {}) or {}, holdout_sizes(params.get("holdout")))
    if fb.empty:
        log.warning("no ratings or reviews in this source: the feedback table is empty (real-feedback DPO has no pairs)")
    return fb


def summarize(
    items: pd.DataFrame,
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    train_sequences: pd.DataFrame,
    valid: pd.DataFrame,
    test: pd.DataFrame,
    feedback: pd.DataFrame,
    clean_report: dict,
    profile_sources: dict,
) -> dict:
    stats = dataset_stats(
        items, users, interactions, train_sequences, valid, test, feedback,
        dict(clean_report, profile_sources=profile_sources),
    )
    log.info(
        "dataset: %d users, %d items, %d interactions, density %.4f, mean sequence %.1f, levels %s",
        stats["n_users"], stats["n_items"], stats["n_interactions"], stats["density"],
        stats["sequence_length"]["mean"], stats["feedback_levels"],
    )
    return stats


def fingerprint_tables(
    items: pd.DataFrame,
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    train_sequences: pd.DataFrame,
    valid: pd.DataFrame,
    test: pd.DataFrame,
    feedback: pd.DataFrame,
    params: dict,
) -> dict:
    return fingerprint(
        {"items": items, "users": users, "interactions": interactions, "train_sequences": train_sequences,
         "valid": valid, "test": test, "feedback": feedback},
        params,
    )
