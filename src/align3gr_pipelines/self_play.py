"""Self-play negatives for Softmax-DPO, bucketed by how long a SCID prefix they share with the chosen item.

The current policy decodes its own top candidates for a training prompt with the constrained beam
search; every candidate that is not the ground-truth next item is a negative the policy itself finds
plausible. Its difficulty is its *overlap* with the chosen item: the length of the SCID prefix they
share, 0 … L−1 for L-level SCIDs (L would be the item itself, which is never a negative). A longer
shared prefix means a semantically and collaboratively closer item, so a harder negative.

The bucket rule, for S curriculum stages (easy = 0 … hard = S−1) and L levels:

- easy (stage 0) takes overlap 0: a different first code.
- The remaining overlaps 1 … L−1 are split into S−1 contiguous, increasing ranges of near-equal size
  (earlier ranges take the remainder): stage s ≥ 1 takes the overlaps o ≥ 1 with
  ``1 + floor((o − 1)·(S − 1) / (L − 1)) == s``.
  With the default 3 stages and 3 levels: easy = {0}, medium = {1}, hard = {2}; with 4 levels:
  easy = {0}, medium = {1, 2}, hard = {3}.
- With fewer nonzero overlaps than stages (L − 1 < S − 1, e.g. 2-level SCIDs), stage s ≥ 1 takes the
  single overlap ``1 + floor((s − 1)·(L − 1)/(S − 1))``, so later stages share the deepest overlap;
  with 1-level SCIDs every stage takes overlap 0, the only one there is.

When the policy's candidates hold fewer than N negatives of a stage's range, the rest are drawn
uniformly from catalogue items whose overlap lies in that range ("filled", counted per pair); when even
the catalogue has too few, the pair keeps fewer negatives, and a prompt with none is dropped (counted).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from align3gr_pipelines.rec_lm import RecLM, encode_prompt


def shared_prefix_length(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Length of the common prefix of SCID code rows (broadcasting over leading dims; last dim = levels)."""
    eq = torch.as_tensor(a) == torch.as_tensor(b)
    return eq.long().cumprod(dim=-1).sum(dim=-1)


