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

Mining beyond the paper's beam (parameters `sp_dpo_curriculum.mining`), because with ~10k items over
256 × 256 prefixes a width-20 beam rarely shares a prefix with the target and the medium/hard buckets end
up almost entirely filled at random from the catalogue (no longer self-play):

- ``candidates: scored`` — the stage's bucket members (at most ``max_scored`` per prompt, a seeded sample
  beyond that, plus the beam's own candidates) are scored exactly by the policy (sequence log-probability,
  `constrained_decoding.item_logprobs`) and the N it rates highest are the negatives. Every negative is then
  ranked by the policy itself; only a bucket with fewer than N members leaves a pair short.
- ``bucket_by: similarity`` — the paper's alternative difficulty: cosine similarity of the items' SCID
  embeddings (the policy's input embeddings of the SCID tokens, concatenated over levels) to the chosen
  item's, stage s taking the catalogue items whose similarity rank falls in ``similarity_bands[s]``
  (quantiles: easy = least similar ... hard = most similar). Unlike shared prefixes, every band has
  members for every item.

``filled`` counts the negatives drawn uniformly from the catalogue (not ranked by the policy); the stage's
``filled_fraction`` is the share reported per stage (the issue's target: below 30%).

On-policy, reachable pairs (``mining.pairs: reachable``, issue 25; the paper and the default: ``bucketed``,
everything above). The policy decodes each candidate prompt's constrained beam (``reachable_beam_width``); a
prompt qualifies only when its target (the chosen item) is in that beam, i.e. the policy can already reach
it, and its rejected items are the beam's items ranked above the target (rank order), then the rest of the
beam (rank order), up to N: never the target, never a known later positive of the user with
``exclude_later_positives`` (`reachable_negatives`). Pushing the target above what the policy ranks over it
is the head-of-list change NDCG / MRR / HR@1 measure. Prefix buckets and fills do not apply.

Curriculum with reachable pairs: the stages split the qualifying prompts by the target's beam rank
(``reachable_rank_bands``, 1-based, inclusive; default easy = rank 1, medium = 2-5, hard = 6-20). Difficulty
here is how many items the policy prefers to the target: none at rank 1 (the pair only widens a margin the
policy already has), many deep in the beam. Each stage decodes the whole candidate pool of the one-stage modes
(3 x prompts_per_stage prompts, so the three bands see every reachable prompt) with its own input policy and
keeps at most prompts_per_stage prompts of its band. The other reading, the stage buckets as an order of the
rejected items, was not taken: with a beam of 20 and N = 20 every beam item is rejected in every stage, so
the buckets would change nothing. On-policy means a prompt can move between bands as the policy changes, so
the stages' prompts need not be disjoint.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from align3gr_pipelines.lm.rec_lm import RecLM, encode_prompt


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


def scored_negatives(
    chosen: int, ranked: Sequence[int], member: np.ndarray, n: int, rng: np.random.Generator, fill: bool = True
) -> tuple[list[int], int]:
    """Negatives from candidates ranked by the policy's exact score (best first): the first ``n`` that are
    bucket members (``member`` bool[n_items]) and not the chosen item; topped up uniformly from the other
    members when ``fill`` (counted). Returns (item indices, how many came from the fill)."""
    got: list[int] = []
    taken = {chosen}
    for c in ranked:
        c = int(c)
        if c >= 0 and c not in taken and member[c]:
            got.append(c)
            taken.add(c)
            if len(got) == n:
                return got, 0
    if not fill:
        return got, 0
    pool = np.array([i for i in np.flatnonzero(member) if i not in taken], dtype=np.int64)
    extra = [int(i) for i in rng.choice(pool, size=min(n - len(got), len(pool)), replace=False)] if len(pool) else []
    return got + extra, len(extra)


def similarity_ranks(embeddings: torch.Tensor, chosen: int) -> np.ndarray:
    """Quantile (0 = least, 1 = most similar) of every item's cosine similarity to the chosen item's
    embedding, among the other items; the chosen item itself gets 2.0 (outside every band)."""
    e = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    sim = (e @ e[chosen]).numpy()
    sim[chosen] = -np.inf
    order = np.argsort(sim, kind="stable")
    q = np.empty(len(sim))
    q[order] = np.arange(len(sim)) / max(len(sim) - 2, 1)
    q[chosen] = 2.0
    return q


def scid_embeddings(policy: RecLM, tokens: Sequence[str]) -> torch.Tensor:
    """[n_items, L·d]: the policy's input embeddings of each item's SCID tokens, concatenated over levels."""
    tok = policy.tokenizer
    ids = [tok.convert_tokens_to_ids(_scid_tokens(t)) for t in tokens]
    with torch.no_grad():
        table = policy.model.get_input_embeddings().weight.detach().cpu()
        return torch.stack([table[torch.tensor(i)].reshape(-1) for i in ids])


def _scid_tokens(tokens: str) -> list[str]:
    import re

    return re.findall(r"<[^<>]+>", tokens)


def bucket_members(
    stage_range: tuple[float, float], chosen: int, codes: torch.Tensor, by: str, embeddings: torch.Tensor | None
) -> np.ndarray:
    """bool[n_items]: the catalogue items in the stage's bucket for this chosen item (never itself)."""
    if by == "prefix":
        ov = shared_prefix_length(codes, codes[chosen]).numpy()
        ov[chosen] = codes.shape[1]
        member = (ov >= stage_range[0]) & (ov <= stage_range[1])
    else:
        q = similarity_ranks(embeddings, chosen)
        lo, hi = stage_range
        member = (q >= lo) & ((q < hi) | (hi >= 1.0)) & (q <= 1.0)
    member[chosen] = False
    return member


def score_candidates(
    policy: RecLM, prompts: Sequence[str], item_scids: pd.DataFrame, item_ids: Sequence[str], candidates: np.ndarray,
    batch_size: int, show_progress: bool = True,
) -> np.ndarray:
    """Candidates (indices into ``item_ids``, -1 = none) re-ordered per prompt by the policy's exact sequence
    log-probability, best first (-1 last)."""
    from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, item_logprobs

    tok = policy.tokenizer
    catalog = SCIDCatalog.from_scids(item_scids, tok)
    theirs = {iid: i for i, iid in enumerate(catalog.item_ids)}
    to_theirs = np.array([theirs[str(i)] for i in item_ids] + [-1])
    cand = torch.as_tensor(to_theirs[candidates])  # -1 stays -1
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lp = item_logprobs(
        policy.model, [encode_prompt(tok, p) for p in prompts], catalog, cand, batch_size=batch_size, pad_token_id=pad,
        show_progress=show_progress,
    )
    order = torch.argsort(lp, dim=1, descending=True, stable=True).numpy()
    return np.take_along_axis(candidates, order, axis=1)


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
    batch_size: int, show_progress: bool = True, nproc: int = 1, timeout_s: float | None = None,
    where: str = "sp_dpo_curriculum.decoding",
) -> np.ndarray:
    """The policy's top-k catalogue items per prompt (constrained beam search), as indices into ``item_ids``
    (-1 where fewer exist). ``nproc`` > 1: on that many torchrun ranks (`lm.sharded_decoding`, the same lists),
    ended after ``timeout_s``; ``where`` is the parameter block its errors name."""
    from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog
    from align3gr_pipelines.lm.sharded_decoding import decode_prompts_sharded

    catalog = SCIDCatalog.from_scids(item_scids, policy.tokenizer)
    position = {iid: i for i, iid in enumerate(item_ids)}
    to_ours = torch.tensor([position[str(i)] for i in catalog.item_ids] + [-1])
    # nproc 1 is decode_prompts: the prompts' ids and pad id exactly as this function built them before.
    idx, _ = decode_prompts_sharded(
        policy, list(prompts), catalog, nproc=nproc, timeout_s=timeout_s, where=where, beam_width=beam_width,
        top_k=top_k, batch_size=batch_size, show_progress=show_progress,
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


# ---------------------------------------------------------------- mining (beam or exact scoring, prefix or similarity buckets)

MINING_CANDIDATES = ("beam", "scored")
BUCKET_BY = ("prefix", "similarity")
PAIR_SOURCES = ("bucketed", "reachable")


@dataclass(frozen=True)
class Mining:
    """`sp_dpo_curriculum.mining` (module docstring). The paper: candidates beam, bucket_by prefix."""

    candidates: str = "beam"
    bucket_by: str = "prefix"
    max_scored: int = 128  # bucket members scored exactly per prompt and bucket (a seeded sample beyond)
    similarity_bands: tuple[tuple[float, float], ...] = ((0.0, 0.9), (0.9, 0.99), (0.99, 1.0))
    score_batch_size: int = 16
    # Never reject an item the prompt's user consumes later in training: such a negative is a known future
    # positive, and pushing it down pushes down held-out-like targets. The paper does not filter (False).
    exclude_later_positives: bool = False
    # bucketed (the paper): the settings above. reachable: on-policy pairs from the policy's own beam of
    # reachable_beam_width, curriculum stages by the target's beam rank (module docstring).
    pairs: str = "bucketed"
    reachable_beam_width: int = 20
    reachable_rank_bands: tuple[tuple[int, int], ...] = ((1, 1), (2, 5), (6, 20))

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, n_stages: int) -> "Mining":
        p = dict(params or {})
        known = {"candidates", "bucket_by", "max_scored", "similarity_bands", "score_batch_size", "exclude_later_positives",
                 "pairs", "reachable_beam_width", "reachable_rank_bands"}
        if set(p) - known:
            raise ValueError(f"parameters sp_dpo_curriculum.mining: unknown key(s) {sorted(set(p) - known)}; expected some of {sorted(known)}")
        if "similarity_bands" in p:
            p["similarity_bands"] = tuple(tuple(float(x) for x in b) for b in p["similarity_bands"])
        if "reachable_rank_bands" in p:
            p["reachable_rank_bands"] = tuple(tuple(b) for b in p["reachable_rank_bands"])
        m = cls(**p)
        if m.pairs not in PAIR_SOURCES:
            raise ValueError(f"parameters sp_dpo_curriculum.mining.pairs: expected one of {PAIR_SOURCES}, got {m.pairs!r}")
        if isinstance(m.reachable_beam_width, bool) or not isinstance(m.reachable_beam_width, int) or m.reachable_beam_width < 1:
            raise ValueError(f"parameters sp_dpo_curriculum.mining.reachable_beam_width: expected an integer >= 1, got {m.reachable_beam_width!r}")
        rb = m.reachable_rank_bands
        if len(rb) != n_stages or any(len(b) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in b)
                                      or not 1 <= b[0] <= b[1] for b in rb):
            raise ValueError(
                f"parameters sp_dpo_curriculum.mining.reachable_rank_bands: expected {n_stages} [lo, hi] bands of 1-based "
                f"beam ranks with 1 <= lo <= hi (easy, medium, hard), got {rb}"
            )
        if not isinstance(m.exclude_later_positives, bool):
            raise ValueError("parameters sp_dpo_curriculum.mining.exclude_later_positives: expected true or false, "
                             f"got {m.exclude_later_positives!r}")
        if m.candidates not in MINING_CANDIDATES:
            raise ValueError(f"parameters sp_dpo_curriculum.mining.candidates: expected one of {MINING_CANDIDATES}, got {m.candidates!r}")
        if m.bucket_by not in BUCKET_BY:
            raise ValueError(f"parameters sp_dpo_curriculum.mining.bucket_by: expected one of {BUCKET_BY}, got {m.bucket_by!r}")
        if m.max_scored < 1 or m.score_batch_size < 1:
            raise ValueError("parameters sp_dpo_curriculum.mining: max_scored and score_batch_size must be >= 1")
        bands = m.similarity_bands
        if len(bands) != n_stages or any(not 0.0 <= lo < hi <= 1.0 for lo, hi in bands):
            raise ValueError(
                f"parameters sp_dpo_curriculum.mining.similarity_bands: expected {n_stages} [lo, hi] quantile bands "
                f"with 0 <= lo < hi <= 1, got {bands}"
            )
        return m


