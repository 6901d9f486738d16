"""TCA4Rec: token-level collaborative alignment as an optional SFT objective (arXiv 2601.18457).

A frozen collaborative-filtering model (our SASRec) scores every catalogue item for a user's history. The
*collaborative tokenizer* turns those item logits into one distribution per SCID level: at level j, the
softmax over the items whose SCID starts with the target's prefix y_<j, summed by each item's j-th code,

    p_u(v | y_<j) = sum_{n : code_<j(n) = y_<j, code_j(n) = v} softmax_{n' : code_<j(n') = y_<j}(z_u)[n].

The *soft label* mixes it into the one-hot target, ỹ_j = (1 - α)·onehot(y_j) + α·p_u(·|y_<j), and the
*soft-NTP loss* at each SCID response position is

    L_j = -log sum_v ỹ_j(v)·P_θ(v | x, y_<j),

P_θ being the LM's full-vocabulary softmax and v ranging over the level-j SCID token ids. Its gradient
w.r.t. the logits is P_θ - ỹ·P_θ / sum(ỹ·P_θ): every label token is pulled up in proportion to how much
the model already believes it, the adaptive weighting the paper argues for. α = 0 is plain cross-entropy.

Ablations (the two the issue asks for): ``variant="aux_kl"`` keeps one-hot CE and adds α·KL(p_u ‖ Q_θ)
per SCID position, Q_θ being P_θ restricted to the level-j SCID tokens and renormalised over them (both
sides are then distributions over the same codebook; the LM's mass on non-SCID tokens is the CE term's
business).
``label="uniform"`` replaces p_u by our definition of a uniform label: 1/|valid| on each valid next code
under the prefix (the codes that at least one catalogue item with prefix y_<j has at level j), i.e. label
smoothing confined to the catalogue's trie, which tells how much of the gain is the CF signal rather than
mere smoothing. (Uniform over *items* instead is `collaborative_distribution` with constant logits.)

Positions (``positions``): ``response`` (the paper's, and the default) applies the soft label to the SEQ
response's SCID only. ``all_labelled`` (beyond the paper) also applies it where the SFT trainer's
``history_loss`` labels the item SCIDs inside a prompt: history item t >= 1 gets p_u computed from the frozen
SASRec's causal output over items 0..t-1 of the same history (one forward per batch gives every prefix,
`causal_prefix_logits`; nothing is precomputed per position, so memory does not grow with the data) — or the
uniform label under ``label="uniform"``, at exactly the same positions. History item 0 has no prefix and keeps
plain CE. The response keeps its label from the whole history, as under ``response``.

Conventions: the item code table ``codes`` [n_items, L] is in ``item_scids`` row order; CF logits arrive in
the CF model's item order and are reindexed with :func:`cf_index_map`; ``level_token_ids`` [L, V] maps
(level, code) to the tokenizer id, -1 for codes a level does not have; V is the largest codebook size.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F

from align3gr_pipelines.tokenizer.scid import scid_token, split_tokens

IGNORE_INDEX = -100
Variant = Literal["soft_ntp", "aux_kl"]
LabelKind = Literal["cf", "uniform"]
Positions = Literal["response", "all_labelled"]
POSITIONS = ("response", "all_labelled")
# Items per chunk x catalogue size: bounds the [chunk, L, n_items] prefix masks of the history labels.
_HISTORY_CHUNK_CELLS = 4_000_000


# --------------------------------------------------------------------------- collaborative tokenizer


def _check_codes(codes: torch.Tensor, target_codes: torch.Tensor, codebook_size: int | None) -> int:
    if codes.dim() != 2 or codes.dtype != torch.long:
        raise ValueError(f"codes must be a LongTensor [n_items, L], got {tuple(codes.shape)} {codes.dtype}")
    if target_codes.dim() != 2 or target_codes.shape[1] != codes.shape[1]:
        raise ValueError(
            f"target_codes must be [B, L={codes.shape[1]}] like the code table, got {tuple(target_codes.shape)}"
        )
    size = int(codes.max()) + 1 if codebook_size is None else int(codebook_size)
    if int(codes.min()) < 0 or int(codes.max()) >= size:
        raise ValueError(f"codes must lie in [0, {size}), got [{int(codes.min())}, {int(codes.max())}]")
    return size


def prefix_mask(codes: torch.Tensor, target_codes: torch.Tensor) -> torch.Tensor:
    """[B, L, n_items] bool: item n shares the first j codes of target b (level 0: every item).

    Raises if a target is not a row of the code table: its prefixes would then select no item at all.
    """
    eq = codes.unsqueeze(0) == target_codes.unsqueeze(1)  # [B, N, L]
    shares_upto = eq.long().cumprod(dim=-1).bool()  # [B, N, L]: codes 0..j all equal
    missing = ~shares_upto[..., -1].any(dim=1)
    if missing.any():
        b = int(missing.nonzero()[0, 0])
        raise ValueError(
            f"target_codes row {b} ({target_codes[b].tolist()}) is not the SCID of any item in the code table"
        )
    everything = torch.ones_like(shares_upto[..., :1])
    return torch.cat([everything, shares_upto[..., :-1]], dim=-1).transpose(1, 2)


def valid_next_codes(codes: torch.Tensor, target_codes: torch.Tensor, codebook_size: int | None = None) -> torch.Tensor:
    """[B, L, V] bool: code v is a valid level-j continuation of the prefix y_<j in the catalogue's trie."""
    size = _check_codes(codes, target_codes, codebook_size)
    mask = prefix_mask(codes, target_codes)
    counts = _sum_by_code(mask.float(), codes, size)
    return counts > 0


