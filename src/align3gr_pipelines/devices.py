"""Where torch models run, shared by every level (the lowest module of the package): ``device: auto`` picks
CUDA when present, and bf16 autocast is used on a GPU that supports it."""
from __future__ import annotations

import contextlib

import torch


def pick_device(preferred: str | None = None) -> torch.device:
    """cuda if present, then mps, else cpu; `preferred` ('cpu', 'cuda', 'auto'/None) overrides."""
    if preferred and preferred != "auto":
        return torch.device(preferred)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(setting: str | torch.device | None) -> torch.device:
    """'auto' / None -> cuda, then mps, then cpu; anything else as given ('cpu', 'cuda', 'cuda:1')."""
    return pick_device(None if setting is None else str(setting))


def bf16_autocast(device: torch.device | str) -> contextlib.AbstractContextManager:
    """bf16 autocast on a CUDA device with bf16 support, else nothing (CPU runs stay exact fp32)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
