"""SASRec (Kang & McAuley, 2018): causal self-attention over a user's item sequence, next item by dot product
with the item table.

It plays two parts: the tokenizer's frozen collaborative encoder (item CF embedding = its row of the item
table, user CF embedding = the hidden state at the user's last training position) and evaluation's SASRec
baselines. Item index 0 is padding; item ``item_ids[j]`` has index ``j + 1``.

Two training losses (``fit_sasrec(loss=...)``): ``ce``, the full softmax over the catalogue at every position
(the stronger model, and the default), and ``bce``, binary cross-entropy against one uniformly sampled
negative per position, as in the original paper and the LETTER / LC-Rec / TIGER baselines.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

CONFIG_FILE = "sasrec_config.json"
WEIGHTS_FILE = "model.safetensors"
LOSSES = ("ce", "bce")
ARCHITECTURE = ("hidden_dim", "n_layers", "n_heads", "max_len", "dropout")


class _Block(nn.Module):
    """Pre-norm transformer block; the feed-forward keeps width d as in the original SASRec."""

    def __init__(self, dim: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, -1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.ff(self.ln2(x)))


class SASRec(nn.Module):
    def __init__(
        self,
        item_ids: Sequence[str],
        hidden_dim: int = 64,
        n_layers: int = 2,
        n_heads: int = 1,
        max_len: int = 20,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if hidden_dim % n_heads:
            raise ValueError(f"SASRec: hidden_dim={hidden_dim} must be divisible by n_heads={n_heads}")
        self.item_ids = [str(i) for i in item_ids]
        if len(set(self.item_ids)) != len(self.item_ids):
            raise ValueError("SASRec: item_ids contain duplicates")
        self.item_index = {item: j + 1 for j, item in enumerate(self.item_ids)}
        self.config = dict(hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, max_len=max_len, dropout=dropout)
        self.max_len = max_len
        self.item_emb = nn.Embedding(len(self.item_ids) + 1, hidden_dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden_dim)
        self.blocks = nn.ModuleList(_Block(hidden_dim, n_heads, dropout) for _ in range(n_layers))
        self.ln = nn.LayerNorm(hidden_dim)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.item_emb.weight, std=hidden_dim**-0.5)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    # --- model -------------------------------------------------------------------------------------------
    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: LongTensor [B, T] of item indices, left-padded with 0 -> hidden states [B, T, d]."""
        b, t = seq.shape
        real = seq > 0
        x = self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim)
        x = self.drop(x + self.pos_emb(torch.arange(self.max_len - t, self.max_len, device=seq.device)))
        causal = torch.ones(t, t, dtype=torch.bool, device=seq.device).tril()
        # A pad query may attend to itself only: no row of the mask is empty, so no NaN.
        allowed = causal & (real[:, None, :] | torch.eye(t, dtype=torch.bool, device=seq.device))
        for block in self.blocks:
            x = block(x, allowed[:, None])
        return self.ln(x)

    def item_embeddings(self) -> torch.Tensor:
        """[n_items, d] in ``item_ids`` order."""
        return self.item_emb.weight[1:]

    def to_indices(self, histories: Sequence[Sequence[str]]) -> torch.Tensor:
        """Left-padded index matrix of the last ``max_len`` known items; unknown ids are dropped."""
        rows = [[self.item_index[str(i)] for i in h if str(i) in self.item_index][-self.max_len :] for h in histories]
        t = max(1, max((len(r) for r in rows), default=1))
        out = torch.zeros(len(rows), t, dtype=torch.long)
        for r, row in enumerate(rows):
            if row:
                out[r, t - len(row) :] = torch.tensor(row)
        return out

    @torch.no_grad()
    def encode(self, histories: Sequence[Sequence[str]], batch_size: int = 512) -> torch.Tensor:
        """User representation [B, d]: the hidden state at the last item of each history (zeros when empty)."""
        was_training = self.training
        self.eval()
        device = self.item_emb.weight.device
        out = []
        for start in range(0, len(histories), batch_size):
            seq = self.to_indices(histories[start : start + batch_size]).to(device)
            h = self(seq)[:, -1]
            out.append(torch.where((seq[:, -1] > 0)[:, None], h, torch.zeros_like(h)))
        self.train(was_training)
        d = self.item_emb.embedding_dim
        return torch.cat(out).float().cpu() if out else torch.zeros(0, d)

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[str]], batch_size: int = 512) -> torch.Tensor:
        """Next-item logits [B, len(item_ids)]; an empty history (after dropping unknown ids) gives all zeros."""
        users = self.encode(histories, batch_size).to(self.item_emb.weight.device)
        return (users @ self.item_embeddings().T).float().cpu()

    # --- persistence -------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps({"item_ids": self.item_ids, **self.config}))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "SASRec":
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"SASRec.from_pretrained: {path / CONFIG_FILE} not found")
        config = json.loads((path / CONFIG_FILE).read_text())
        model = cls(config.pop("item_ids"), **config)
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE), device=device))
        return model.to(device).eval()


