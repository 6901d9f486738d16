"""A catalogue of fixed-length SCIDs as a prefix trie, the structure constrained decoding walks.

Every item (or user) SCID is a fixed-length row of token ids. The distinct prefixes of length j are the
level-j nodes, numbered in lexicographic order, so the children of a node are a contiguous run of
level-(j+1) nodes, sorted by token: one CSR table per level, all LongTensors, so a beam's allowed next
tokens are a tensor slice.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from align3gr_pipelines.tokenizer.scid import split_tokens


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
