"""Preference stages whose checkpoint selection kept the input policy are not decoded again.

A DPO stage picks, among its input policy (step 0) and its checkpoints, the best on a valid sample; when it
picks the input, its checkpoint holds the input's weights, and decoding it again would only reproduce the
input's lists at the cost of a full constrained beam search. Evaluation then reuses the rows of the input
policy — the nearest earlier LM stage in DAG order that was evaluated (an ablation's pass-through stage holds
its own input's weights, so the walk looks through it) — relabelled with the stage's name.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

REASON = "selection kept the input policy"


def kept_input_policy(meta: dict[str, Any]) -> bool:
    """Whether a DPO stage's checkpoint is its input policy, from what the stage recorded in
    ``meta["dpo"]`` (only when that block is the stage's own, not one inherited from an earlier stage):
    the policy and reference weight fingerprints are equal, or — without both fingerprints — the selected
    step is 0 (the input policy)."""
    dpo = meta.get("dpo") or {}
    if not dpo or meta.get("skipped") or (meta.get("stage") and dpo.get("stage") not in (None, meta.get("stage"))):
        return False
    policy, reference = dpo.get("policy_fingerprint"), dpo.get("reference_fingerprint")
    if policy and reference:
        return policy == reference
    return dpo.get("selected_step") == 0


def reuse_input_rows(parts: Sequence[tuple[pd.DataFrame, dict[str, Any]]]) -> list[tuple[pd.DataFrame, dict[str, Any]]]:
    """Each recommender's (recs, info), in DAG order, with every LM stage marked ``reuse_input`` given its
    input policy's rows relabelled with its own model name, and ``reused_from`` / ``note`` in its info."""
    out: list[tuple[pd.DataFrame, dict[str, Any]]] = []
    source: tuple[pd.DataFrame, dict[str, Any]] | None = None  # the input policy of the next LM stage
    for recs, info in parts:
        if info.get("kind") != "lm":
            out.append((recs, info))
            continue
        if info.get("reuse_input"):
            recs, info = _reuse(source, info)
        if info.get("skipped"):
            # A pass-through (meta.skipped) hands on its input unchanged; a missing checkpoint breaks the chain.
            source = source if info.get("pass_through") else None
        else:
            source = (recs, info)
        out.append((recs, info))
    return out


def _reuse(source: tuple[pd.DataFrame, dict[str, Any]] | None, info: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    if source is None:
        raise ValueError(
            f"evaluation: {info['model']} ({info['stage']}) kept its input policy, but no earlier LM stage was "
            "evaluated to take its recommendations from (its input checkpoint is missing); rerun the stages before "
            "it, or set evaluation.reuse_kept_input: false to decode it"
        )
    recs, given = source
    expected, got = info.get("reference_fingerprint"), given.get("policy_fingerprint")
    if expected and got and expected != got:
        log.warning("evaluation: %s kept its input policy, whose weights fingerprint %s… differs from that of the "
                    "evaluated %s (%s…); the checkpoints may be out of date", info["model"], expected[:12], given["model"], got[:12])
    note = f"reused from {given['model']}: {REASON}"
    log.info("evaluation: %s %s", info["model"], note)
    info = {**info, "reused_from": given["model"], "note": note}
    return recs.assign(model=info["model"]), info
