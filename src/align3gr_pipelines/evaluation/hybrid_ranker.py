"""`align3gr_cf`, a hybrid of the LM and SASRec (issue 26; beyond the paper): the LM's constrained beam and
SASRec's top-N for the same user are merged, and every candidate is scored by

    score = log p_LM(item | prompt) + w × log softmax_SASRec(item | history)

with the LM's exact item log-probability (`lm.constrained_decoding.item_logprobs`, the sum over the item's
SCID tokens) and SASRec's log-softmax over the whole catalogue.

The two ends of the weight are the two models alone, and are ranked so explicitly:
- w = 0 ranks the candidates by the LM alone (so the beam items keep the beam's order, and with a beam as
  wide as the catalogue the list is the LM's list);
- w = inf ranks by SASRec, the LM breaking SASRec's ties (SASRec's top-N are all candidates, so the top-k,
  k <= N, is SASRec's list).
w is picked on valid users from a grid that holds both ends, on one seeded half of them, and its score on the
other half is what it is reported with (`valid_recall.confirm_half`: the best of several options, scored on the
users it was picked on, overstates itself).

The evaluation stage calls `hybrid_recommendations`; the served recommender (`serving.recommend`) calls the same
`score_candidates` and `rank_candidates`, so both give the same list for the same prompt and history. Candidates
are catalogue indices (the order of `SCIDCatalog.item_ids`); -1 pads a short row.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from align3gr_pipelines.cf.baselines import SASRecScorer, top_k
from align3gr_pipelines.evaluation.cases import as_recommendations, empty_recs, recs_frame
from align3gr_pipelines.evaluation.valid_recall import confirm_half, sign_test_p
from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, item_logprobs
from align3gr_pipelines.lm.rec_lm import encode_prompt

log = logging.getLogger(__name__)

MODEL = "align3gr_cf"
RANKERS = ("lm", MODEL)
# 0 is the LM alone and inf SASRec alone; between them, a log-spaced ladder (the headroom study's curve
# peaked at w = 2-4 on Instruments).
DEFAULT_WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf)


@dataclass(frozen=True)
class Candidates:
    """Per case: the candidate catalogue indices (LM beam first, in beam order, then SASRec's top-N not in
    the beam, in SASRec's order; -1 pads) and both models' scores of each (-inf at padding)."""

    index: np.ndarray  # int64 [n, C]
    lm: np.ndarray  # float64 [n, C]: exact LM log-probability of the item's SCID after the prompt
    cf: np.ndarray  # float64 [n, C]: SASRec log-softmax over the catalogue; -inf for items SASRec does not know
    n_beam: np.ndarray  # int64 [n]: how many leading candidates came from the LM's beam


def weight_label(w: float) -> str:
    """A weight as a JSON-safe key: '0', '0.5', 'inf'."""
    return "inf" if math.isinf(w) else f"{w:g}"


def check_weight(w: Any, where: str = "cf_weight") -> float:
    """A float >= 0 (inf allowed: SASRec alone); anything else raises ValueError naming ``where``."""
    try:
        value = float(w)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(w, bool) or math.isnan(value) or value < 0:
        raise ValueError(f"{where} must be a number >= 0 (0: the LM alone, .inf: SASRec alone), got {w!r}")
    return value


def candidate_union(lm_index: np.ndarray, cf_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise union of two lists of catalogue indices (-1 = none): the LM's items in their order, then
    SASRec's items not already there in theirs, -1 padded to the widest row. Returns (union [n, C], n_beam [n])."""
    lm_index, cf_index = np.asarray(lm_index, dtype=np.int64), np.asarray(cf_index, dtype=np.int64)
    if lm_index.ndim != 2 or cf_index.ndim != 2 or len(lm_index) != len(cf_index):
        raise ValueError(f"candidate_union: expected two [n, *] index matrices, got shapes {lm_index.shape} and {cf_index.shape}")
    rows, n_beam = [], np.zeros(len(lm_index), dtype=np.int64)
    for r, (lm_row, cf_row) in enumerate(zip(lm_index, cf_index)):
        beam = list(dict.fromkeys(int(i) for i in lm_row if i >= 0))
        seen = set(beam)
        rows.append(beam + [int(i) for i in dict.fromkeys(cf_row.tolist()) if i >= 0 and i not in seen])
        n_beam[r] = len(beam)
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out, n_beam


def log_softmax_rows(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax over the finite entries (-inf stays -inf: an item outside SASRec's catalogue)."""
    logits = np.asarray(logits, dtype=np.float64)
    finite = np.isfinite(logits)
    peak = np.where(finite, logits, -np.inf).max(axis=1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, 0.0)
    total = np.where(finite, np.exp(logits - peak), 0.0).sum(axis=1, keepdims=True)
    return np.where(finite, logits - peak - np.log(np.maximum(total, np.finfo(np.float64).tiny)), -np.inf)


def sasrec_side(
    scorer: SASRecScorer, histories: Sequence[Sequence[str]], lm_index: np.ndarray, top_n: int, batch_size: int = 512,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SASRec's top-``top_n`` of the catalogue per history (ties by catalogue index, as the `sasrec` baseline
    row), its union with ``lm_index`` and SASRec's catalogue log-softmax of every union member, one batch of
    histories at a time (a [batch, n_items] block in memory, never [n, n_items]).
    Returns (union [n, C], n_beam [n], cf scores [n, C])."""
    if int(top_n) < 0:
        raise ValueError(f"cf_candidates must be >= 0 (SASRec's top-N added to the beam), got {top_n}")
    if len(histories) != len(lm_index):
        raise ValueError(f"sasrec_side: {len(histories)} histories for {len(lm_index)} LM lists")
    unions, beams, scores = [], [], []
    starts = range(0, len(histories), int(batch_size))
    for s in tqdm(starts, desc="align3gr_cf: SASRec", disable=not show_progress):
        logits = scorer.score(histories[s : s + int(batch_size)])
        top = top_k(logits, int(top_n))[0] if int(top_n) else np.zeros((len(logits), 0), dtype=np.int64)
        union, n_beam = candidate_union(lm_index[s : s + int(batch_size)], top)
        lsm = log_softmax_rows(logits)
        unions.append(union)
        beams.append(n_beam)
        scores.append(np.where(union >= 0, np.take_along_axis(lsm, np.maximum(union, 0), axis=1), -np.inf))
    width = max((u.shape[1] for u in unions), default=0)

    def pad(blocks: list[np.ndarray], fill: float) -> np.ndarray:
        return np.concatenate([np.pad(b, ((0, 0), (0, width - b.shape[1])), constant_values=fill) for b in blocks]) \
            if blocks else np.full((0, width), fill)

    return pad(unions, -1).astype(np.int64), (np.concatenate(beams) if beams else np.zeros(0, np.int64)), pad(scores, -np.inf)


def lm_logprobs(
    rec_lm: Any, prompts: Sequence[str], catalog: SCIDCatalog, candidates: np.ndarray, batch_size: int = 16,
    show_progress: bool = False,
) -> np.ndarray:
    """The LM's exact log-probability of each candidate's SCID after its prompt ([n, C], -inf at -1), the
    prompts tokenized as in training and decoding."""
    tok = rec_lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    lp = item_logprobs(
        rec_lm.model, [encode_prompt(tok, p) for p in prompts], catalog, torch.as_tensor(candidates, dtype=torch.long),
        batch_size=int(batch_size), pad_token_id=pad, show_progress=show_progress,
    )
    return lp.numpy().astype(np.float64)


def score_candidates(
    rec_lm: Any, sasrec: Any, catalog: SCIDCatalog, prompts: Sequence[str], histories: Sequence[Sequence[str]],
    lm_index: np.ndarray, *, cf_candidates: int, batch_size: int = 16, sasrec_batch_size: int = 512, show_progress: bool = False,
) -> Candidates:
    """The candidates of each case (its LM beam ``lm_index`` ∪ SASRec's top-``cf_candidates`` for its history)
    with both models' scores. ``prompts`` and ``histories`` describe the same cases, row by row."""
    if len(prompts) != len(histories):
        raise ValueError(f"align3gr_cf: {len(prompts)} prompts for {len(histories)} histories")
    scorer = SASRecScorer(sasrec, catalog.item_ids, "sasrec_model")
    hist = [[str(i) for i in h] for h in histories]
    index, n_beam, cf = sasrec_side(scorer, hist, np.asarray(lm_index, dtype=np.int64).reshape(len(hist), -1),
                                    cf_candidates, sasrec_batch_size, show_progress)
    lm = lm_logprobs(rec_lm, prompts, catalog, index, batch_size, show_progress) if len(index) else np.zeros(index.shape)
    return Candidates(index=index, lm=lm, cf=cf, n_beam=n_beam)


def rank_candidates(cands: Candidates, weight: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each case's top-``k`` candidates for ``weight``: (catalogue indices [n, k], scores [n, k]), best first,
    -1 / -inf past the candidates. w = 0: the LM's log-probability; w = inf: SASRec's log-softmax, the LM's
    log-probability breaking its ties; otherwise lm + w × cf. Remaining ties keep candidate order (beam
    first), so the ranking is deterministic. The score returned is the ranking key (SASRec's for w = inf)."""
    w = check_weight(weight, "align3gr_cf weight")
    if int(k) < 1:
        raise ValueError(f"align3gr_cf: k must be >= 1, got {k}")
    valid = cands.index >= 0
    if w == 0:
        primary, secondary = cands.lm, np.zeros_like(cands.lm)
    elif math.isinf(w):
        primary, secondary = cands.cf, cands.lm
    else:
        primary, secondary = cands.lm + w * cands.cf, np.zeros_like(cands.lm)
    primary = np.where(valid, np.nan_to_num(primary, nan=-np.inf), -np.inf)
    secondary = np.nan_to_num(secondary, nan=-np.inf)
    position = np.broadcast_to(np.arange(cands.index.shape[1]), cands.index.shape)
    # lexsort: the last key is the primary one; a real candidate always before padding, even at -inf.
    order = np.lexsort((position, -secondary, -primary, ~valid), axis=1)[:, : int(k)]
    idx = np.take_along_axis(cands.index, order, axis=1)
    score = np.take_along_axis(primary, order, axis=1)
    if idx.shape[1] < int(k):
        extra = int(k) - idx.shape[1]
        idx = np.pad(idx, ((0, 0), (0, extra)), constant_values=-1)
        score = np.pad(score, ((0, 0), (0, extra)), constant_values=-np.inf)
    return idx, np.where(idx >= 0, score, -np.inf)


def hits(cands: Candidates, target_index: np.ndarray, weight: float, k: int) -> np.ndarray:
    """bool[n]: whether each case's target (catalogue index, -1 = outside the catalogue) is in its top-k."""
    idx, _ = rank_candidates(cands, weight, k)
    target = np.asarray(target_index, dtype=np.int64)
    return (idx == target[:, None]).any(axis=1) & (target >= 0)


def select_weight(
    hits_by_weight: Mapping[float, np.ndarray], users: Sequence[str], seed: int
) -> dict[str, Any]:
    """Picks the weight whose valid Recall (mean hit) is highest on the select half of the users and reports
    every weight on both halves; ties go to the first weight in the grid's order. The halves split users, not
    cases (a suffix holdout has several cases per user), by `valid_recall.confirm_half` over the sorted user
    ids. The confirm half's one-sided sign tests ask whether the chosen weight beats the LM alone (w = 0) and
    SASRec alone (w = inf), where those are in the grid."""
    weights = [check_weight(w, "align3gr_cf weights") for w in hits_by_weight]
    if not weights:
        raise ValueError("align3gr_cf: the weight grid is empty; give at least one weight")
    users = np.asarray([str(u) for u in users])
    unique = np.array(sorted(set(users.tolist())))
    if len(weights) > 1 and len(unique) < 2:
        raise ValueError(f"align3gr_cf: choosing among {len(weights)} weights needs >= 2 valid users (one per half), got {len(unique)}")
    confirm_users = set(unique[confirm_half(len(unique), seed)].tolist())
    confirm = np.array([u in confirm_users for u in users], dtype=bool)
    table = {}
    for w, h in hits_by_weight.items():
        h = np.asarray(h, dtype=bool)
        if h.shape != users.shape:
            raise ValueError(f"align3gr_cf: {h.shape[0]} hits for w={weight_label(float(w))}, {len(users)} users")
        table[float(w)] = h
    scores = {w: (float(h[~confirm].mean()) if (~confirm).any() else float("nan"),
                  float(h[confirm].mean()) if confirm.any() else float("nan")) for w, h in table.items()}
    chosen = weights[0]
    for w in weights[1:]:
        if scores[w][0] > scores[chosen][0]:
            chosen = w
    out: dict[str, Any] = {
        "chosen_w": weight_label(chosen), "weights": [weight_label(w) for w in weights],
        "valid_recall": {weight_label(w): {"select": s, "confirm": c} for w, (s, c) in scores.items()},
        "n_select_users": int(len(unique) - len(confirm_users)), "n_confirm_users": int(len(confirm_users)),
        "n_select_cases": int((~confirm).sum()), "n_confirm_cases": int(confirm.sum()), "seed": int(seed),
    }
    for name, end in (("lm", 0.0), ("sasrec", math.inf)):
        if end in table:
            out[f"confirm_p_vs_{name}"] = sign_test_p(table[chosen][confirm], table[end][confirm])
    return out


def _catalogue_index(item_ids: Sequence[str], values: Sequence[Any]) -> np.ndarray:
    where = {iid: i for i, iid in enumerate(item_ids)}
    return np.array([where.get(str(v), -1) for v in values], dtype=np.int64)


def beam_matrix(lm_recs: pd.DataFrame, cases: pd.DataFrame, item_ids: Sequence[str]) -> np.ndarray:
    """The LM's lists (a `recommendations` frame of one model) as catalogue indices [n_cases, width] in the row
    order of ``cases`` (split, user_id, case), rank order, -1 where a case has no or a shorter list."""
    missing = [c for c in ("split", "user_id", "case", "rank", "item_id") if c not in lm_recs.columns]
    if missing:
        raise ValueError(f"align3gr_cf: the LM's recommendations lack column(s) {missing}; expected the `recommendations` columns")
    if "model" in lm_recs.columns and lm_recs["model"].nunique() > 1:
        raise ValueError(f"align3gr_cf: the LM's recommendations hold several models {sorted(lm_recs['model'].unique())}; pass one")
    width = int(lm_recs["rank"].max()) if len(lm_recs) else 0
    out = np.full((len(cases), width), -1, dtype=np.int64)
    if not len(lm_recs):
        return out
    key = pd.MultiIndex.from_arrays([cases["split"].astype(str), cases["user_id"].astype(str), cases["case"].astype("int64")])
    row = pd.Series(np.arange(len(cases)), index=key)
    rec_key = pd.MultiIndex.from_arrays([lm_recs["split"].astype(str), lm_recs["user_id"].astype(str), lm_recs["case"].astype("int64")])
    where = row.reindex(rec_key).to_numpy()
    ok = ~np.isnan(where)
    out[where[ok].astype(int), lm_recs["rank"].to_numpy()[ok].astype(int) - 1] = _catalogue_index(item_ids, lm_recs["item_id"].to_numpy()[ok])
    return out


def hybrid_recommendations(
    rec_lm: Any, sasrec: Any, eval_prompts: pd.DataFrame, eval_cases: pd.DataFrame, lm_recs: pd.DataFrame,
    item_scids: pd.DataFrame, *, weights: Sequence[float] = DEFAULT_WEIGHTS, cf_candidates: int = 20, top_k: int = 20,
    select_k: int = 10, seed: int = 0, batch_size: int = 16, sasrec_batch_size: int = 512, show_progress: bool = False,
    model: str = MODEL, lm_label: str | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The `align3gr_cf` rows of the `recommendations` table for every evaluation case, and their info.

    ``eval_prompts`` (split, user_id, case, prompt, target) and ``eval_cases`` (split, user_id, case, history)
    are the evaluation stage's; ``lm_recs`` the LM's own rows of `recommendations` (its beam lists, decoded by
    `recommend_with_lm`, read as the beam: their width is the beam's top-N). The weight is chosen on the valid
    cases (Recall@``select_k``, `select_weight`) and every case (valid and test) is ranked with it; a one-weight
    grid is used as given. Either model missing (None) gives no rows and a `skipped` info."""
    t0 = time.perf_counter()
    info: dict[str, Any] = {"model": model, "kind": "hybrid", "lm": lm_label}
    if rec_lm is None or sasrec is None or not len(lm_recs):
        why = "no LM checkpoint" if rec_lm is None else "no sasrec_model checkpoint" if sasrec is None else "the LM has no recommendations"
        log.info("evaluation: %s skipped: %s", model, why)
        return empty_recs(), {**info, "skipped": why}
    grid = [check_weight(w, "align3gr_cf weights") for w in weights]
    if len(set(grid)) != len(grid):
        raise ValueError(f"align3gr_cf weights: duplicates in {list(weights)}")
    if int(top_k) < 1 or int(select_k) < 1 or int(select_k) > int(top_k):
        raise ValueError(f"align3gr_cf: need 1 <= select_k <= top_k, got select_k={select_k}, top_k={top_k}")
    keys = ["split", "user_id", "case"]
    for name, df, cols in (("eval_prompts", eval_prompts, [*keys, "prompt", "target"]), ("eval_cases", eval_cases, [*keys, "history"])):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"align3gr_cf: {name} lacks column(s) {missing}; expected {cols}")
    cases = eval_prompts[[*keys, "prompt", "target"]].assign(user_id=lambda d: d["user_id"].astype(str))
    cases = cases.merge(eval_cases[[*keys, "history"]].assign(user_id=lambda d: d["user_id"].astype(str)), on=keys, how="left",
                        validate="one_to_one")
    if cases["history"].isna().any():
        r = cases[cases["history"].isna()].iloc[0]
        raise ValueError(f"align3gr_cf: eval_prompts has cases eval_cases lacks (e.g. {r['split']} user {r['user_id']} case {r['case']})")
    catalog = SCIDCatalog.from_scids(item_scids, rec_lm.tokenizer)
    beam = beam_matrix(lm_recs, cases, catalog.item_ids)
    cands = score_candidates(
        rec_lm, sasrec, catalog, cases["prompt"].tolist(), [list(h) for h in cases["history"]], beam, cf_candidates=cf_candidates,
        batch_size=batch_size, sasrec_batch_size=sasrec_batch_size, show_progress=show_progress,
    )
    valid = (cases["split"] == "valid").to_numpy()
    if len(grid) == 1:
        chosen, selection = grid[0], {"chosen_w": weight_label(grid[0]), "weights": [weight_label(grid[0])], "note": "one weight: not chosen"}
    else:
        if not valid.any():
            raise ValueError("align3gr_cf: choosing the weight needs valid cases; add 'valid' to evaluation.splits or give one weight")
        sub = Candidates(cands.index[valid], cands.lm[valid], cands.cf[valid], cands.n_beam[valid])
        target = _catalogue_index(catalog.item_ids, cases.loc[valid, "target"])
        selection = select_weight({w: hits(sub, target, w, int(select_k)) for w in grid}, cases.loc[valid, "user_id"].tolist(), seed)
        chosen = float("inf") if selection["chosen_w"] == "inf" else float(selection["chosen_w"])
        log.info("evaluation: %s chose w = %s on %d valid users (Recall@%d select %.4f, confirm %.4f)", model, selection["chosen_w"],
                 selection["n_select_users"], int(select_k), selection["valid_recall"][selection["chosen_w"]]["select"],
                 selection["valid_recall"][selection["chosen_w"]]["confirm"])
    idx, score = rank_candidates(cands, chosen, int(top_k))
    seconds = time.perf_counter() - t0
    recs = as_recommendations(recs_frame(model, cases, catalog.item_ids, idx, score))
    n_cand = (cands.index >= 0).sum(axis=1)
    info.update({
        "cf_weight": weight_label(chosen), "selection": selection, "select_k": int(select_k), "cf_candidates": int(cf_candidates),
        "mean_candidates": float(n_cand.mean()) if len(n_cand) else 0.0,
        "mean_beam_candidates": float(cands.n_beam.mean()) if len(n_cand) else 0.0,
        "seconds": seconds, "ms_per_user": 1000 * seconds / max(len(cases), 1),
        "note": f"{lm_label or 'LM'} + w × SASRec, w = {weight_label(chosen)} chosen on valid",
    })
    return recs, info
