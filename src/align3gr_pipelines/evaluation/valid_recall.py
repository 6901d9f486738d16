"""Validation Recall@K of a RecLM with the constrained decoder: the model-selection signal for SFT
checkpoints and DPO stages (a DPO stage may select on NDCG@K or MRR@K of the same decoded lists instead:
`head_scores`, `SELECTION_METRICS`).

Loss on a few hundred valid examples and recall with the constrained decoder can disagree (a model can
lower the loss of the target while its rank among ~10k catalogue items gets worse), and recall is what is
reported. So checkpoints are chosen on the same constrained beam search the evaluation stage runs, over a
seeded sample of valid users (the same users every time, so curves are comparable across steps and runs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from align3gr_pipelines.evaluation.metrics import mrr_at_k, ndcg_at_k, recall_at_k as recall_per_user
from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog
from align3gr_pipelines.lm.sharded_decoding import decode_prompts_sharded

# What a DPO stage may select and gate on (`Selection.metric`), each a per-user score of one decoded top-K
# list: recall = hit (bool, the behaviour before issue 25), ndcg = 1/log2(rank + 1), mrr = 1/rank, 0 beyond K.
SELECTION_METRICS = ("recall", "ndcg", "mrr")


@dataclass
class ValidSample:
    """SEQ prompts of a seeded sample of valid users and the catalogue index of each held-out target."""

    prompts: list[str]
    target_index: np.ndarray  # int64[n]; index into catalog.item_ids
    catalog: SCIDCatalog

    def __len__(self) -> int:
        return len(self.prompts)


def sample_valid_prompts(seq_eval_prompts: pd.DataFrame, n_users: int | None, seed: int) -> pd.DataFrame:
    """The valid rows of `seq_eval_prompts` (split, user_id, prompt, target), at most `n_users` of them,
    drawn with `seed` from the users sorted by id (so the sample does not depend on row order)."""
    missing = [c for c in ("split", "user_id", "prompt", "target") if c not in seq_eval_prompts.columns]
    if missing:
        raise ValueError(f"valid recall: 'seq_eval_prompts' lacks columns {missing}; it has {list(seq_eval_prompts.columns)}")
    valid = seq_eval_prompts[seq_eval_prompts["split"] == "valid"].drop_duplicates("user_id")
    if valid.empty:
        raise ValueError("valid recall: 'seq_eval_prompts' has no row with split == 'valid'")
    valid = valid.assign(user_id=valid["user_id"].astype(str)).sort_values("user_id", kind="stable")
    if n_users is not None and int(n_users) < len(valid):
        if int(n_users) < 1:
            raise ValueError(f"valid recall: the number of valid users must be >= 1 or null, got {n_users}")
        pick = np.sort(np.random.default_rng(seed).choice(len(valid), int(n_users), replace=False))
        valid = valid.iloc[pick]
    return valid.reset_index(drop=True)


def build_valid_sample(rows: pd.DataFrame, item_scids: pd.DataFrame, tokenizer: Any) -> ValidSample:
    """Prompts and target indices over the catalogue of `item_scids` (targets outside it are dropped:
    the decoder can never return them, so they would only scale recall by a constant)."""
    catalog = SCIDCatalog.from_scids(item_scids, tokenizer)
    where = {item: i for i, item in enumerate(catalog.item_ids)}
    keep = rows["target"].astype(str).map(where).notna().to_numpy()
    rows = rows[keep]
    index = rows["target"].astype(str).map(where).to_numpy(dtype=np.int64)
    return ValidSample(prompts=rows["prompt"].tolist(), target_index=index, catalog=catalog)


@torch.no_grad()
def decode_top_k(
    rec_lm: Any, sample: ValidSample, k: int = 10, beam_width: int = 20, batch_size: int = 64, nproc: int = 1,
    timeout_s: float | None = None, where: str = "valid recall",
) -> np.ndarray:
    """int64[n, k]: each sampled user's constrained top-`k` (catalogue indices, best first; -1 = no item).
    ``nproc`` > 1 decodes on that many torchrun ranks (`lm.sharded_decoding`: the same lists), ended after
    ``timeout_s``; ``where`` is the parameter block its errors name."""
    if len(sample) == 0:
        raise ValueError("valid recall: the valid sample is empty (no target is in the catalogue)")
    idx, _ = decode_prompts_sharded(rec_lm, sample.prompts, sample.catalog, nproc=nproc, timeout_s=timeout_s, where=where,
                                    beam_width=max(beam_width, k), top_k=k, batch_size=batch_size)
    return idx.numpy()


def hits_at_k(rec_lm: Any, sample: ValidSample, k: int = 10, beam_width: int = 20, batch_size: int = 64, nproc: int = 1,
              timeout_s: float | None = None) -> np.ndarray:
    """bool[n]: whether each sampled user's held-out item is among the model's constrained top-`k`."""
    top = decode_top_k(rec_lm, sample, k, beam_width, batch_size, nproc=nproc, timeout_s=timeout_s)
    return (top == sample.target_index[:, None]).any(axis=1)


def head_scores(top: np.ndarray, target_index: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-user ``recall@k`` (bool hits), ``ndcg@k``, ``mrr@k`` and ``hr@1`` of decoded lists ``top`` [n, >= k]
    (best first, -1 = no item) against the held-out targets: one decode gives every head metric. The math is
    `evaluation.metrics`' (no list scores: the decoder's order is the ranking, as in `hits_at_k`)."""
    top = np.asarray(top)
    if top.ndim != 2 or top.shape[0] != len(target_index):
        raise ValueError(f"valid head scores: expected decoded lists [{len(target_index)}, k], got shape {top.shape}")
    items, targets = top[:, :k], np.asarray(target_index).tolist()
    return {
        f"recall@{k}": recall_per_user(items, targets, k) > 0,  # bool: no ties, so a hit or a miss
        f"ndcg@{k}": ndcg_at_k(items, targets, k),
        f"mrr@{k}": mrr_at_k(items, targets, k),
        "hr@1": recall_per_user(items, targets, 1),
    }


