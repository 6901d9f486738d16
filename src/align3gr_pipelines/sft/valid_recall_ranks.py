"""SFT's valid-recall model selection in one process and in each torchrun rank (issue 27 item 3).

The scorer decodes a fixed sample of valid users with the constrained decoder (`evaluation.valid_recall`).
Inside a torchrun job every rank decodes only its share of those users and the ranks add up their integer
hit counts with an all-reduce, so every rank holds the same recall — early stopping and best-checkpoint
selection must agree across ranks — and that recall is the one a single process computes on the same model.
A rank's share is whole decode batches of one process, dealt round-robin (`lm.sharded_decoding.rank_rows`),
not a contiguous block of users (`shard_indices`): each batch then has one process's prompts, padding and
shapes, so its lists are bit for bit one process's (same device, dtype and threads) and the summed hits are
exactly one process's, where other batches could flip a near-tie at the top-k boundary by float rounding.

A job carries the sample as plain lists (`valid_recall_spec`): torchrun ranks load ``data.pt`` with
``weights_only``, which takes no DataFrame, and each rank rebuilds the catalogue with the init tokenizer.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from align3gr_pipelines.evaluation import valid_recall
from align3gr_pipelines.evaluation.valid_recall import ValidSample
from align3gr_pipelines.lm.sharded_decoding import rank_rows

Score = Callable[[Any], "float | tuple[float, float]"]


def valid_recall_spec(rows: pd.DataFrame, item_scids: pd.DataFrame, selection: dict[str, Any], seed: int) -> dict[str, Any]:
    """What a torchrun rank needs to score: the sampled rows (from `sample_valid_prompts`), the catalogue
    (item id and SCID tokens), the decoding settings and whether (and with which seed) to split confirm_half."""
    for col in ("id", "tokens"):
        if col not in item_scids.columns:
            raise ValueError(f"sft_train valid recall: 'item_scids' lacks column {col!r}; it has {list(item_scids.columns)}")
    return {
        "rows": {"prompt": [str(p) for p in rows["prompt"]], "target": rows["target"].astype(str).tolist()},
        "items": {"id": [str(i) for i in item_scids["id"]], "tokens": [str(t) for t in item_scids["tokens"]]},
        "k": int(selection["k"]), "beam_width": int(selection["beam_width"]), "batch_size": int(selection["batch_size"]),
        "confirm_half": bool(selection.get("confirm_half")), "seed": int(seed),
    }


def scorer_from_spec(spec: dict[str, Any], tokenizer: Any) -> Score:
    """The scorer of `valid_recall_spec`'s sample, the catalogue rebuilt with this process's tokenizer."""
    sample = valid_recall.build_valid_sample(pd.DataFrame(spec["rows"]), pd.DataFrame(spec["items"]), tokenizer)
    confirm = valid_recall.confirm_half(len(sample), spec["seed"]) if spec["confirm_half"] else None
    return sharded_recall_scorer(tokenizer, sample, confirm, spec["k"], spec["beam_width"], spec["batch_size"])


def _rank_and_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sharded_recall_scorer(tokenizer: Any, sample: ValidSample, confirm: np.ndarray | None, k: int, beam_width: int,
                          batch_size: int) -> Score:
    """model -> Recall@k over `sample` (with `confirm`: (select-half, confirm-half) recall). Outside a process
    group it decodes every user; inside one, this rank's batches only, then sums the hit counts over the
    ranks. Every rank of the group must call it (the all-reduce is a collective)."""
    if confirm is not None and len(confirm) != len(sample):
        raise ValueError(f"sft_train valid recall: confirm mask of {len(confirm)} users for a sample of {len(sample)}")
    shares: dict[tuple[int, int], np.ndarray] = {}  # the same users at every evaluation: tokenize once

    def share(rank: int, world: int) -> np.ndarray:
        if (rank, world) not in shares:
            shares[rank, world] = np.asarray(rank_rows(tokenizer, sample.prompts, batch_size, rank, world), dtype=np.int64)
        return shares[rank, world]

    def score(model: Any) -> float | tuple[float, float]:
        rec_lm = SimpleNamespace(model=model, tokenizer=tokenizer)
        rank, world = _rank_and_world()
        if world == 1:  # the single-process computation, unchanged
            hits = valid_recall.hits_at_k(rec_lm, sample, k, beam_width, batch_size)
            return float(hits.mean()) if confirm is None else (float(hits[~confirm].mean()), float(hits[confirm].mean()))
        block = share(rank, world)
        hits = np.zeros(0, dtype=bool)
        if len(block):  # a rank has no user when there are fewer decode batches than ranks
            mine = ValidSample(prompts=[sample.prompts[i] for i in block], target_index=sample.target_index[block],
                               catalog=sample.catalog)
            hits = valid_recall.hits_at_k(rec_lm, mine, k, beam_width, batch_size)
        in_confirm = confirm[block] if confirm is not None else np.zeros(len(block), dtype=bool)
        counts = [int(hits[~in_confirm].sum()), int((~in_confirm).sum()), int(hits[in_confirm].sum()), int(in_confirm.sum())]
        # NCCL reduces CUDA tensors only (a rank's model sits on its own GPU); gloo CPU ones.
        nccl = "nccl" in str(torch.distributed.get_backend())
        device = next(model.parameters()).device if nccl else torch.device("cpu")
        total = torch.tensor(counts, dtype=torch.int64, device=device)
        torch.distributed.all_reduce(total, op=torch.distributed.ReduceOp.SUM)
        select_hits, select_n, confirm_hits, confirm_n = total.tolist()
        select = select_hits / select_n if select_n else float("nan")  # == numpy's mean of the bool hits
        if confirm is None:
            return select
        return select, confirm_hits / confirm_n if confirm_n else float("nan")

    return score