def overlap_range(stage: int, n_stages: int, n_levels: int) -> tuple[int, int]:
    """Inclusive (lo, hi) range of shared-prefix lengths that curriculum stage ``stage`` draws from."""
    if n_stages < 1 or n_levels < 1 or not 0 <= stage < n_stages:
        raise ValueError(f"overlap_range: need 0 <= stage < n_stages and n_levels >= 1, got {stage}, {n_stages}, {n_levels}")
    k, m = n_levels - 1, n_stages - 1  # nonzero overlaps, stages after easy
    if stage == 0 or k == 0:
        return (0, 0)
    if k < m:
        o = 1 + (stage - 1) * k // m
        return (o, o)
    members = [o for o in range(1, k + 1) if 1 + (o - 1) * m // k == stage]
    return (members[0], members[-1])


@dataclass(frozen=True)
class Quota:
    lo: int
    hi: int
    n: int


def curriculum_quotas(stage: int, n_stages: int, n_levels: int, n_negatives: int) -> list[Quota]:
    lo, hi = overlap_range(stage, n_stages, n_levels)
    return [Quota(lo, hi, n_negatives)]


def mixed_quotas(n_stages: int, n_levels: int, n_negatives: int) -> list[Quota]:
    """Self-play without the curriculum: all buckets in one stage, N split as evenly as possible."""
    ranges = list(dict.fromkeys(overlap_range(s, n_stages, n_levels) for s in range(n_stages)))
    base, extra = divmod(n_negatives, len(ranges))
    return [Quota(lo, hi, base + (i < extra)) for i, (lo, hi) in enumerate(ranges) if base + (i < extra) > 0]


def select_negatives(
    chosen: int,
    candidates: Sequence[int],
    codes: torch.Tensor,
    quotas: Sequence[Quota],
    rng: np.random.Generator,
) -> tuple[list[int], list[int], int]:
    """Negatives for one prompt: per quota, the policy's candidates (in rank order) whose overlap with the
    chosen item lies in the quota's range, then uniform catalogue items of that range to fill.

    Returns (item indices, their overlaps, how many came from the catalogue fill). Never the chosen item,
    never twice the same item.
    """
    overlap_all = shared_prefix_length(codes, codes[chosen]).numpy()
    overlap_all[chosen] = codes.shape[1]  # the item itself: outside every range
    taken: set[int] = {chosen}
    rejected: list[int] = []
    n_filled = 0
    for q in quotas:
        got = []
        for c in candidates:
            c = int(c)
            if c < 0 or c in taken or not q.lo <= overlap_all[c] <= q.hi:
                continue
            got.append(c)
            taken.add(c)
            if len(got) == q.n:
                break
        if len(got) < q.n:
            pool = np.flatnonzero((overlap_all >= q.lo) & (overlap_all <= q.hi))
            pool = np.array([i for i in pool if i not in taken], dtype=np.int64)
            fill = rng.choice(pool, size=min(q.n - len(got), len(pool)), replace=False) if len(pool) else []
            got.extend(int(i) for i in fill)
            taken.update(int(i) for i in fill)
            n_filled += len(fill)
        rejected.extend(got)
    return rejected, [int(overlap_all[i]) for i in rejected], n_filled


def random_negatives(chosen: int, n_items: int, n: int, rng: np.random.Generator) -> list[int]:
    """Plain Softmax-DPO ablation: N uniform catalogue items other than the chosen one."""
    pool = np.delete(np.arange(n_items), chosen)
    return [int(i) for i in rng.choice(pool, size=min(n, len(pool)), replace=False)]


def item_code_table(item_scids: pd.DataFrame) -> tuple[list[str], torch.Tensor, list[str]]:
    """(item ids, codes LongTensor[n_items, L], token strings) from the `item_scids` table."""
    for col in ("id", "codes", "tokens"):
        if col not in item_scids.columns:
            raise ValueError(f"item_scids: missing column {col!r} (columns: {list(item_scids.columns)})")
    if len(item_scids) == 0:
        raise ValueError("item_scids: the table is empty")
    lengths = {len(c) for c in item_scids["codes"]}
    if len(lengths) != 1:
        raise ValueError(f"item_scids.codes: every item needs the same number of levels, got lengths {sorted(lengths)}")
    ids = [str(i) for i in item_scids["id"]]
    if len(set(ids)) != len(ids):
        raise ValueError("item_scids.id: duplicate item ids")
    codes = torch.tensor(np.stack([np.asarray(c, dtype=np.int64) for c in item_scids["codes"]]))
    return ids, codes, [str(t) for t in item_scids["tokens"]]


def decode_candidates(
    policy: RecLM, prompts: Sequence[str], item_scids: pd.DataFrame, item_ids: Sequence[str], beam_width: int, top_k: int,
    batch_size: int, show_progress: bool = True,
) -> np.ndarray:
    """The policy's top-k catalogue items per prompt (constrained beam search), as indices into ``item_ids``
    (-1 where fewer exist)."""
    from align3gr_pipelines.constrained_decoding import SCIDCatalog, constrained_beam_search

    tok = policy.tokenizer
    catalog = SCIDCatalog.from_scids(item_scids, tok)
    position = {iid: i for i, iid in enumerate(item_ids)}
    to_ours = torch.tensor([position[str(i)] for i in catalog.item_ids] + [-1])
    ids = [encode_prompt(tok, p) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    idx, _ = constrained_beam_search(
        policy.model, ids, catalog, beam_width=beam_width, top_k=top_k, batch_size=batch_size, pad_token_id=pad,
        show_progress=show_progress,
    )
    return to_ours[idx].numpy()  # index -1 maps to the appended -1


def build_pairs(
    prompts: pd.DataFrame,
    item_ids: Sequence[str],
    codes: torch.Tensor,
    tokens: Sequence[str],
    candidates: np.ndarray | None,
    quotas: Sequence[Quota] | None,
    n_random: int,
    rng: np.random.Generator,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Preference pairs from prompts (prompt, user_id, target_item_id) and, per prompt, the policy's
    ranked candidates. ``quotas=None`` means random negatives (``n_random`` per prompt)."""
    position = {iid: i for i, iid in enumerate(item_ids)}
    rows = []
    n_dropped = 0
    n_generated_total = 0
    for r, row in enumerate(prompts.itertuples(index=False)):
        chosen = position[str(row.target_item_id)]
        if quotas is None:
            rejected = random_negatives(chosen, len(item_ids), n_random, rng)
            overlaps = shared_prefix_length(codes[rejected], codes[chosen]).tolist() if rejected else []
            filled = 0
        else:
            rejected, overlaps, filled = select_negatives(chosen, candidates[r], codes, quotas, rng)
        if not rejected:
            n_dropped += 1
            continue
        n_generated_total += len(rejected) - filled
        rows.append(
            {
                "prompt": row.prompt,
                "user_id": str(row.user_id),
                "chosen": item_ids[chosen],
                "chosen_tokens": tokens[chosen],
                "rejected": [item_ids[i] for i in rejected],
                "rejected_tokens": [tokens[i] for i in rejected],
                "overlap": [int(o) for o in overlaps],
                "n_generated": len(rejected) - filled,
                "filled": int(filled),
            }
        )
    pairs = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    n_rej = pairs["rejected"].map(len) if len(pairs) else pd.Series(dtype=float)
    stats = {
        "n_prompts": float(len(prompts)),
        "n_pairs": float(len(pairs)),
        "n_dropped_no_negative": float(n_dropped),
        "mean_rejected_per_pair": float(n_rej.mean()) if len(pairs) else 0.0,
        "n_rejected_generated": float(n_generated_total),
        "n_rejected_filled": float(pairs["filled"].sum()) if len(pairs) else 0.0,
        "pairs_with_fill_fraction": float((pairs["filled"] > 0).mean()) if len(pairs) else 0.0,
    }
    total = stats["n_rejected_generated"] + stats["n_rejected_filled"]
    stats["filled_fraction"] = stats["n_rejected_filled"] / total if total else 0.0
    return pairs, stats


PAIR_COLUMNS = ["prompt", "user_id", "chosen", "chosen_tokens", "rejected", "rejected_tokens", "overlap", "n_generated", "filled"]


def empty_pairs() -> pd.DataFrame:
    import pyarrow as pa

    schema = pa.schema(
        [("prompt", pa.string()), ("user_id", pa.string()), ("chosen", pa.string()), ("chosen_tokens", pa.string()),
         ("rejected", pa.list_(pa.string())), ("rejected_tokens", pa.list_(pa.string())), ("overlap", pa.list_(pa.int64())),
         ("n_generated", pa.int64()), ("filled", pa.int64())]
    )
    return schema.empty_table().to_pandas()


def overlap_histogram(pairs: pd.DataFrame, n_levels: int) -> dict[str, float]:
    counts = np.bincount(np.concatenate([np.asarray(o, dtype=np.int64) for o in pairs["overlap"]]) if len(pairs) else np.zeros(0, dtype=np.int64), minlength=n_levels)
    return {f"rejected_overlap_{o}": float(c) for o, c in enumerate(counts)}


def sample_prompts(sft_examples: pd.DataFrame, item_ids: Sequence[str], seed: int) -> tuple[pd.DataFrame, dict[str, Any]]:
    """SEQ training prompts (task == "seq", split == "train") whose target is in the catalogue, shuffled."""
    for col in ("task", "split", "prompt", "user_id", "target_item_id"):
        if col not in sft_examples.columns:
            raise ValueError(f"sft_examples: missing column {col!r} (columns: {list(sft_examples.columns)})")
    seq = sft_examples[(sft_examples["task"] == "seq") & (sft_examples["split"] == "train")]
    seq = seq[seq["target_item_id"].notna()]
    known = set(map(str, item_ids))
    ok = seq["target_item_id"].astype(str).isin(known)
    if len(seq) == 0:
        raise ValueError("sft_examples: no SEQ training rows (task == 'seq', split == 'train') with a target_item_id")
    seq = seq[ok]
    if len(seq) == 0:
        raise ValueError("sft_examples: no SEQ training row has a target_item_id present in item_scids")
    order = np.random.default_rng(seed).permutation(len(seq))
    return seq.iloc[order][["prompt", "user_id", "target_item_id"]].reset_index(drop=True), {"unknown_targets": int((~ok).sum())}
