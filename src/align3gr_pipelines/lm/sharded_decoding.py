"""Constrained decoding across processes (issue 27 item 2).

Users are split into contiguous blocks, one per rank, so that concatenating the ranks' outputs in rank order
gives the rows in the caller's order; every rank decodes its block exactly as one process would (beam search
is per prompt), so the lists equal a single process's."""
from __future__ import annotations

import numpy as np


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """int64 row indices of rank `rank`'s contiguous block of `n` rows (sizes differ by at most one; a rank
    may get none when n < world_size)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"sharded decoding: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < 0:
        raise ValueError(f"sharded decoding: the number of rows must be >= 0, got {n}")
    return np.array_split(np.arange(int(n), dtype=np.int64), int(world_size))[int(rank)]
