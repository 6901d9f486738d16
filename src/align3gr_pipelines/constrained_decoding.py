"""Exact, vectorized constrained beam search over a catalogue of SCIDs.

Every item (or user) SCID is a fixed-length row of token ids. The catalogue is stored as a prefix trie
with one CSR table per level: the distinct prefixes of length j are the level-j nodes, numbered in
lexicographic order, so the children of a node are a contiguous run of level-(j+1) nodes, sorted by
token. At each decoding step a beam's allowed next tokens are a slice of that run, fetched for all
beams at once with tensor indexing; there is no Python callback per beam or per step, and a beam can
only ever spell a real catalogue entry.

Scores are sums of the model's (unconstrained) log-probabilities of the SCID tokens, which is the
sequence log-probability a brute-force ranking of every item would use; with a beam at least as wide
as the catalogue the search is exhaustive and therefore equals that ranking.

The prompt is encoded once per user (left-padded batches, KV cache; HF `generate` runs it once per beam).
For Llama-family models the beams then share that single cache row: each step appends the beams' tokens
as one block with a 4-D "tree" attention mask (a beam token sees the prompt and its own ancestors only),
so the prompt's keys/values are never replicated or reordered. Other architectures replicate the cache
per beam (`attention="expand"`); both paths give the same result (tested).
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from align3gr_pipelines.scid import split_tokens


@dataclass
class SCIDCatalog:
    """A catalogue of fixed-length SCIDs as a per-level prefix trie (CSR tables, all LongTensors).

    Level j (0 <= j < L) holds the distinct prefixes of length j (level 0: the single empty prefix).
    - ``token_ids[n, :]``: entry n's SCID token ids, in ``item_ids`` order;
    - ``item_prefix_node[n, j]``: the level-j node of entry n's prefix y_<j (column 0 is all zeros), so
      "entries whose SCID starts with the prefix of node p" is ``item_prefix_node[:, j] == p``;
    - ``child_start[j][p]``, ``child_count[j][p]``: the children of level-j node p are the level-(j+1)
      nodes ``child_start[j][p] + range(child_count[j][p])``;
    - ``node_token[j][m]``: the last token of level-(j+1) node m (the token that leads to it);
    - ``leaf_item[m]``: the entry index of a full-length node m (level L).
    """

    item_ids: list[str]
    token_ids: torch.Tensor
    item_prefix_node: torch.Tensor
    child_start: list[torch.Tensor]
    child_count: list[torch.Tensor]
    node_token: list[torch.Tensor]
    leaf_item: torch.Tensor
    scid_strings: list[str] | None = None
    max_children: list[int] = field(default_factory=list)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_levels(self) -> int:
        return int(self.token_ids.shape[1])

    def __len__(self) -> int:
        return self.n_items

    @classmethod
    def from_token_ids(
        cls, item_token_ids: torch.Tensor, item_ids: Sequence[str], scid_strings: Sequence[str] | None = None
    ) -> "SCIDCatalog":
        """Build the trie from one row of token ids per entry; rows must be unique and equally long."""
        tok = torch.as_tensor(item_token_ids, dtype=torch.long).cpu()
        if tok.ndim != 2 or tok.shape[0] == 0 or tok.shape[1] == 0:
            raise ValueError(f"SCIDCatalog: item_token_ids must be a non-empty LongTensor[n_items, L], got shape {tuple(tok.shape)}")
        if len(item_ids) != tok.shape[0]:
            raise ValueError(f"SCIDCatalog: {len(item_ids)} item_ids for {tok.shape[0]} token rows")
        if (tok < 0).any():
            raise ValueError("SCIDCatalog: negative token ids in item_token_ids")
        n, n_levels = tok.shape

        # inverse[j][n] = level-j node of entry n; torch.unique sorts rows lexicographically, which is what
        # makes every node's children a contiguous, token-sorted run at the next level.
        inverse = [torch.zeros(n, dtype=torch.long)]
        uniq_rows = [tok[:1, :0]]
        for j in range(1, n_levels + 1):
            rows, inv = torch.unique(tok[:, :j], dim=0, return_inverse=True)
            uniq_rows.append(rows)
            inverse.append(inv)
        if uniq_rows[-1].shape[0] != n:
            counts = torch.bincount(inverse[-1])
            dup = [item_ids[i] for i in torch.nonzero(counts[inverse[-1]] > 1).flatten()[:6].tolist()]
            raise ValueError(
                f"SCIDCatalog: {n - uniq_rows[-1].shape[0]} duplicate SCID rows (e.g. ids {dup}); "
                "item SCIDs must be unique (use dedupe=True for user SCIDs, which may collide)"
            )

        child_start, child_count, node_token, max_children = [], [], [], []
        for j in range(n_levels):
            n_parent, n_child = uniq_rows[j].shape[0], uniq_rows[j + 1].shape[0]
            parent = torch.empty(n_child, dtype=torch.long)
            parent[inverse[j + 1]] = inverse[j]
            count = torch.bincount(parent, minlength=n_parent)
            child_start.append(torch.cumsum(count, 0) - count)
            child_count.append(count)
            node_token.append(uniq_rows[j + 1][:, j].contiguous())
            max_children.append(int(count.max()))
        leaf_item = torch.empty(n, dtype=torch.long)
        leaf_item[inverse[-1]] = torch.arange(n)
        return cls(
            item_ids=[str(i) for i in item_ids],
            token_ids=tok,
            item_prefix_node=torch.stack(inverse[:n_levels], dim=1),
            child_start=child_start,
            child_count=child_count,
            node_token=node_token,
            leaf_item=leaf_item,
            scid_strings=list(scid_strings) if scid_strings is not None else None,
            max_children=max_children,
        )

    @classmethod
    def from_scids(cls, scids: pd.DataFrame, tokenizer: Any, dedupe: bool = False) -> "SCIDCatalog":
        """From an `item_scids` / `user_scids` table (id, codes, tokens) and the LM's tokenizer.

        User SCIDs may collide: with ``dedupe=True`` the catalogue holds each distinct SCID once and its
        ``item_ids`` are the SCID token strings (what a user-SCID generation is compared against).
        """
        for col in ("id", "tokens"):
            if col not in scids.columns:
                raise ValueError(f"SCIDCatalog.from_scids: the SCID table has no {col!r} column (columns: {list(scids.columns)})")
        if len(scids) == 0:
            raise ValueError("SCIDCatalog.from_scids: the SCID table is empty")
        strings = [str(t) for t in scids["tokens"]]
        if dedupe:
            strings = list(dict.fromkeys(strings))
            ids = strings
        else:
            ids = [str(i) for i in scids["id"]]
        rows = [split_tokens(s) for s in strings]
        lengths = {len(r) for r in rows}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"SCIDCatalog.from_scids: 'tokens' must hold the same number (>0) of SCID tokens per row, got lengths {sorted(lengths)[:5]}")
        flat = [t for r in rows for t in r]
        token_ids = tokenizer.convert_tokens_to_ids(flat)
        unk = getattr(tokenizer, "unk_token_id", None)
        missing = sorted({t for t, i in zip(flat, token_ids) if i is None or (unk is not None and i == unk)})
        if missing:
            raise KeyError(f"SCIDCatalog.from_scids: {len(missing)} SCID tokens are not in the tokenizer vocabulary, e.g. {missing[:5]}")
        tok = torch.tensor(token_ids, dtype=torch.long).view(len(rows), -1)
        return cls.from_token_ids(tok, ids, scid_strings=strings)

    def to(self, device: torch.device | str) -> "SCIDCatalog":
        """The same catalogue with its tables on ``device`` (self if already there)."""
        device = torch.device(device)
        if self.leaf_item.device == device:
            return self
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return SCIDCatalog(
            self.item_ids, self.token_ids.to(device), self.item_prefix_node.to(device), move(self.child_start),
            move(self.child_count), move(self.node_token), self.leaf_item.to(device), self.scid_strings, self.max_children,
        )

    # ---- prefix lookups (used by decoding, self-play bucketing and TCA4Rec) ----

    def children(self, level: int, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For level-``level`` nodes of any shape S (-1 = none): (child node ids, child tokens, valid), each
        S + [max_children]; invalid slots hold node 0 / token 0 and valid=False."""
        safe = nodes.clamp(min=0)
        start = self.child_start[level].to(nodes.device)[safe]
        count = self.child_count[level].to(nodes.device)[safe].masked_fill(nodes < 0, 0)
        offs = torch.arange(self.max_children[level], device=nodes.device)
        valid = offs < count.unsqueeze(-1)
        child = torch.where(valid, start.unsqueeze(-1) + offs, torch.zeros((), dtype=torch.long, device=nodes.device))
        token = self.node_token[level].to(nodes.device)[child]
        return child, token, valid

    def prefix_nodes(self, prefix_token_ids: torch.Tensor) -> torch.Tensor:
        """Level-j node of each prefix row (LongTensor[B, j] of token ids) → LongTensor[B]; -1 where no entry
        starts with that prefix."""
        prefix = torch.as_tensor(prefix_token_ids, dtype=torch.long)
        node = torch.zeros(prefix.shape[0], dtype=torch.long, device=prefix.device)
        for level in range(prefix.shape[1]):
            child, token, valid = self.children(level, node)
            hit = valid & (token == prefix[:, level : level + 1])
            found = child.gather(-1, hit.float().argmax(-1, keepdim=True)).squeeze(-1)
            node = torch.where(hit.any(-1) & (node >= 0), found, torch.full_like(found, -1))
        return node

    def items_with_prefix(self, prefix_token_ids: torch.Tensor) -> torch.Tensor:
        """BoolTensor[B, n_items]: which entries' SCIDs start with each prefix row (LongTensor[B, j])."""
        prefix = torch.as_tensor(prefix_token_ids, dtype=torch.long)
        j = prefix.shape[1]
        if j == 0:
            return torch.ones(prefix.shape[0], self.n_items, dtype=torch.bool)
        if j > self.n_levels:
            raise ValueError(f"prefix of length {j} is longer than the SCIDs ({self.n_levels} levels)")
        node = self.prefix_nodes(prefix.to(self.leaf_item.device))
        if j == self.n_levels:  # full SCIDs: the leaf is the entry itself
            out = torch.zeros(prefix.shape[0], self.n_items, dtype=torch.bool, device=node.device)
            ok = node >= 0
            out[torch.nonzero(ok).flatten(), self.leaf_item[node[ok]]] = True
            return out
        return (self.item_prefix_node[:, j].unsqueeze(0) == node.unsqueeze(1)) & (node.unsqueeze(1) >= 0)

    def allowed_token_mask(self, level: int, nodes: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Dense BoolTensor[..., vocab_size] of allowed next tokens for level-``level`` nodes (for a
        LogitsProcessor); decoding itself gathers only the children and never builds this."""
        _, token, valid = self.children(level, nodes)
        # Empty slots write into a spare last column, so they can never clear a real token's bit.
        mask = torch.zeros(*nodes.shape, vocab_size + 1, dtype=torch.bool, device=nodes.device)
        mask.scatter_(-1, token.masked_fill(~valid, vocab_size), True)
        return mask[..., :vocab_size]

    def is_valid(self, token_rows: torch.Tensor) -> torch.Tensor:
        """BoolTensor[B]: whether each full token row is a catalogue entry."""
        rows = torch.as_tensor(token_rows, dtype=torch.long)
        if rows.shape[-1] != self.n_levels:
            return torch.zeros(rows.shape[0], dtype=torch.bool)
        return self.prefix_nodes(rows) >= 0

    def index_of_tokens(self, token_rows: torch.Tensor) -> torch.Tensor:
        """Entry index of each full token row (LongTensor[B, L]); -1 for rows not in the catalogue."""
        leaf = self.prefix_nodes(torch.as_tensor(token_rows, dtype=torch.long).to(self.leaf_item.device))
        return torch.where(leaf >= 0, self.leaf_item[leaf.clamp(min=0)], torch.full_like(leaf, -1))


# ---- model plumbing ----


def _base_forward_params(model: Any) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(base.forward).parameters)


def cache_argument(model: Any) -> str:
    """The forward argument that takes a KV cache: transformers >= 5.24 calls it ``cache`` and deprecates
    ``past_key_values`` (removed in 5.40); earlier 5.x releases only know ``past_key_values``."""
    return "cache" if "cache" in _base_forward_params(model) else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache (a transformers ``Cache`` object) a forward with ``use_cache=True`` returned, read under the
    field name of the installed release, so no deprecated alias is touched."""
    return out["cache"] if "cache" in out.keys() else out["past_key_values"]


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        if p:
            ids[r, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def _reorder(past: Any, index: torch.Tensor) -> Any:
    past.reorder_cache(index)  # transformers 5 always returns a Cache object (DynamicCache for our models)
    return past


class _Stepper:
    """Runs the prompt once, then feeds tokens after it, keeping attention mask and positions right under
    left padding. ``advance`` grows beams by replicating the prompt's KV cache once per beam (works for
    any causal LM with a cache)."""

    def __init__(self, model: Any):
        self.model = model
        self.keep_last = "logits_to_keep" in _base_forward_params(model)
        self.cache_arg = cache_argument(model)

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.mask = mask
        self.next_pos = mask.sum(-1, keepdim=True)
        self.n_beams = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        kw = {"logits_to_keep": 1} if self.keep_last else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        self.past = output_cache(out)
        return torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)

    def select(self, rows: torch.Tensor) -> None:
        """Keep cache rows ``rows`` (beam reordering / expansion)."""
        self.past = _reorder(self.past, rows)
        self.mask = self.mask.index_select(0, rows)
        self.next_pos = self.next_pos.index_select(0, rows)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` [R, t] (t >= 1) after the cache; log-probs [R, t, V] of what follows each."""
        t = tokens.shape[1]
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], t)], dim=1)
        pos = self.next_pos + torch.arange(t, device=tokens.device)
        self.next_pos = self.next_pos + t
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=pos, use_cache=True, **{self.cache_arg: self.past})
        self.past = output_cache(out)
        return torch.log_softmax(out.logits.float(), dim=-1)

    def advance(self, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """New beams [b, k]: beam ``parent`` of the previous step extended by ``tokens``; log-probs [b, k, V]."""
        b, k = tokens.shape
        base = torch.arange(b, device=tokens.device).unsqueeze(1) * self.n_beams
        self.select((base + parent).flatten())
        self.n_beams = k
        return self.step(tokens.reshape(-1, 1))[:, -1, :].view(b, k, -1)


class _TreeStepper(_Stepper):
    """Keeps one KV-cache row per prompt: each step appends the k beams' tokens as one block, and a 4-D
    attention mask lets every beam token see only the prompt and its own ancestors (tree attention).
    The prompt's keys/values are never copied per beam, so the cost per step is the beams' tokens only."""

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logp = super().prefill(ids, mask)
        self.prompt_keys = mask.bool()
        self.ancestors = torch.zeros(ids.shape[0], 1, 0, dtype=torch.bool, device=ids.device)
        self.level = 0
        return logp

    def advance(self, parent: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        b, k = tokens.shape
        seen = self.ancestors.gather(1, parent.unsqueeze(-1).expand(-1, -1, self.ancestors.shape[-1]))
        self_pos = torch.eye(k, dtype=torch.bool, device=tokens.device).expand(b, k, k)
        self.ancestors = torch.cat([seen, self_pos], dim=-1)
        visible = torch.cat([self.prompt_keys.unsqueeze(1).expand(b, k, -1), self.ancestors], dim=-1)
        dtype = next(self.model.parameters()).dtype
        bias = torch.zeros(visible.shape, dtype=dtype, device=tokens.device).masked_fill_(~visible, torch.finfo(dtype).min)
        pos = (self.next_pos + self.level).expand(b, k)  # siblings share a position: each is the next token
        self.level += 1
        out = self.model(
            input_ids=tokens, attention_mask=bias.unsqueeze(1), position_ids=pos, use_cache=True, **{self.cache_arg: self.past}
        )
        self.past = output_cache(out)
        return torch.log_softmax(out.logits.float(), dim=-1)


# Architectures whose attention honours a custom 4-D mask with explicit position ids (checked by tests
# against the replicated-cache path); anything else uses the replicated cache.
TREE_ATTENTION_MODEL_TYPES = frozenset({"llama"})


def _use_tree(model: Any, attention: str) -> bool:
    if attention not in ("auto", "tree", "expand"):
        raise ValueError(f"attention must be 'auto', 'tree' or 'expand', got {attention!r}")
    if attention != "auto":
        return attention == "tree"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    # flash-attention kernels take no arbitrary 4-D mask
    kernel = getattr(config, "_attn_implementation", None) or "sdpa"
    return getattr(config, "model_type", None) in TREE_ATTENTION_MODEL_TYPES and kernel in ("sdpa", "eager")


def _batches(prompt_ids: list[list[int]], batch_size: int) -> list[list[int]]:
    # Similar lengths together keeps left padding (wasted compute) small.
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _check_inputs(prompt_ids: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [list(map(int, p)) for p in prompt_ids]
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"empty prompts at positions {empty[:5]}: decoding needs at least one prompt token (e.g. BOS)")
    return prompts


def _pad_id(model: Any, pad_token_id: int | None) -> int:
    if pad_token_id is not None:
        return int(pad_token_id)
    cfg = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(cfg, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0  # any id works: padded positions are masked out


@torch.no_grad()
def constrained_beam_search(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    catalog: SCIDCatalog,
    beam_width: int = 20,
    top_k: int = 20,
    batch_size: int = 16,
    pad_token_id: int | None = None,
    show_progress: bool = False,
    attention: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_k`` catalogue entries per prompt by beam search restricted to the catalogue's SCIDs.

    Returns (item_index LongTensor[B, top_k], score FloatTensor[B, top_k]) on CPU, best first: indices
    into ``catalog.item_ids`` and the sums of the SCID tokens' log-probabilities; -1 / -inf where fewer
    than top_k entries exist. Beams hold distinct prefixes, so the returned entries are distinct. A
    top_k above beam_width widens the beam to top_k, so top_k entries come back whenever the catalogue
    has that many. With beam_width >= n_items the search is exhaustive (exact ranking of every entry).
    ``attention``: "tree" (one KV-cache row per prompt, beams as masked token blocks), "expand" (the
    cache replicated per beam, any causal LM) or "auto" (tree for architectures in
    TREE_ATTENTION_MODEL_TYPES).
    """
    if beam_width < 1 or top_k < 1:
        raise ValueError(f"beam_width and top_k must be >= 1, got {beam_width}, {top_k}")
    prompts = _check_inputs(prompt_ids, batch_size)
    beam_width = max(beam_width, top_k)
    device = _model_device(model)
    pad = _pad_id(model, pad_token_id)
    catalog = catalog.to(device)
    n_levels = catalog.n_levels
    leaf_item = catalog.leaf_item
    out_items = torch.full((len(prompts), top_k), -1, dtype=torch.long)
    out_scores = torch.full((len(prompts), top_k), float("-inf"))
    was_training = getattr(model, "training", False)
    model.eval()
    stepper = _TreeStepper(model) if _use_tree(model, attention) else _Stepper(model)
    batches = _batches(prompts, batch_size)
    for rows in tqdm(batches, desc="constrained beam search", disable=not show_progress):
        ids, mask = _left_pad([prompts[i] for i in rows], pad, device)
        b = len(rows)
        logp = stepper.prefill(ids, mask).unsqueeze(1)  # [b, beams=1, V]
        nodes = torch.zeros(b, 1, dtype=torch.long, device=device)
        scores = torch.zeros(b, 1, device=device)
        for level in range(n_levels):
            child, token, valid = catalog.children(level, nodes)  # [b, w, C]
            cand = scores.unsqueeze(-1) + logp.gather(-1, token)
            cand = cand.masked_fill(~valid, float("-inf")).flatten(1)
            valid = valid.flatten(1)
            # Never keep more beams than there are live candidates: dead beams would only cost forwards.
            k = min(beam_width, int(valid.sum(-1).max()))
            # Rank valid slots by score, and all of them above invalid slots, even a valid -inf.
            big = torch.finfo(cand.dtype).max
            rank_key = torch.where(valid, cand.nan_to_num(nan=-big, neginf=-big), torch.full_like(cand, float("-inf")))
            pick = torch.topk(rank_key, k, dim=-1).indices
            keep = valid.gather(-1, pick)
            scores = cand.gather(-1, pick).masked_fill(~keep, float("-inf"))
            nodes = child.flatten(1).gather(-1, pick).masked_fill(~keep, -1)
            if level == n_levels - 1:
                break
            parent = pick // child.shape[2]  # the beam each kept candidate extends
            logp = stepper.advance(parent, token.flatten(1).gather(-1, pick))
        k = nodes.shape[1]
        items = torch.where(nodes >= 0, leaf_item[nodes.clamp(min=0)], torch.full_like(nodes, -1))
        n_out = min(k, top_k)
        rows_t = torch.as_tensor(rows)
        out_items[rows_t, :n_out] = items[:, :n_out].cpu()
        out_scores[rows_t, :n_out] = scores[:, :n_out].float().cpu()
    if was_training:
        model.train()
    return out_items, out_scores


@torch.no_grad()
def item_logprobs(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    catalog: SCIDCatalog,
    candidates: torch.Tensor | None = None,
    batch_size: int = 8,
    chunk_size: int = 512,
    pad_token_id: int | None = None,
    show_progress: bool = False,
) -> torch.Tensor:
    """Sequence log-probability (sum over SCID tokens) of candidate entries after each prompt.

    ``candidates``: LongTensor[B, C] of catalogue indices (-1 = none → -inf), or None for every entry
    ([B, n_items]). The prompt is run once; each chunk of candidates reuses its KV cache.
    """
    prompts = _check_inputs(prompt_ids, batch_size)
    if candidates is None:
        candidates = torch.arange(catalog.n_items).expand(len(prompts), -1)
    candidates = torch.as_tensor(candidates, dtype=torch.long)
    if candidates.ndim != 2 or candidates.shape[0] != len(prompts):
        raise ValueError(f"candidates must be LongTensor[{len(prompts)}, C], got shape {tuple(candidates.shape)}")
    if (candidates >= catalog.n_items).any():
        raise ValueError(f"candidate indices must be < n_items={catalog.n_items}")
    device = _model_device(model)
    pad = _pad_id(model, pad_token_id)
    out = torch.full(candidates.shape, float("-inf"))
    n_cand = candidates.shape[1]
    if n_cand == 0:
        return out
    was_training = getattr(model, "training", False)
    model.eval()
    stepper = _Stepper(model)
    catalog = catalog.to(device)
    tok_table = catalog.token_ids
    for rows in tqdm(_batches(prompts, batch_size), desc="item log-probs", disable=not show_progress):
        ids, mask = _left_pad([prompts[i] for i in rows], pad, device)
        b = len(rows)
        first = stepper.prefill(ids, mask)  # [b, V]
        base_past, base_mask, base_pos = stepper.past, stepper.mask, stepper.next_pos
        cand = candidates[torch.as_tensor(rows)].to(device)
        for s in range(0, n_cand, max(1, chunk_size // b)):
            c = cand[:, s : s + max(1, chunk_size // b)]  # [b, c]
            width = c.shape[1]
            tok = tok_table[c.clamp(min=0)]  # [b, c, L]
            lp = first.unsqueeze(1).expand(-1, width, -1).gather(-1, tok[:, :, :1]).squeeze(-1)
            if catalog.n_levels > 1:
                stepper.past, stepper.mask, stepper.next_pos = copy.deepcopy(base_past), base_mask, base_pos
                stepper.select(torch.arange(b, device=device).repeat_interleave(width))
                follow = stepper.step(tok[:, :, :-1].reshape(b * width, -1))  # [b*c, L-1, V]
                lp = lp + follow.gather(-1, tok[:, :, 1:].reshape(b * width, -1, 1)).squeeze(-1).sum(-1).view(b, width)
            lp = lp.masked_fill(c < 0, float("-inf"))
            out[torch.as_tensor(rows).unsqueeze(1), torch.arange(s, s + width).unsqueeze(0)] = lp.float().cpu()
    if was_training:
        model.train()
    return out


def decode_prompts(
    rec_lm: Any, prompts: Sequence[str], catalog: SCIDCatalog, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """`constrained_beam_search` on text prompts of a RecLM, tokenized exactly as in training."""
    from align3gr_pipelines.rec_lm import encode_prompt

    tok = rec_lm.tokenizer
    ids = [encode_prompt(tok, p) for p in prompts]
    kwargs.setdefault("pad_token_id", tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return constrained_beam_search(rec_lm.model, ids, catalog, **kwargs)


def generate_scids(rec_lm: Any, prompts: Sequence[str], catalog: SCIDCatalog, **kwargs: Any) -> list[str | None]:
    """The best catalogue SCID (token string) per text prompt, e.g. B2's user text → user SCID over a
    `SCIDCatalog.from_scids(user_scids, tok, dedupe=True)`; None where the catalogue is empty."""
    kwargs.setdefault("top_k", 1)
    idx, _ = decode_prompts(rec_lm, prompts, catalog, **kwargs)
    names = catalog.scid_strings if catalog.scid_strings is not None else catalog.item_ids
    return [names[i] if i >= 0 else None for i in idx[:, 0].tolist()]
