"""Where torch models run, shared by every level (the lowest module of the package): ``device: auto`` picks
CUDA when present, and bf16 autocast is used on a GPU that supports it.

`free_cores`: how many intra-op torch threads a CPU stage takes, i.e. the cores no other process is using now.

torch's threads spin at every op's barrier, so one thread that shares its core with another process stalls
them all: on the 2-core machines of this project the demo's SFT step took 208 ms with 2 threads and 365 ms with
1 when the machine was otherwise idle, and 565 ms with 2 while one other process kept a core busy (2026-12-04,
`sft_train.trainer.torch_threads`). So the count is read off the machine when a stage starts: the CPU time the
whole machine spent over a short window (/proc/stat), less this process's own (/proc/self/stat), is what other
processes use; the rest of the cores this process may run on are free.

Results do not depend on it for the models measured here (the demo's SFT picked the same checkpoint with the
same valid loss to the last bit on 1 and 2 threads), but a CPU matmul may sum in another order with another
thread count; an int setting pins it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path

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


log = logging.getLogger(__name__)

# A core counts as free when other processes use less than this fraction of it: a half-busy core still
# stalls a spinning thread.
FREE_BELOW = 0.2


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _machine_ticks() -> tuple[int, int, int]:
    """(busy, total, number of CPUs) of the machine since boot, from /proc/stat (clock ticks)."""
    lines = Path("/proc/stat").read_text().splitlines()
    fields = [int(v) for v in lines[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already inside user / nice
    n_cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    return total - idle, total, max(1, n_cpus)


def _own_ticks() -> int:
    """utime + stime of this process, all its threads (clock ticks)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def busy_elsewhere(window_s: float = 0.3) -> float | None:
    """Cores' worth of CPU other processes used over the next ``window_s`` seconds; None where /proc is not
    readable (not Linux)."""
    try:
        busy0, total0, n = _machine_ticks()
        own0 = _own_ticks()
        time.sleep(window_s)
        busy1, total1, _ = _machine_ticks()
        own1 = _own_ticks()
    except (OSError, ValueError, IndexError):
        return None
    per_cpu = (total1 - total0) / n
    if per_cpu <= 0:
        return None
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / per_cpu)


def free_cores(window_s: float = 0.3) -> int:
    """Threads for a CPU stage starting now: the usable cores less those other processes keep busy, at least 1.
    Without /proc: all usable cores but one (what `auto` meant before 2026-12-04)."""
    cores = usable_cores()
    others = busy_elsewhere(window_s)
    if others is None:
        return max(1, cores - 1)
    free = max(1, min(cores, math.floor(cores - others + FREE_BELOW)))
    log.info("cpu threads: %d of %d cores (other processes busy on %.1f)", free, cores, others)
    return free
