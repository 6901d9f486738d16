"""Where tokenization's torch models run: ``device: auto`` picks CUDA when present (see ``rec_lm.pick_device``),
and bf16 autocast is used on a GPU that supports it."""
from __future__ import annotations

import contextlib

import torch

from align3gr_pipelines.rec_lm import pick_device


def resolve_device(setting: str | torch.device | None) -> torch.device:
    """'auto' / None -> cuda, then mps, then cpu; anything else as given ('cpu', 'cuda', 'cuda:1')."""
    return pick_device(None if setting is None else str(setting))


def bf16_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device with bf16 support, else nothing (CPU runs stay exact fp32)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
