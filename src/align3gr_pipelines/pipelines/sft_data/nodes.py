"""Nodes of the `sft_data` stage: thin orchestration over `align3gr_pipelines.sft.tasks`."""
from __future__ import annotations

import logging
from typing import Any

import pandas as pd

from align3gr_pipelines.sft import tasks as sft_tasks

log = logging.getLogger(__name__)


def build_sft_examples(
    items: pd.DataFrame,
    users: pd.DataFrame,
    interactions: pd.DataFrame,
    train_sequences: pd.DataFrame,
    valid: pd.DataFrame,
    test: pd.DataFrame,
    feedback: pd.DataFrame,
    item_scids: pd.DataFrame,
    user_scids: pd.DataFrame,
    params: dict[str, Any],
    seed: int,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Multi-task SFT examples (train + valid SEQ) and their statistics."""
    ctx = sft_tasks.build_context(
        items, users, interactions, train_sequences, valid, test, feedback, item_scids, user_scids, params
    )
    examples, stats = sft_tasks.build_sft_examples(ctx, valid, seed)
    leaks = sft_tasks.leakage_report(examples, valid, test, item_scids)
    if leaks["target_is_heldout"]:
        raise RuntimeError(f"sft_data: {leaks['target_is_heldout']} training examples target a valid/test item")
    log.info("sft_data: %s training examples by task, %d valid examples", stats["train_examples"], stats["valid_examples"])
    lengths = examples["prompt"].str.len() + examples["response"].str.len()
    stats["leakage"] = leaks
    stats["mean_chars_per_example"] = float(lengths.mean()) if len(lengths) else 0.0
    return examples, {"scalars": {f"train_examples_{t}": float(n) for t, n in stats["train_examples"].items()}, "curves": {}, "info": stats}


def build_seq_eval_prompts(
    valid: pd.DataFrame, test: pd.DataFrame, item_scids: pd.DataFrame, user_scids: pd.DataFrame, params: dict[str, Any]
) -> pd.DataFrame:
    """The valid/test SEQ prompts evaluation and DPO score, phrased as in training."""
    return sft_tasks.build_seq_eval_prompts(valid, test, item_scids, user_scids, params)