def selection_key(metric: str, k: int) -> str:
    """The `head_scores` key a `SELECTION_METRICS` name selects on."""
    if metric not in SELECTION_METRICS:
        raise ValueError(f"valid selection metric: expected one of {SELECTION_METRICS}, got {metric!r}")
    return f"{metric}@{k}"


def recall_at_k(rec_lm: Any, sample: ValidSample, k: int = 10, beam_width: int = 20, batch_size: int = 64) -> float:
    """Share of sampled users whose held-out item is among the model's constrained top-`k`."""
    return float(hits_at_k(rec_lm, sample, k, beam_width, batch_size).mean())


def sign_test_p(better: np.ndarray, base: np.ndarray) -> float:
    """One-sided exact sign test that `better` scores higher than `base` on the same users: P(X >= b) for
    X ~ Binomial(b + c, 1/2), b / c the users whose score is higher / lower under `better` (for hits: the
    users only `better` / only `base` hits, McNemar's). Scores are per-user hits (bool) or per-user NDCG /
    MRR; ties do not count. 1.0 when no user differs."""
    better, base = np.asarray(better), np.asarray(base)
    if better.shape != base.shape:
        raise ValueError(f"sign test: score vectors of different shapes {better.shape} and {base.shape}")
    better, base = better.astype(np.float64), base.astype(np.float64)  # bool hits: True > False, as before
    b, c = int((better > base).sum()), int((base > better).sum())
    n = b + c
    return 1.0 if n == 0 else float(sum(math.comb(n, i) for i in range(b, n + 1)) / 2**n)


def confirm_half(n: int, seed: int) -> np.ndarray:
    """bool[n]: the confirm half of a valid sample (seeded; the other half selects). Choosing the best of
    several checkpoints on the same users overstates its score; its score on users it was not chosen on
    does not. The halves differ in size by at most one."""
    mask = np.zeros(int(n), dtype=bool)
    mask[np.random.default_rng([int(seed), 1]).permutation(int(n))[: int(n) // 2]] = True
    return mask
