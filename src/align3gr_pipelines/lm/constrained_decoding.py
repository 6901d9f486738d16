"""Exact, vectorized constrained beam search over a catalogue of SCIDs.

Every item (or user) SCID is a fixed-length row of token ids. The catalogue (`scid_catalog.SCIDCatalog`) is a prefix trie
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

``autocast`` (`lm.precision.autocast`): ``auto`` runs the forwards under bf16 autocast on a CUDA GPU and
unchanged (exact fp32 on a CPU) elsewhere; scores are accumulated in fp32 either way.
"""
from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from align3gr_pipelines.lm.precision import autocast as autocast_context
from align3gr_pipelines.lm.precision import check_autocast_setting, compute_dtype
from align3gr_pipelines.lm.scid_catalog import SCIDCatalog  # noqa: F401 (decoding's input type, imported from here too)

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
        dtype = compute_dtype(tokens.device, next(self.model.parameters()).dtype)
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
    autocast: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``top_k`` catalogue entries per prompt by beam search restricted to the catalogue's SCIDs.

    Returns (item_index LongTensor[B, top_k], score FloatTensor[B, top_k]) on CPU, best first: indices
    into ``catalog.item_ids`` and the sums of the SCID tokens' log-probabilities; -1 / -inf where fewer
    than top_k entries exist. Beams hold distinct prefixes, so the returned entries are distinct. A
    top_k above beam_width widens the beam to top_k, so top_k entries come back whenever the catalogue
    has that many. With beam_width >= n_items the search is exhaustive (exact ranking of every entry).
    ``attention``: "tree" (one KV-cache row per prompt, beams as masked token blocks), "expand" (the
    cache replicated per beam, any causal LM) or "auto" (tree for architectures in
    TREE_ATTENTION_MODEL_TYPES). ``autocast``: see the module docstring.
    """
    if beam_width < 1 or top_k < 1:
        raise ValueError(f"beam_width and top_k must be >= 1, got {beam_width}, {top_k}")
    check_autocast_setting(autocast, "constrained_beam_search: autocast")
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
    with autocast_context(autocast, device):
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
    autocast: str = "auto",
) -> torch.Tensor:
    """Sequence log-probability (sum over SCID tokens) of candidate entries after each prompt.

    ``candidates``: LongTensor[B, C] of catalogue indices (-1 = none → -inf), or None for every entry
    ([B, n_items]). The prompt is run once; each chunk of candidates reuses its KV cache. ``autocast``: see
    the module docstring.
    """
    check_autocast_setting(autocast, "item_logprobs: autocast")
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
    with autocast_context(autocast, device):
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
    from align3gr_pipelines.lm.rec_lm import encode_prompt

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