def _sum_by_code(per_item: torch.Tensor, codes: torch.Tensor, size: int) -> torch.Tensor:
    """[B, L, N] per-item values -> [B, L, V] sums over the items with each level-j code."""
    b, levels, n = per_item.shape
    index = codes.t().unsqueeze(0).expand(b, levels, n)
    return per_item.new_zeros(b, levels, size).scatter_add_(2, index, per_item)


def collaborative_distribution(
    cf_logits: torch.Tensor,
    codes: torch.Tensor,
    target_codes: torch.Tensor,
    codebook_size: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """p_u(v | y_<j) for every example and level: [B, L, V], each row summing to 1 over the valid next codes.

    ``cf_logits`` [B, n_items] are aligned with the rows of ``codes``; -inf marks items the CF model does not
    know (they get no mass). Where no item of a prefix set has a finite logit, the CF model has no opinion and
    the row falls back to the one-hot target, so the soft label degrades to plain CE there.
    """
    size = _check_codes(codes, target_codes, codebook_size)
    if cf_logits.shape != (target_codes.shape[0], codes.shape[0]):
        raise ValueError(
            f"cf_logits must be [B={target_codes.shape[0]}, n_items={codes.shape[0]}], got {tuple(cf_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    mask = prefix_mask(codes, target_codes)  # [B, L, N]
    z = (cf_logits.detach().float() / temperature).unsqueeze(1).masked_fill(~mask, float("-inf"))
    probs = torch.nan_to_num(z.softmax(dim=-1), nan=0.0)  # an all -inf row gives NaN: no known candidate
    dist = _sum_by_code(probs, codes, size)
    known = torch.isfinite(z).any(dim=-1, keepdim=True)
    return torch.where(known, dist, F.one_hot(target_codes, size).to(dist.dtype))


def uniform_distribution(
    codes: torch.Tensor, target_codes: torch.Tensor, codebook_size: int | None = None
) -> torch.Tensor:
    """The uniform-label ablation: [B, L, V], 1/|valid| on each valid next code under the prefix y_<j, else 0."""
    valid = valid_next_codes(codes, target_codes, codebook_size).float()
    return valid / valid.sum(dim=-1, keepdim=True)


def soft_labels(target_codes: torch.Tensor, dist: torch.Tensor, alpha: float) -> torch.Tensor:
    """ỹ = (1 - α)·onehot(y) + α·dist, [B, L, V]."""
    _check_alpha(alpha)
    onehot = F.one_hot(target_codes, dist.shape[-1]).to(dist.dtype)
    return (1.0 - alpha) * onehot + alpha * dist


def _check_alpha(alpha: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"tca4rec alpha must lie in [0, 1], got {alpha}")


# --------------------------------------------------------------------------- losses on LM logits


def _level_log_probs(lm_logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log P_θ (full-vocabulary softmax) of candidate tokens: [P, vocab] x [P, K] ids -> [P, K], -inf where id < 0."""
    log_p = lm_logits.float().log_softmax(dim=-1).gather(1, token_ids.clamp(min=0))
    return log_p.masked_fill(token_ids < 0, float("-inf"))


def _soft_ntp(log_p: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # -log Σ ỹ·P as -logsumexp(log ỹ + log P): tiny probabilities do not underflow, and a one-hot ỹ gives
    # exactly the cross-entropy of the labelled token.
    return -torch.logsumexp(labels.detach().float().log() + log_p, dim=-1)


def _kl_to_level(log_p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    log_q = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # renormalise over the level's tokens
    p = target.detach().float()
    # 0·log 0 = 0; the where also keeps padded codes (-inf, never any target mass) out of the sum.
    terms = torch.where(p > 0, p * (p.clamp(min=1e-30).log() - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def soft_ntp_loss(lm_logits: torch.Tensor, labels: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Per-position -log sum_v ỹ(v)·P_θ(v): lm_logits [P, vocab], labels ỹ [P, V], token_ids [P, V] -> [P].
    Its gradient w.r.t. the logits is P_θ - ỹ·P_θ / sum(ỹ·P_θ)."""
    return _soft_ntp(_level_log_probs(lm_logits, token_ids), labels)


def level_kl(lm_logits: torch.Tensor, target: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Per-position KL(target ‖ Q_θ), Q_θ = P_θ restricted to the level tokens and renormalised: -> [P]."""
    return _kl_to_level(_level_log_probs(lm_logits, token_ids), target)


def tca4rec_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    scid_positions: torch.Tensor,
    target_codes: torch.Tensor,
    dist: torch.Tensor,
    level_token_ids: torch.Tensor,
    alpha: float,
    variant: Variant = "soft_ntp",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """The causal-LM loss of a batch with TCA4Rec on the SCID response tokens; other tokens keep plain CE.

    logits [B, T, vocab] and labels [B, T] are as a Hugging Face causal LM sees them (labels unshifted, -100
    where no loss). ``scid_positions`` [B, L] is the index t in ``labels`` of the level-j SCID token of
    example b (-1 in a whole row: that example has no TCA4Rec target); ``target_codes`` [B, L] its codes,
    ``dist`` [B, L, V] p_u (or the uniform ablation) for them. The result is, like HF's loss, the sum of the
    per-token losses over the count of labelled tokens (or over ``num_items_in_batch`` when given), so α = 0
    reproduces HF's plain causal-LM cross-entropy. ``aux_kl`` adds α·KL at each SCID position to that sum.
    """
    _check_alpha(alpha)
    if variant not in ("soft_ntp", "aux_kl"):
        raise ValueError(f"tca4rec variant must be 'soft_ntp' or 'aux_kl', got {variant!r}")
    b, t, vocab = logits.shape
    levels, size = level_token_ids.shape
    if labels.shape != (b, t) or scid_positions.shape != (b, levels) or target_codes.shape != (b, levels):
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, scid_positions "
            f"{tuple(scid_positions.shape)}, target_codes {tuple(target_codes.shape)}; expected [B, T], [B, L={levels}]"
        )
    if dist.shape != (b, levels, size):
        raise ValueError(f"dist must be [B, L, V={size}], got {tuple(dist.shape)}")
    has_target = scid_positions >= 0
    if not torch.equal(has_target.all(dim=1), has_target.any(dim=1)):
        raise ValueError("scid_positions: a row must be all -1 (plain CE) or all valid positions")
    rows = has_target.all(dim=1).nonzero().squeeze(1)
    return tca4rec_items_loss(
        logits, labels, rows, scid_positions[rows], target_codes[rows], dist[rows], level_token_ids, alpha, variant,
        num_items_in_batch,
    )


def tca4rec_items_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    example_of: torch.Tensor,
    positions: torch.Tensor,
    target_codes: torch.Tensor,
    dist: torch.Tensor,
    level_token_ids: torch.Tensor,
    alpha: float,
    variant: Variant = "soft_ntp",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`tca4rec_causal_lm_loss` for any number of item SCIDs per example (the response's and the history's).

    Item k of the batch is example ``example_of[k]``'s SCID whose level-j token sits at ``positions[k, j]`` of
    ``labels``, with codes ``target_codes[k]`` and label distribution ``dist[k]`` [L, V]; every other labelled
    token keeps plain CE. No two items may share a token.
    """
    _check_alpha(alpha)
    if variant not in ("soft_ntp", "aux_kl"):
        raise ValueError(f"tca4rec variant must be 'soft_ntp' or 'aux_kl', got {variant!r}")
    b, t, vocab = logits.shape
    levels, size = level_token_ids.shape
    n = example_of.shape[0]
    if labels.shape != (b, t):
        raise ValueError(f"labels must be [B, T] like the logits {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if positions.shape != (n, levels) or target_codes.shape != (n, levels) or dist.shape != (n, levels, size):
        raise ValueError(
            f"shape mismatch: example_of {tuple(example_of.shape)}, positions {tuple(positions.shape)}, target_codes "
            f"{tuple(target_codes.shape)}, dist {tuple(dist.shape)}; expected [P], [P, L={levels}], [P, L], [P, L, V={size}]"
        )
    rows, pos, codes = example_of, positions, target_codes
    level_ids = level_token_ids.to(logits.device).unsqueeze(0).expand(n, -1, -1)  # [P, L, V]
    if n:
        if int(pos.min()) < 1 or int(pos.max()) >= t:
            raise ValueError(f"scid_positions must lie in [1, {t}) (position 0 has no preceding logit)")
        want = level_ids.gather(2, codes.unsqueeze(-1)).squeeze(-1)
        got = labels[rows.unsqueeze(1), pos]
        if not torch.equal(got, want):
            r, j = (got != want).nonzero()[0].tolist()
            raise ValueError(
                f"example {int(rows[r])}: labels[{int(pos[r, j])}] = {int(got[r, j])} but its level-{j} SCID "
                f"token (code {int(codes[r, j])}) is id {int(want[r, j])}; scid_positions are misaligned"
            )
        flat = (rows.unsqueeze(1) * t + pos).reshape(-1)
        if flat.unique().numel() != flat.numel():
            raise ValueError("tca4rec: two SCID targets claim the same token position")

    # Each labelled token gets V candidate ids with log-weights: its label alone at log 1 (plain CE) or, at
    # SCID positions, the level's tokens with the log soft label. One log-softmax and one gather then serve
    # both kinds, so no second gradient path into the [B·T, vocab] logits; the log-softmax runs over the
    # labelled rows only (HF's runs over all B·T), which is where most of an SFT batch's loss time goes.
    targets = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)  # logits[:, t] predicts labels[:, t+1]
    labelled = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # [M]
    slot = torch.full_like(targets, -1)
    slot[labelled] = torch.arange(labelled.numel(), device=targets.device)
    at = slot[(rows.unsqueeze(1) * t + pos - 1).reshape(-1)]  # [P·L] rows of the SCID tokens among the labelled
    candidates = torch.full((labelled.numel(), size), -1, dtype=torch.long, device=logits.device)
    candidates[:, 0] = targets[labelled]
    candidates[at] = level_ids.reshape(-1, size)
    log_weights = torch.full((labelled.numel(), size), float("-inf"), device=logits.device)
    log_weights[:, 0] = 0.0
    scid_alpha = alpha if variant == "soft_ntp" else 0.0  # aux_kl keeps one-hot CE and adds the KL below
    log_weights[at] = soft_labels(codes, dist.float(), scid_alpha).reshape(-1, size).log()

    log_p = _level_log_probs(logits.reshape(b * t, vocab).index_select(0, labelled), candidates)
    total = -torch.logsumexp(log_weights + log_p, dim=-1).sum()
    if variant == "aux_kl" and alpha > 0 and n:
        total = total + alpha * _kl_to_level(log_p[at], dist.reshape(-1, size)).sum()
    denom = labelled.numel() if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(denom):
        denom = denom.to(total.device)
    return total / denom


# --------------------------------------------------------------------------- tables and the trainer's entry point


def cf_index_map(scid_item_ids: Sequence[str], cf_item_ids: Sequence[str]) -> torch.Tensor:
    """[n_items] LongTensor: for each code-table row, its column in the CF model's item table (-1: unknown)."""
    column = {item: i for i, item in enumerate(cf_item_ids)}
    return torch.tensor([column.get(str(item), -1) for item in scid_item_ids], dtype=torch.long)


def align_cf_logits(cf_logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reorder CF logits [B, n_cf] into code-table order [B, n_items]; items the CF model lacks get -inf."""
    aligned = cf_logits.detach().float().index_select(1, index.clamp(min=0).to(cf_logits.device))
    return aligned.masked_fill((index < 0).to(cf_logits.device), float("-inf"))


def level_token_ids_from_tokenizer(tokenizer: Any, codes: torch.Tensor) -> torch.Tensor:
    """[L, V] item SCID token ids per (level, code), -1 for codes absent from a level; every code used by the
    table must be a single token of the tokenizer."""
    levels, size = codes.shape[1], int(codes.max()) + 1
    table = torch.full((levels, size), -1, dtype=torch.long)
    vocab = tokenizer.get_vocab()
    missing = []
    for level in range(levels):
        for code in torch.unique(codes[:, level]).tolist():
            token = scid_token("item", level, code)
            if token in vocab:
                table[level, code] = vocab[token]
            else:
                missing.append(token)
    if missing:
        raise KeyError(f"item SCID tokens missing from the tokenizer vocabulary: {missing[:5]} ({len(missing)} in all)")
    return table


def history_from_prompt(prompt: str, item_by_tokens: Mapping[str, str], levels: int) -> list[str]:
    """Item ids of the item SCIDs in a SEQ prompt, in order (user SCID tokens skipped, unknown SCIDs dropped).

    Item SCIDs are unique, so a SEQ prompt (`prompts.seq_prompt`) determines its history; this lets the trainer
    score histories with SASRec while `sft_examples` carries no history column.
    """
    item_tokens = [tok for tok in split_tokens(prompt) if tok.startswith("<i")]
    scids = ["".join(item_tokens[k : k + levels]) for k in range(0, len(item_tokens) - levels + 1, levels)]
    return [item_by_tokens[s] for s in scids if s in item_by_tokens]


# --------------------------------------------------------------------------- history positions (positions: all_labelled)


def labelled_history_items(
    input_ids: Sequence[int],
    labels: Sequence[int],
    end: int,
    token_codes: Mapping[int, tuple[int, int]],
    row_by_codes: Mapping[tuple[int, ...], int],
) -> tuple[list[int], list[int]]:
    """The labelled item SCIDs in ``input_ids[:end]`` (a prompt), oldest first: each one's code-table row and
    the index of its level-0 token. ``token_codes`` maps an item SCID token id to (level, code), ``row_by_codes``
    a full code tuple to its row. Unlabelled tokens are skipped; a labelled SCID that is cut short, out of
    level order or not an item of the table raises (the labels would then train something else)."""
    levels = len(next(iter(row_by_codes))) if row_by_codes else 0
    rows: list[int] = []
    starts: list[int] = []
    k = 0
    while k < end:
        if labels[k] == IGNORE_INDEX or int(input_ids[k]) not in token_codes:
            k += 1
            continue
        found = [token_codes.get(int(input_ids[k + j]), (-1, -1)) if k + j < end and labels[k + j] != IGNORE_INDEX
                 else (-1, -1) for j in range(levels)]
        if [level for level, _ in found] != list(range(levels)):
            raise ValueError(
                f"labelled prompt tokens {list(input_ids[k : k + levels])} at index {k} are not one whole item SCID "
                f"(levels {[level for level, _ in found]}, expected {list(range(levels))})"
            )
        codes = tuple(code for _, code in found)
        if codes not in row_by_codes:
            raise ValueError(f"labelled prompt SCID with codes {list(codes)} at index {k} is not an item of item_scids")
        rows.append(row_by_codes[codes])
        starts.append(k)
        k += levels
    return rows, starts


@torch.no_grad()
def causal_prefix_logits(cf_model: Any, histories: Sequence[Sequence[int]]) -> torch.Tensor:
    """SASRec's next-item logits after every proper prefix of every history, from one causal forward.

    ``histories`` hold CF item indices (SASRec's: item ``item_ids[j]`` is ``j + 1``; 0 = an item it does not
    know, dropped as `SASRec.score` drops it). Returns [sum_b max(len_b - 1, 0), n_cf], rows in the order
    (history b, t = 1..len_b - 1): the logits after items 0..t-1, i.e. the CF label of item t. The forward's
    output at each position sees only the items before it (causal mask), so one pass gives every prefix.
    Known items beyond ``max_len`` are cut, from the end, into windows of ``max_len`` as SASRec's training
    windows are (the last window is what `SASRec.score` sees); a prefix with no known item gets zero logits,
    `SASRec.score`'s answer for an empty history. Positions keep SASRec's convention (right-aligned).
    """
    max_len = int(cf_model.max_len)
    table = cf_model.item_embeddings()
    windows: list[list[int]] = []
    slot_of: list[list[tuple[int, int]]] = []  # per history: (window, offset) of each known item
    for history in histories:
        known = [int(i) for i in history if int(i) > 0]
        slots: list[tuple[int, int]] = [(0, 0)] * len(known)
        end = len(known)
        while end > 0:
            start = max(0, end - max_len)
            slots[start:end] = [(len(windows), k - start) for k in range(start, end)]
            windows.append(known[start:end])
            end = start
        slot_of.append(slots)
    width = max((len(w) for w in windows), default=1)
    picks: list[int] = []  # flat index into the forward's [W·width] outputs, -1 = no known item yet
    for history, slots in zip(histories, slot_of):
        last = -1
        for t in range(1, len(history)):
            last += int(int(history[t - 1]) > 0)
            if last < 0:
                picks.append(-1)
            else:
                w, offset = slots[last]
                picks.append(w * width + width - len(windows[w]) + offset)  # windows are left-padded
    if not picks:
        return table.new_zeros((0, table.shape[0])).float()
    device = table.device
    was_training = cf_model.training
    cf_model.eval()
    try:
        seq = torch.zeros((max(1, len(windows)), width), dtype=torch.long)
        for w, items in enumerate(windows):
            seq[w, width - len(items) :] = torch.tensor(items, dtype=torch.long)
        hidden = cf_model(seq.to(device)).reshape(-1, table.shape[1])
    finally:
        cf_model.train(was_training)
    pick = torch.tensor(picks, dtype=torch.long, device=device)
    users = hidden.index_select(0, pick.clamp(min=0)).masked_fill((pick < 0).unsqueeze(1), 0.0)
    return (users @ table.T).float()


@dataclass(frozen=True)
class TCA4Rec:
    """Everything the SFT trainer needs: the item code table, level token ids, CF index map and settings."""

    codes: torch.Tensor  # [n_items, L], item_scids row order
    level_token_ids: torch.Tensor  # [L, V]
    cf_index: torch.Tensor | None = None  # [n_items] -> CF item column; None: CF logits already in row order
    alpha: float = 0.3
    variant: Variant = "soft_ntp"
    label: LabelKind = "cf"
    temperature: float = 1.0
    positions: Positions = "response"

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        if self.variant not in ("soft_ntp", "aux_kl"):
            raise ValueError(f"tca4rec.variant must be 'soft_ntp' or 'aux_kl', got {self.variant!r}")
        if self.label not in ("cf", "uniform"):
            raise ValueError(f"tca4rec.label must be 'cf' or 'uniform', got {self.label!r}")
        if self.positions not in POSITIONS:
            raise ValueError(f"tca4rec.positions must be one of {POSITIONS}, got {self.positions!r}")
        if self.level_token_ids.shape[0] != self.codes.shape[1]:
            raise ValueError(
                f"level_token_ids has {self.level_token_ids.shape[0]} levels, the code table {self.codes.shape[1]}"
            )
        if int(self.codes.max()) >= self.level_token_ids.shape[1]:
            raise ValueError(f"code table uses code {int(self.codes.max())} >= V={self.level_token_ids.shape[1]}")

    @classmethod
    def from_item_scids(
        cls, item_scids: Any, tokenizer: Any, cf_item_ids: Sequence[str] | None = None, **settings: Any
    ) -> "TCA4Rec":
        """Build from the `item_scids` table (id, codes), the RecLM tokenizer and `SASRec.item_ids`;
        ``settings`` are alpha, variant, label, temperature, positions (e.g. ``**params["tca4rec"]``)."""
        for column in ("id", "codes"):
            if column not in item_scids.columns:
                raise ValueError(f"item_scids: missing column {column!r} (expected id, codes, tokens)")
        rows = [list(c) for c in item_scids["codes"]]
        if len({len(r) for r in rows}) != 1:
            raise ValueError("item_scids.codes: every item must have the same number of levels")
        codes = torch.tensor(rows, dtype=torch.long)
        index = None if cf_item_ids is None else cf_index_map([str(i) for i in item_scids["id"]], cf_item_ids)
        return cls(codes, level_token_ids_from_tokenizer(tokenizer, codes), index, **settings)

    def to(self, device: torch.device | str) -> "TCA4Rec":
        cf_index = None if self.cf_index is None else self.cf_index.to(device)
        return replace(
            self, codes=self.codes.to(device), level_token_ids=self.level_token_ids.to(device), cf_index=cf_index
        )

    def state(self) -> dict[str, Any]:
        """Tensors and settings only (what `torch.load(weights_only=True)` reads back), for torchrun workers."""
        return {"codes": self.codes.cpu(), "level_token_ids": self.level_token_ids.cpu(),
                "cf_index": None if self.cf_index is None else self.cf_index.cpu(), "alpha": float(self.alpha),
                "variant": self.variant, "label": self.label, "temperature": float(self.temperature),
                "positions": self.positions}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> "TCA4Rec":
        return cls(**state)

    def token_codes(self) -> dict[int, tuple[int, int]]:
        """Item SCID token id -> (level, code)."""
        table = self.level_token_ids.cpu()
        return {int(table[j, v]): (j, v) for j in range(table.shape[0]) for v in range(table.shape[1]) if table[j, v] >= 0}

    def cf_history(self, rows: Sequence[int]) -> list[int]:
        """Code-table rows -> the CF model's item indices (`SASRec.item_index`: column + 1; 0 = unknown to it)."""
        if self.cf_index is None:
            return [int(r) + 1 for r in rows]
        index = self.cf_index.cpu()
        return [int(index[int(r)]) + 1 for r in rows]

    def history_targets(
        self, history_rows: torch.Tensor, history_starts: torch.Tensor, cf_model: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The TCA4Rec items of the labelled history SCIDs in a batch's prompts (``positions: all_labelled``).

        ``history_rows`` [B, H]: code-table rows of each prompt's labelled item SCIDs, oldest first, -1 padding
        after them; ``history_starts`` [B, H]: index of each one's level-0 token. History item t >= 1 gets the
        label of its prefix (items 0..t-1): SASRec's causal output there (`causal_prefix_logits`, computed here
        for the batch, never stored), or the uniform ablation. Item 0 has no prefix and keeps plain CE.
        Returns (example_of [P], positions [P, L], target_codes [P, L], dist [P, L, V]) for
        `tca4rec_items_loss`."""
        device = self.codes.device
        history_rows, history_starts = history_rows.to(device), history_starts.to(device)
        if history_rows.shape != history_starts.shape or history_rows.dim() != 2:
            raise ValueError(f"history_rows {tuple(history_rows.shape)} and history_starts "
                             f"{tuple(history_starts.shape)} must both be [B, H]")
        present = history_rows >= 0
        if present.shape[1] > 1 and (present[:, 1:] & ~present[:, :-1]).any():
            raise ValueError("history_rows: the -1 padding must follow a prompt's items, not sit between them")
        present[:, :1] = False  # the first history item has no prefix: plain CE
        where = present.nonzero()  # [P, 2], row-major: history b, then t, as causal_prefix_logits orders them
        example_of, t = where[:, 0], where[:, 1]
        levels, size = self.codes.shape[1], self.level_token_ids.shape[1]
        target_rows = history_rows[example_of, t]
        positions = history_starts[example_of, t].unsqueeze(1) + torch.arange(levels, device=device)
        target_codes = self.codes[target_rows]
        cf_logits = None
        if self.label == "cf" and target_rows.numel():
            if cf_model is None:
                raise ValueError("tca4rec.positions=all_labelled with label='cf' needs the CF model (sasrec_model)")
            lengths = (history_rows >= 0).sum(dim=1).tolist()
            histories = [self.cf_history(history_rows[b, : lengths[b]].tolist()) for b in range(len(lengths))]
            cf_logits = causal_prefix_logits(cf_model, histories).to(device)
        chunk = max(1, _HISTORY_CHUNK_CELLS // max(1, self.codes.shape[0] * levels))
        dists = [
            self.target_distribution(target_rows[k : k + chunk], None if cf_logits is None else cf_logits[k : k + chunk])
            for k in range(0, target_rows.numel(), chunk)
        ]
        dist = torch.cat(dists) if dists else torch.zeros((0, levels, size), device=device)
        return example_of, positions, target_codes, dist

    def target_distribution(self, target_rows: torch.Tensor, cf_logits: torch.Tensor | None) -> torch.Tensor:
        """p_u (label='cf') or the uniform ablation for the given code-table rows: [R, L, V]."""
        target_codes = self.codes[target_rows]
        size = self.level_token_ids.shape[1]
        if self.label == "uniform":
            return uniform_distribution(self.codes, target_codes, size)
        if cf_logits is None:
            raise ValueError("tca4rec.label='cf' needs cf_logits (SASRec.score of the examples' histories)")
        z = cf_logits if self.cf_index is None else align_cf_logits(cf_logits, self.cf_index)
        return collaborative_distribution(z, self.codes, target_codes, size, self.temperature)

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        target_rows: torch.Tensor,
        scid_start: torch.Tensor,
        cf_logits: torch.Tensor | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        dist: torch.Tensor | None = None,
        history_rows: torch.Tensor | None = None,
        history_starts: torch.Tensor | None = None,
        cf_model: Any = None,
    ) -> torch.Tensor:
        """The batch loss. ``target_rows`` [B]: code-table row of the example's target item, -1 for examples
        that keep plain CE; ``scid_start`` [B]: index in ``labels`` of the first SCID response token (the L
        SCID tokens follow contiguously); ``cf_logits`` [B, n_cf]: CF item logits of each example's history
        (rows of plain-CE examples are ignored). ``dist`` [B, L, V], when given, is ``target_distribution``
        computed beforehand (once per example, as the SFT trainer does) and replaces ``cf_logits``.
        ``history_rows`` / ``history_starts`` [B, H] (``positions: all_labelled`` only; see `history_targets`)
        add the labelled history SCIDs of the prompts, their labels from ``cf_model`` (the frozen SASRec)."""
        device = logits.device
        if self.codes.device != device:
            return self.to(device).loss(logits, labels, target_rows, scid_start, cf_logits, num_items_in_batch, dist,
                                        history_rows, history_starts, cf_model)
        if (history_rows is None) != (history_starts is None):
            raise ValueError("tca4rec: give history_rows and history_starts together")
        if history_rows is not None and self.positions != "all_labelled":
            raise ValueError(f"tca4rec: history positions given but tca4rec.positions={self.positions!r}")
        target_rows, scid_start = target_rows.to(device), scid_start.to(device)
        active = (target_rows >= 0).nonzero().squeeze(1)
        levels, size = self.codes.shape[1], self.level_token_ids.shape[1]
        positions = torch.full((logits.shape[0], levels), -1, dtype=torch.long, device=device)
        target_codes = torch.zeros((logits.shape[0], levels), dtype=torch.long, device=device)
        labels_dist = torch.zeros((logits.shape[0], levels, size), device=device)
        if active.numel():
            if (scid_start[active] < 1).any():
                raise ValueError("scid_start must be >= 1 for every example with a target row")
            positions[active] = scid_start[active].unsqueeze(1) + torch.arange(levels, device=device)
            target_codes[active] = self.codes[target_rows[active]]
            if dist is not None:
                if dist.shape != (logits.shape[0], levels, size):
                    raise ValueError(f"dist must be [B={logits.shape[0]}, L={levels}, V={size}], got {tuple(dist.shape)}")
                labels_dist[active] = dist.to(device)[active].float()
            else:
                cf = None if cf_logits is None else cf_logits.to(device)[active]
                labels_dist[active] = self.target_distribution(target_rows[active], cf)
        if history_rows is None:
            return tca4rec_causal_lm_loss(
                logits, labels, positions, target_codes, labels_dist, self.level_token_ids, self.alpha, self.variant,
                num_items_in_batch,
            )
        h_example, h_positions, h_codes, h_dist = self.history_targets(history_rows, history_starts, cf_model)
        return tca4rec_items_loss(
            logits, labels, torch.cat([active, h_example]), torch.cat([positions[active], h_positions]),
            torch.cat([target_codes[active], h_codes]), torch.cat([labels_dist[active], h_dist.float()]),
            self.level_token_ids, self.alpha, self.variant, num_items_in_batch,
        )