def stage_buckets(mode_quotas: Sequence[Quota] | None, stage: int | None, n_stages: int, n_negatives: int, mining: Mining) -> list[tuple[tuple[float, float], int]]:
    """(range, n) per bucket a stage draws from: its overlap range(s) or, by similarity, its band(s).
    ``stage=None`` = every bucket mixed (no curriculum), N split as in `mixed_quotas`."""
    if mining.bucket_by == "prefix":
        return [((q.lo, q.hi), q.n) for q in mode_quotas or []]
    if stage is not None:
        return [(mining.similarity_bands[stage], n_negatives)]
    base, extra = divmod(n_negatives, n_stages)
    return [(b, base + (i < extra)) for i, b in enumerate(mining.similarity_bands) if base + (i < extra) > 0]


def mine_pairs(
    policy: RecLM,
    prompts: pd.DataFrame,
    item_scids: pd.DataFrame,
    item_ids: Sequence[str],
    codes: torch.Tensor,
    tokens: Sequence[str],
    beam: np.ndarray,
    buckets: Sequence[tuple[tuple[float, float], int]],
    mining: Mining,
    rng: np.random.Generator,
    show_progress: bool = True,
    later: Sequence[np.ndarray] | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Self-play pairs of one stage: per prompt and bucket, the policy's best-ranked bucket members
    (beam order, or exact scores over beam ∪ a sample of the bucket), topped up from the catalogue in
    beam mode. Same columns as `build_pairs`; stats add ``filled_fraction`` and ``beam_fraction``.
    ``later`` (per prompt, the catalogue indices its user consumes later in training; `later_positives`)
    is counted among the rejected items, and never rejected when ``mining.exclude_later_positives``."""
    position = {iid: i for i, iid in enumerate(item_ids)}
    chosen_idx = [position[str(t)] for t in prompts["target_item_id"]]
    emb = scid_embeddings(policy, tokens) if mining.bucket_by == "similarity" else None
    members = [[bucket_members(rng_, c, codes, mining.bucket_by, emb) for rng_, _ in buckets] for c in chosen_idx]
    ranked = beam
    if mining.candidates == "scored":
        width = beam.shape[1] + mining.max_scored * len(buckets)
        cand = np.full((len(prompts), width), -1, dtype=np.int64)
        for r, per_bucket in enumerate(members):
            row = [int(i) for i in beam[r] if i >= 0]
            for m in per_bucket:
                pool = np.setdiff1d(np.flatnonzero(m), row)
                row += [int(i) for i in (rng.choice(pool, mining.max_scored, replace=False) if len(pool) > mining.max_scored else pool)]
            cand[r, : len(row)] = row
        ranked = score_candidates(policy, prompts["prompt"].tolist(), item_scids, item_ids, cand, mining.score_batch_size, show_progress)
    rows, n_dropped, n_later_rejected, n_later_excluded = [], 0, 0, 0
    for r, row in enumerate(prompts.itertuples(index=False)):
        chosen, rejected, filled = chosen_idx[r], [], 0
        mine_later = later[r] if later is not None else np.empty(0, dtype=np.int64)
        if mining.exclude_later_positives and len(mine_later):
            # what the policy ranked (beam or exact scores) that the filter keeps out
            n_later_excluded += int(np.isin(ranked[r], mine_later).sum())
        for (_, n), m in zip(buckets, members[r]):
            m = m.copy()
            m[rejected] = False
            if mining.exclude_later_positives:
                m[mine_later] = False
            got, f = scored_negatives(chosen, ranked[r], m, n, rng, fill=mining.candidates == "beam")
            rejected += got
            filled += f
        if not rejected:
            n_dropped += 1
            continue
        n_later_rejected += int(np.isin(rejected, mine_later).sum())
        in_beam = set(int(i) for i in beam[r])
        rows.append(
            {
                "prompt": row.prompt, "user_id": str(row.user_id), "chosen": item_ids[chosen], "chosen_tokens": tokens[chosen],
                "rejected": [item_ids[i] for i in rejected], "rejected_tokens": [tokens[i] for i in rejected],
                "overlap": shared_prefix_length(codes[rejected], codes[chosen]).tolist(),
                "n_generated": len(rejected) - filled, "filled": int(filled), "_in_beam": sum(i in in_beam for i in rejected),
            }
        )
    pairs = pd.DataFrame(rows, columns=PAIR_COLUMNS + ["_in_beam"])
    n_rej = int(pairs["rejected"].map(len).sum()) if len(pairs) else 0
    stats = {
        "n_prompts": float(len(prompts)),
        "n_pairs": float(len(pairs)),
        "n_dropped_no_negative": float(n_dropped),
        "mean_rejected_per_pair": n_rej / len(pairs) if len(pairs) else 0.0,
        "n_rejected_generated": float(pairs["n_generated"].sum()) if len(pairs) else 0.0,
        "n_rejected_filled": float(pairs["filled"].sum()) if len(pairs) else 0.0,
        "pairs_with_fill_fraction": float((pairs["filled"] > 0).mean()) if len(pairs) else 0.0,
        "filled_fraction": float(pairs["filled"].sum()) / n_rej if n_rej else 0.0,
        # Negatives that were among the policy's own beam top-K (the rest: exact scores over the bucket).
        "beam_fraction": float(pairs["_in_beam"].sum()) / n_rej if n_rej else 0.0,
        # Rejected items the user consumes later in training (0 when they are excluded), and how many ranked
        # candidates the exclusion kept out; NaN without the user's training sequence.
        "n_rejected_later_positive": float(n_later_rejected) if later is not None else float("nan"),
        "later_positive_fraction": (n_later_rejected / n_rej if n_rej else 0.0) if later is not None else float("nan"),
        "n_later_positive_candidates_excluded": float(n_later_excluded) if later is not None else float("nan"),
    }
    return pairs[PAIR_COLUMNS].reset_index(drop=True), stats


def later_positives(train_sequences: pd.DataFrame, prompts: pd.DataFrame, item_ids: Sequence[str]) -> list[np.ndarray]:
    """Per prompt (user_id, target_item_id): the catalogue indices of the items that user consumes after that
    target in training (train_sequences' targets at a later position); empty when the transition is not a
    training one. Items outside the catalogue are left out. Order: `position`, else the history's length."""
    for col in ("user_id", "target"):
        if col not in train_sequences.columns:
            raise ValueError(f"train_sequences: missing column {col!r} (columns: {list(train_sequences.columns)})")
    if "position" not in train_sequences.columns and "history" not in train_sequences.columns:
        raise ValueError("train_sequences: needs a 'position' or a 'history' column to order a user's transitions")
    index = {str(i): k for k, i in enumerate(item_ids)}
    order = train_sequences["position"] if "position" in train_sequences.columns else train_sequences["history"].map(len)
    ordered = train_sequences.assign(_order=order).sort_values(["user_id", "_order"], kind="stable")
    per_user: dict[str, list[int]] = {}
    where: dict[tuple[str, str], int] = {}
    for u, t in zip(ordered["user_id"].astype(str), ordered["target"].astype(str)):
        seq = per_user.setdefault(u, [])
        where.setdefault((u, t), len(seq))  # a repeated item: its first consumption
        seq.append(index.get(t, -1))
    out = []
    for u, t in zip(prompts["user_id"].astype(str), prompts["target_item_id"].astype(str)):
        p = where.get((u, t))
        later = [] if p is None else [i for i in per_user[u][p + 1:] if i >= 0]
        out.append(np.unique(np.asarray(later, dtype=np.int64)))
    return out


def user_tokens_like_sft(sft_examples: pd.DataFrame, user_scids: pd.DataFrame, setting: Any = "auto") -> dict[str, str] | None:
    """User SCID per user when prompts should carry one: ``auto`` = exactly when the SFT SEQ prompts did."""
    import re

    inject = setting
    if inject == "auto":
        seq = sft_examples[(sft_examples["task"] == "seq") & (sft_examples["split"] == "train")]["prompt"]
        inject = bool(seq.astype(str).str.contains(re.compile(r"<u\d+_\d+>")).any())
    if not inject or user_scids is None or not len(user_scids):
        return None
    return dict(zip(user_scids["id"].astype(str), user_scids["tokens"].astype(str)))


def transition_prompts(
    train_sequences: pd.DataFrame,
    sft_examples: pd.DataFrame,
    item_ids: Sequence[str],
    tokens: Sequence[str],
    user_tokens: dict[str, str] | None,
    max_history: int,
    template_id: int,
    seed: int,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """SEQ prompts of training transitions that were *not* SEQ responses in SFT (SFT fits its own SEQ
    targets; DPO on them mostly re-teaches what the policy already ranks first), shuffled. Columns as
    `sample_prompts`. Falls back to nothing: an empty frame when every transition was an SFT target."""
    for col in ("user_id", "history", "target"):
        if col not in train_sequences.columns:
            raise ValueError(f"train_sequences: missing column {col!r} (columns: {list(train_sequences.columns)})")
    seq = sft_examples[(sft_examples["task"] == "seq") & (sft_examples["split"] == "train")]
    used = set(zip(seq["user_id"].astype(str), seq["target_item_id"].astype(str)))
    tok = dict(zip(map(str, item_ids), tokens))
    rows = []
    n_sft = 0
    for u, hist, target in zip(train_sequences["user_id"].astype(str), train_sequences["history"], train_sequences["target"].astype(str)):
        prompt = _transition_prompt(u, hist, target, tok, user_tokens, max_history, template_id)
        if prompt is None:
            continue
        if (u, target) in used:
            n_sft += 1
            continue
        rows.append((prompt, u, target))
    out = pd.DataFrame(rows, columns=["prompt", "user_id", "target_item_id"])
    order = np.random.default_rng(seed).permutation(len(out))
    return out.iloc[order].reset_index(drop=True), {"transitions_that_were_sft_seq": n_sft, "unknown_targets": 0}


def _transition_prompt(
    user: str, history: Sequence[Any], target: str, tok: dict[str, str], user_tokens: dict[str, str] | None,
    max_history: int, template_id: int,
) -> str | None:
    """The SEQ prompt of one training transition (the last ``max_history`` items), or None when the history is
    empty or an item of it, or the target, has no SCID."""
    from align3gr_pipelines.sft.prompts import seq_prompt

    hist = [str(i) for i in history][-max_history:]
    if not hist or target not in tok or any(i not in tok for i in hist):
        return None
    return seq_prompt([tok[i] for i in hist], (user_tokens or {}).get(user), template_id)


def latest_transition_prompts(
    train_sequences: pd.DataFrame,
    item_ids: Sequence[str],
    tokens: Sequence[str],
    user_tokens: dict[str, str] | None,
    max_history: int,
    template_id: int,
    seed: int,
) -> pd.DataFrame:
    """Each user's latest training transition (the largest `position`, else the longest history) as a SEQ
    prompt, in a seeded order; columns as `sample_prompts`. The transition nearest the held-out items, and
    the one whose target no later training item competes with (issue 25)."""
    for col in ("user_id", "history", "target"):
        if col not in train_sequences.columns:
            raise ValueError(f"train_sequences: missing column {col!r} (columns: {list(train_sequences.columns)})")
    order = train_sequences["position"] if "position" in train_sequences.columns else train_sequences["history"].map(len)
    last = (train_sequences.assign(_order=order, _u=train_sequences["user_id"].astype(str))
            .sort_values(["_u", "_order"], kind="stable").drop_duplicates("_u", keep="last"))
    tok = dict(zip(map(str, item_ids), tokens))
    rows = []
    for u, hist, target in zip(last["_u"], last["history"], last["target"].astype(str)):
        prompt = _transition_prompt(u, hist, target, tok, user_tokens, max_history, template_id)
        if prompt is not None:
            rows.append((prompt, u, target))
    out = pd.DataFrame(rows, columns=["prompt", "user_id", "target_item_id"])
    return out.iloc[np.random.default_rng([seed, 25]).permutation(len(out))].reset_index(drop=True)


def prepend_prompts(first: pd.DataFrame, rest: pd.DataFrame) -> pd.DataFrame:
    """``first``, then the rows of ``rest`` whose (user_id, target_item_id) is not in ``first``: the stages
    take prompts from the top, so ``first`` is always considered."""
    seen = set(zip(first["user_id"].astype(str), first["target_item_id"].astype(str)))
    keep = [(str(u), str(t)) not in seen for u, t in zip(rest["user_id"], rest["target_item_id"])]
    cols = ["prompt", "user_id", "target_item_id"]
    return pd.concat([first[cols], rest.loc[keep, cols]], ignore_index=True)


# ---------------------------------------------------------------- on-policy, reachable pairs (module docstring)


def reachable_negatives(
    chosen: int, beam: Sequence[int], n: int, exclude: Sequence[int] | np.ndarray = ()
) -> tuple[int | None, list[int], int]:
    """On-policy negatives of one prompt from the policy's beam (catalogue indices, best first, -1 = none).

    Returns (the chosen item's 1-based beam rank, the rejected items, how many beam items ``exclude`` kept
    out); (None, [], 0) when the chosen item is not in the beam: the prompt does not qualify. Rejected = the
    items ranked above the chosen one, in rank order, then those below it, in rank order, at most ``n``;
    never the chosen item, never an item of ``exclude``, never twice the same item."""
    row = [int(i) for i in beam]
    if chosen not in row:
        return None, [], 0
    rank = row.index(chosen) + 1
    banned = {int(i) for i in exclude}
    rejected: list[int] = []
    n_excluded = 0
    for i in row[: rank - 1] + row[rank:]:  # above the target, then below it
        if i < 0 or i == chosen or i in rejected:
            continue
        if i in banned:
            n_excluded += 1
            continue
        if len(rejected) < n:
            rejected.append(i)
    return rank, rejected, n_excluded


def reachable_pairs(
    prompts: pd.DataFrame,
    item_ids: Sequence[str],
    codes: torch.Tensor,
    tokens: Sequence[str],
    beam: np.ndarray,
    n_negatives: int,
    later: Sequence[np.ndarray] | None = None,
    exclude_later_positives: bool = False,
    rank_band: tuple[int, int] | None = None,
    max_pairs: int | None = None,
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Reachable pairs of one stage from each prompt's decoded beam (`reachable_negatives`), in prompt order.
    ``rank_band`` (1-based, inclusive): only prompts whose target's beam rank lies in it qualify (a curriculum
    stage); ``max_pairs``: at most that many pairs. ``later`` as in `mine_pairs`. Same columns as `build_pairs`
    (``filled`` is always 0); stats count the prompts considered, reachable (target anywhere in the beam) and
    qualified, and the target's mean beam rank."""
    if beam.shape[0] != len(prompts):
        raise ValueError(f"reachable pairs: {beam.shape[0]} decoded beams for {len(prompts)} prompts")
    position = {iid: i for i, iid in enumerate(item_ids)}
    rows, ranks_reachable, ranks_used = [], [], []
    n_qualified = n_dropped = n_over_cap = n_later_rejected = n_later_excluded = n_above = 0
    for r, row in enumerate(prompts.itertuples(index=False)):
        chosen = position[str(row.target_item_id)]
        mine_later = later[r] if later is not None else np.empty(0, dtype=np.int64)
        rank, rejected, excluded = reachable_negatives(
            chosen, beam[r], n_negatives, mine_later if exclude_later_positives else ()
        )
        if rank is None:
            continue
        ranks_reachable.append(rank)
        if rank_band is not None and not rank_band[0] <= rank <= rank_band[1]:
            continue
        n_qualified += 1
        if not rejected:
            n_dropped += 1
            continue
        if max_pairs is not None and len(rows) >= max_pairs:
            n_over_cap += 1
            continue
        n_later_excluded += excluded
        n_later_rejected += int(np.isin(rejected, mine_later).sum())
        above = {int(x) for x in beam[r][: rank - 1]}
        n_above += sum(i in above for i in rejected)
        ranks_used.append(rank)
        rows.append(
            {
                "prompt": row.prompt, "user_id": str(row.user_id), "chosen": item_ids[chosen], "chosen_tokens": tokens[chosen],
                "rejected": [item_ids[i] for i in rejected], "rejected_tokens": [tokens[i] for i in rejected],
                "overlap": shared_prefix_length(codes[rejected], codes[chosen]).tolist(),
                "n_generated": len(rejected), "filled": 0,
            }
        )
    pairs = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    n_rej = int(pairs["rejected"].map(len).sum()) if len(pairs) else 0
    n = len(prompts)
    stats = {
        "n_prompts": float(n),
        "n_prompts_considered": float(n),
        # target anywhere in the beam / also in the stage's rank band (= reachable without a band)
        "n_prompts_reachable": float(len(ranks_reachable)),
        "reachable_share": len(ranks_reachable) / n if n else 0.0,
        "n_prompts_qualified": float(n_qualified),
        "qualified_share": n_qualified / n if n else 0.0,
        "n_prompts_over_cap": float(n_over_cap),
        "n_pairs": float(len(pairs)),
        "n_dropped_no_negative": float(n_dropped),
        # 1-based beam rank of the chosen item: over the pairs kept, and over every reachable prompt
        "mean_target_rank": float(np.mean(ranks_used)) if ranks_used else float("nan"),
        "mean_target_rank_reachable": float(np.mean(ranks_reachable)) if ranks_reachable else float("nan"),
        "n_rejected_above_target": float(n_above),
        "mean_rejected_per_pair": n_rej / len(pairs) if len(pairs) else 0.0,
        "n_rejected_generated": float(n_rej),
        "n_rejected_filled": 0.0,
        "pairs_with_fill_fraction": 0.0,
        "filled_fraction": 0.0,
        "beam_fraction": 1.0 if n_rej else 0.0,
        "n_rejected_later_positive": float(n_later_rejected) if later is not None else float("nan"),
        "later_positive_fraction": (n_later_rejected / n_rej if n_rej else 0.0) if later is not None else float("nan"),
        "n_later_positive_candidates_excluded": float(n_later_excluded) if later is not None else float("nan"),
    }
    return pairs, stats