# --- training data -------------------------------------------------------------------------------------------
def training_sequences(train_sequences: pd.DataFrame) -> dict[str, list[str]]:
    """Rebuild each user's chronological training sequence from the one-row-per-target table.

    Row (history, target, position) pins the target at ``position`` and the history at the positions right
    before it, so the union of a user's rows recovers every training item even when histories are truncated.
    """
    missing = {"user_id", "history", "target", "position"} - set(train_sequences.columns)
    if missing:
        raise ValueError(f"train_sequences: missing column(s) {sorted(missing)}; expected user_id, history, target, position")
    by_user: dict[str, dict[int, str]] = {}
    for user, history, target, position in zip(
        train_sequences["user_id"], train_sequences["history"], train_sequences["target"], train_sequences["position"]
    ):
        slots = by_user.setdefault(str(user), {})
        position = int(position)
        items = [str(i) for i in history] + [str(target)]
        for offset, item in enumerate(items):
            p = position - len(items) + 1 + offset
            if slots.setdefault(p, item) != item:
                raise ValueError(
                    f"train_sequences: user {user!r} has two different items at position {p} "
                    f"({slots[p]!r} and {item!r}); histories must be the items right before 'position'"
                )
    return {user: [slots[p] for p in sorted(slots)] for user, slots in by_user.items()}


def _windows(sequences: Sequence[Sequence[int]], max_len: int) -> list[list[int]]:
    """Cut each sequence, from its end, into windows of max_len + 1 items so every transition is trained once."""
    out = []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            out.append(list(seq[max(0, end - max_len - 1) : end]))
            end -= max_len
    return out


