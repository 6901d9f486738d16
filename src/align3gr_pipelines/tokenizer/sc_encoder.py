"""Semantic-collaborative (SC) encoders and the user-to-item alignment loss (Align3GR, Eq. 1).

A user-side and an item-side MLP map concat(semantic, CF) to unit-norm SC embeddings. Phase 1 of the
tokenizer trains them with a sampled softmax: each user must pick the item they interacted with among the
other items of the batch (and optionally extra random items), by cosine similarity over a temperature.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def sc_features(semantic: np.ndarray | torch.Tensor, cf: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """concat(semantic, CF), each part L2-normalised first so the CF table's scale cannot drown the text.

    A zero CF row (a user or item without training interactions) stays zero: it carries no CF signal.
    """
    parts = [torch.as_tensor(np.asarray(semantic), dtype=torch.float32)]
    if cf is not None:
        parts.append(torch.as_tensor(np.asarray(cf), dtype=torch.float32))
    return torch.cat([F.normalize(p, dim=-1) for p in parts], dim=-1)


class SCEncoder(nn.Module):
    """MLP -> unit-norm SC embedding (unit norm keeps the RQ-VAE from shrinking its target to zero)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)


class IdentitySC(nn.Module):
    """The 'no U2I alignment' ablation: the SC embedding is the concatenated features themselves."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def u2i_loss(
    user_sc: torch.Tensor,
    item_sc: torch.Tensor,
    item_index: torch.Tensor,
    temperature: float,
    neg_sc: torch.Tensor | None = None,
    neg_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled-softmax U2I loss: -mean_b log softmax_j(s(u_b, i_j) / T)[b] over the batch's items plus extras.

    user_sc, item_sc: [B, d], row b is an observed (user, item) pair; item_index [B] identifies the items so
    that another row's copy of the same positive item is not counted as a negative; neg_sc [N, d] with
    neg_index [N] are extra random negatives shared by the batch (also skipped where they equal the positive).
    """
    logits = user_sc @ item_sc.T / temperature
    same = item_index[:, None] == item_index[None, :]
    eye = torch.eye(len(item_index), dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    if neg_sc is not None and len(neg_sc):
        extra = (user_sc @ neg_sc.T / temperature).masked_fill(item_index[:, None] == neg_index[None, :], float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    return F.cross_entropy(logits, torch.arange(len(item_index), device=logits.device))


@torch.no_grad()
def sampled_auc(user_sc: torch.Tensor, pos_sc: torch.Tensor, neg_sc: torch.Tensor) -> float:
    """AUC over (held-out positive, sampled negative) pairs of the same user: P(s(u, pos) > s(u, neg)), ties 1/2.

    user_sc, pos_sc: [B, d]; neg_sc: [B, n_neg, d].
    """
    if len(user_sc) == 0:
        return float("nan")
    pos = (user_sc * pos_sc).sum(-1, keepdim=True)
    neg = torch.einsum("bd,bnd->bn", user_sc, neg_sc)
    return ((pos > neg).float() + 0.5 * (pos == neg).float()).mean().item()
