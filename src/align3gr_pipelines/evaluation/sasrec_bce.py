"""SASRec trained the way the paper's baselines train it (LETTER / LC-Rec / TIGER line, after Kang & McAuley):
binary cross-entropy against one uniformly sampled negative per position. Everything else — architecture,
epochs, history length, dropout, optimiser — is the collaborative encoder's (`tokenization.collaborative_encoder`),
so the only difference from the `sasrec` row (full-softmax cross-entropy, the stronger model) is the loss.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from align3gr_pipelines.cf.sasrec import ARCHITECTURE, SASRec, build_sasrec, fit_sasrec, training_sequences
from align3gr_pipelines.devices import resolve_device

TRAINING = ("epochs", "batch_size", "lr", "weight_decay")
RUNTIME = ("device", "num_threads")  # where it trains; from the tokenization stage's top level
SETTINGS = ARCHITECTURE + TRAINING + RUNTIME


def bce_settings(evaluation: dict[str, Any], tokenization: dict[str, Any]) -> dict[str, Any]:
    """`evaluation.sasrec_bce` over `tokenization.collaborative_encoder` (and tokenization's device and
    num_threads): a key set to a non-null value in the former wins, every other key is the latter's."""
    base = (tokenization or {}).get("collaborative_encoder")
    if not isinstance(base, dict):
        raise KeyError("evaluation.sasrec_bce defaults to 'tokenization.collaborative_encoder', which is missing "
                       "from the parameters (parameters_tokenization.yml)")
    own = evaluation.get("sasrec_bce") or {}
    if not isinstance(own, dict):
        raise ValueError(f"evaluation.sasrec_bce must be a mapping of {list(SETTINGS)} (or null), got {own!r}")
    unknown = sorted(set(own) - set(SETTINGS))
    if unknown:
        raise ValueError(f"evaluation.sasrec_bce: unknown key(s) {unknown}; expected some of {list(SETTINGS)}")
    inherited = {k: base.get(k) for k in ARCHITECTURE + TRAINING}
    inherited.update(weight_decay=base.get("weight_decay", 0.0), device=tokenization.get("device", "cpu"),
                     num_threads=tokenization.get("num_threads"))
    return {**inherited, **{k: v for k, v in own.items() if v is not None}}


def train_sasrec_bce(
    item_ids: Sequence[str], train_sequences: pd.DataFrame, settings: dict[str, Any], seed: int
) -> tuple[SASRec, dict[str, Any]]:
    """A SASRec with `settings`' architecture fitted with loss 'bce' on the training sequences (seeded as the
    tokenization stage seeds its SASRec); the log holds its curves, scalars and ``train_seconds``."""
    missing = [k for k in ("epochs", "batch_size", "lr") if settings.get(k) is None]
    if missing:
        raise KeyError(f"evaluation.sasrec_bce: no value for {missing} (neither set there nor in tokenization.collaborative_encoder)")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = build_sasrec(item_ids, settings)
    log = fit_sasrec(
        model, list(training_sequences(train_sequences).values()), epochs=int(settings["epochs"]),
        batch_size=int(settings["batch_size"]), lr=float(settings["lr"]), weight_decay=float(settings["weight_decay"] or 0.0),
        seed=seed, device=resolve_device(settings["device"]), loss="bce",
    )
    model.cpu()
    log["train_seconds"] = time.perf_counter() - started
    log["settings"] = {k: settings[k] for k in ARCHITECTURE + TRAINING} | {"loss": "bce", "negatives_per_position": 1}
    return model, log