def _pad_left(rows: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        if row:
            out[r, width - len(row) :] = torch.tensor(row)
    return out


def sample_negatives(positives: torch.Tensor, n_items: int, generator: torch.Generator) -> torch.Tensor:
    """One negative per positive item index (1 … n_items), uniform over the n_items - 1 other items: a draw
    from 1 … n_items - 1 is shifted up by one at or above the positive. Drawn on the CPU with ``generator``
    (seeded), so a GPU run sees the same negatives."""
    draw = torch.randint(1, n_items, positives.shape, generator=generator).to(positives.device)
    return draw + (draw >= positives).long()


def ce_loss(model: SASRec, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full-softmax cross-entropy of each position's next item (h [N, d], labels [N] item indices)."""
    logits = h @ model.item_embeddings().T
    return F.cross_entropy(logits.float(), labels - 1)


def bce_loss(model: SASRec, h: torch.Tensor, labels: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Mean over positions of -log σ(s⁺) - log(1 - σ(s⁻)): the positive's and one sampled negative's score."""
    pos = (h * model.item_emb(labels)).sum(-1).float()
    neg = (h * model.item_emb(negatives)).sum(-1).float()
    return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros_like(neg)
    )


def build_sasrec(item_ids: Sequence[str], config: dict[str, Any]) -> SASRec:
    """A fresh SASRec with the architecture keys of ``config`` (hidden_dim, n_layers, n_heads, max_len, dropout)."""
    missing = [k for k in ARCHITECTURE if config.get(k) is None]
    if missing:
        raise KeyError(f"SASRec: missing architecture setting(s) {missing}; expected {list(ARCHITECTURE)}")
    return SASRec(
        item_ids, hidden_dim=int(config["hidden_dim"]), n_layers=int(config["n_layers"]),
        n_heads=int(config["n_heads"]), max_len=int(config["max_len"]), dropout=float(config["dropout"]),
    )


def fit_sasrec(
    model: SASRec,
    sequences: Sequence[Sequence[str]],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    seed: int = 0,
    eval_every: int = 0,
    evaluate: Callable[[SASRec], dict[str, float]] | None = None,
    device: str | torch.device = "cpu",
    loss: str = "ce",
) -> dict[str, Any]:
    """Next-item training at every position of every window, with ``loss`` ``ce`` (full softmax over the
    catalogue, `ce_loss`) or ``bce`` (one sampled negative per position, `bce_loss`).

    Returns ``{"curves": {...}, "scalars": {...}}``; ``evaluate(model)`` (e.g. valid recall) is logged every
    ``eval_every`` epochs and at the end, never used to pick a model.
    """
    from align3gr_pipelines.devices import bf16_autocast, resolve_device

    if loss not in LOSSES:
        raise ValueError(f"SASRec: loss must be one of {list(LOSSES)}, got {loss!r}")
    if loss == "bce" and len(model.item_ids) < 2:
        raise ValueError(f"SASRec: loss 'bce' needs >= 2 items (a negative other than the positive), got {len(model.item_ids)}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)  # on the CPU, so a GPU run sees the same batches
    device = resolve_device(device)
    model.to(device)
    idx = [[model.item_index[str(i)] for i in s if str(i) in model.item_index] for s in sequences]
    windows = _windows(idx, model.max_len)
    if not windows:
        raise ValueError("SASRec: no training sequence has two or more known items; check train_sequences")
    data = _pad_left(windows, model.max_len + 1).to(device)  # small: one copy, then only indexing
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    curves: dict[str, list[list[float]]] = {"sasrec_train_loss": []}
    step = 0
    for epoch in tqdm(range(1, epochs + 1), desc="SASRec", unit="epoch"):
        model.train()
        order = torch.randperm(len(data), generator=gen).to(device)
        # Loss sums stay on the device: one sync per epoch, not one per step.
        total = torch.zeros((), device=device)
        count = torch.zeros((), dtype=torch.long, device=device)
        for start in range(0, len(data), batch_size):
            batch = data[order[start : start + batch_size]]
            inputs, labels = batch[:, :-1], batch[:, 1:]
            mask = (inputs > 0) & (labels > 0)
            positives = labels[mask]
            with bf16_autocast(device):
                h = model(inputs)[mask]
                if loss == "ce":
                    batch_loss = ce_loss(model, h, positives)
                else:
                    batch_loss = bce_loss(model, h, positives, sample_negatives(positives, len(model.item_ids), gen))
            opt.zero_grad(set_to_none=True)
            batch_loss.backward()
            opt.step()
            step += 1
            n = mask.sum()
            total, count = total + batch_loss.detach() * n, count + n
        curves["sasrec_train_loss"].append([epoch, float(total / count.clamp(min=1))])
        if evaluate is not None and eval_every and (epoch % eval_every == 0 or epoch == epochs):
            for name, value in evaluate(model).items():
                curves.setdefault(f"sasrec_valid_{name}", []).append([epoch, float(value)])
    model.eval()
    scalars = {"sasrec_final_train_loss": curves["sasrec_train_loss"][-1][1], "sasrec_train_windows": float(len(data))}
    for name, points in curves.items():
        if name.startswith("sasrec_valid_"):
            scalars[name] = points[-1][1]
    return {"curves": curves, "scalars": scalars}


def recall_ndcg(model: SASRec, histories: Sequence[Sequence[str]], targets: Sequence[str], k: int = 10) -> dict[str, float]:
    """Full-ranking Recall@k and NDCG@k over the catalogue (history items are not masked out)."""
    if not len(targets):
        return {}
    logits = model.score(histories)
    target_idx = torch.tensor([model.item_index.get(str(t), 0) - 1 for t in targets])
    known = target_idx >= 0
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    hit = top == target_idx[:, None]
    rank = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(target_idx, -1))
    recall = (hit.any(1) & known).float().mean().item()
    ndcg = torch.where((rank >= 0) & known, 1.0 / torch.log2(rank.float() + 2.0), torch.zeros(len(rank))).mean().item()
    return {f"recall_at_{k}": recall, f"ndcg_at_{k}": ndcg}


def cf_item_table(model: SASRec, trained_items: set[str] | None = None) -> np.ndarray:
    """Item CF embeddings; items SASRec never saw in training get zeros (no collaborative signal), not noise."""
    table = model.item_embeddings().detach().float().cpu().numpy().copy()
    if trained_items is not None:
        unseen = np.array([i not in trained_items for i in model.item_ids])
        table[unseen] = 0.0
    return table.astype(np.float32)
