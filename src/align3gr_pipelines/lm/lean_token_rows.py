"""A forward for PEFT's trainable-token layers that never builds the merged [vocab, hidden] weight (issue 27).

PEFT's `TrainableTokensLayer` copies the whole frozen weight with its trainable rows written in, on every
forward, and the copy of the output layer stays in the autograd graph until the backward (which then makes a
dense gradient of that size). The SCID rows of a LoRA backbone (`lm.backbone`) sit on the input embedding
and, untied, the LM head, so each DPO forward holds up to two such copies: small next to a 7B model, the
largest allocation of a ~200M one. `lean_token_rows(model)` swaps, for the duration of a with-block, the
forward of every such layer it can handle for one that reads the frozen weight as it is and puts the
trainable rows in afterwards:

* an embedding: the frozen rows are looked up, then the positions holding one of the layer's token ids take
  that token's trainable row (the same values, bit for bit; the padding row gets no gradient, as in PEFT);
* a linear output layer: the frozen logits, whose columns of the layer's token ids are then replaced by the
  logits of the trainable rows (equal to float32 rounding).

A layer with several active adapters, merged or disabled adapters, or another kind of base layer keeps PEFT's
own forward (logged once); so does a call made once that no longer holds. The original forwards come back on
exit, also after an exception.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def _token_layers(model: nn.Module) -> list[nn.Module]:
    try:
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
    except ImportError:  # no PEFT, so no such layers
        return []

    return [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]


def _adapter_state_issue(layer: Any) -> str | None:
    """Why the layer's adapter state needs PEFT's forward now (None: the lean one applies)."""
    active = list(layer.active_adapters)
    if layer.disable_adapters:
        return "adapters disabled"
    if len(active) != 1:
        return f"{len(active)} active adapters"
    if layer.merged:
        return "adapter merged into the weight"
    if active[0] not in layer.trainable_tokens_delta:
        return f"no trainable rows for the active adapter {active[0]!r}"
    return None


def _layer_issue(layer: Any) -> str | None:
    """Why the lean forward cannot stand in for PEFT's on this layer (None: it can)."""
    issue = _adapter_state_issue(layer)
    if issue is not None:
        return issue
    base = layer.base_layer
    if isinstance(base, nn.Embedding):
        if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
            return "an embedding with max_norm, scale_grad_by_freq or sparse gradients"
    elif isinstance(base, nn.Linear):
        if base.bias is not None:
            return "a linear layer with a bias"  # PEFT's merged forward leaves it out; keep its behaviour as is
    else:
        return f"base layer of type {type(base).__name__}"
    indices = list(layer.token_indices[layer.active_adapters[0]])
    if len(set(indices)) != len(indices):
        return "repeated token indices"
    return None


def _embedding_forward(layer: Any, adapter: str) -> Callable[[torch.Tensor], torch.Tensor]:
    base: nn.Embedding = layer.base_layer
    indices = torch.as_tensor(list(layer.token_indices[adapter]), dtype=torch.long)
    # token id -> its row of the trainable table, -1 for the frozen ones
    slot_of = torch.full((base.num_embeddings,), -1, dtype=torch.long)
    slot_of[indices] = torch.arange(len(indices))
    slot_of = slot_of.to(base.weight.device)
    pad = base.padding_idx
    pad_slot = int(slot_of[pad]) if pad is not None and int(slot_of[pad]) >= 0 else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = base.weight
        rows = layer.trainable_tokens_delta[adapter].to(weight)
        slot = slot_of.to(x.device)[x]
        trained = F.embedding(slot.clamp(min=0), rows, padding_idx=pad_slot)
        out = torch.where((slot >= 0).unsqueeze(-1), trained, F.embedding(x, weight, padding_idx=pad))
        scale = layer._get_embed_scale()
        return out if scale is None else out * scale.to(out.dtype)

    return forward


def _linear_forward(layer: Any, adapter: str) -> Callable[[torch.Tensor], torch.Tensor]:
    base: nn.Linear = layer.base_layer
    indices = torch.as_tensor(list(layer.token_indices[adapter]), dtype=torch.long, device=base.weight.device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = base.weight
        out = F.linear(x, weight)
        trained = F.linear(x, layer.trainable_tokens_delta[adapter].to(weight))
        # In place on a fresh output (F.linear's backward does not need it): no second logits tensor.
        return out.index_copy_(out.dim() - 1, indices.to(out.device), trained)

    return forward


def _patched(layer: Any, adapter: str, name: str) -> Callable[..., torch.Tensor]:
    peft_forward = layer.forward
    make = _embedding_forward if isinstance(layer.base_layer, nn.Embedding) else _linear_forward
    lean = make(layer, adapter)
    warned = []

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        issue = "extra arguments" if args or kwargs else _adapter_state_issue(layer)
        if issue is None and layer.active_adapters[0] == adapter:
            return lean(x)
        if not warned:
            log.info("lean_token_rows: %s falls back to PEFT's forward on calls with %s (logged once)", name,
                     issue or "another active adapter")
            warned.append(True)
        return peft_forward(x, *args, **kwargs)

    return forward


@contextmanager
def lean_token_rows(model: nn.Module) -> Iterator[list[str]]:
    """Within the block, the trainable-token layers of ``model`` that it can handle run the lean forward
    (module docstring); yields the names of those layers. A model without such layers is left as it is."""
    names = {id(m): n for n, m in model.named_modules()}
    saved: list[tuple[Any, bool, Any]] = []  # layer, had its own forward attribute, that attribute
    lean: list[str] = []
    skipped: list[str] = []
    try:
        for layer in _token_layers(model):
            name = names.get(id(layer), type(layer).__name__)
            issue = _layer_issue(layer)
            if issue is not None:
                skipped.append(f"{name} ({issue})")
                continue
            saved.append((layer, "forward" in layer.__dict__, layer.__dict__.get("forward")))
            layer.forward = _patched(layer, layer.active_adapters[0], name)
            lean.append(name)
        if skipped:
            log.info("lean_token_rows: PEFT's own forward kept on %s", "; ".join(skipped))
        yield lean
    finally:
        for layer, had, forward in reversed(saved):
            if had:
                layer.forward = forward
            else:
                del layer.forward
