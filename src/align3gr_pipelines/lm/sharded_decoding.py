"""Constrained decoding across processes (issue 27 item 2): the lists and scores of one process, from N.

A decode is cut along the very batches one process would run (`constrained_decoding._batches`: prompts
sorted by length, ``batch_size`` a batch) and rank r of W decodes batches r, r + W, r + 2W, ... whole, with
the same `decode_prompts` call; the rows are then put back in the caller's order. Every batch keeps one
process's prompts, padding and shapes, so its results are bit for bit one process's on the same device,
dtype and number of threads (a CPU matmul's summation order may depend on the thread count). Whole batches
dealt round-robin also share the long prompts (the last batches) among the ranks.

Two ways in:

- `decode_prompts_sharded`, from one process (a Kedro node): ``nproc == 1`` is `decode_prompts`. Otherwise
  the model (`RecLM.save_pretrained`, loaded back in the dtype it has in memory), the prompts and the
  catalogue go to a temporary job directory, and ``torchrun --standalone --nproc_per_node=N -m
  align3gr_pipelines.lm.sharded_decoding JOB`` runs `_worker` on each rank (gloo on CPU, one thread a rank
  unless told otherwise; NCCL on CUDA, rank r on cuda:r) in its own process group, ended whole on a timeout
  or an error. Rank 0 writes the merged result to the job directory; the caller reads it, so only the
  caller (Kedro) ever writes catalog outputs.
- `decode_in_group`, inside an initialised process group (a torchrun rank): each rank decodes its batches
  and every rank gets the whole result (all_gather_object).

`shard_indices` (contiguous row blocks) is the split of other per-rank work (issue 27 item 3).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, _batches, decode_prompts
from align3gr_pipelines.lm.precision import check_dtype_setting
from align3gr_pipelines.lm.rec_lm import RecLM, encode_prompt
from align3gr_pipelines.torchrun import run_torchrun

MODULE = "align3gr_pipelines.lm.sharded_decoding"


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """int64 row indices of rank `rank`'s contiguous block of `n` rows (sizes differ by at most one; a rank
    may get none when n < world_size)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"sharded decoding: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < 0:
        raise ValueError(f"sharded decoding: the number of rows must be >= 0, got {n}")
    return np.array_split(np.arange(int(n), dtype=np.int64), int(world_size))[int(rank)]


def rank_rows(tokenizer: Any, prompts: Sequence[str], batch_size: int, rank: int, world_size: int) -> list[int]:
    """Positions of the prompts rank `rank` decodes: one process's batches rank, rank + W, ..., in that order
    (sorted by length, so `decode_prompts` on them forms exactly those batches again)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"sharded decoding: need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if int(batch_size) < 1:
        raise ValueError(f"sharded decoding: batch_size must be >= 1, got {batch_size}")
    batches = _batches([encode_prompt(tokenizer, p) for p in prompts], int(batch_size))
    return [i for batch in batches[rank::world_size] for i in batch]


def merge(parts: Sequence[tuple[list[int], torch.Tensor, torch.Tensor]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranks' (rows, items, scores) as one (items, scores) in row order 0..n-1."""
    rows = torch.as_tensor([i for r, _, _ in parts for i in r], dtype=torch.long)
    if not torch.equal(torch.sort(rows).values, torch.arange(n)):
        raise RuntimeError(f"sharded decoding: the ranks returned rows that are not each of 0..{n - 1} once")
    back = torch.argsort(rows)
    return torch.cat([p[1] for p in parts])[back], torch.cat([p[2] for p in parts])[back]


def decode_in_group(
    rec_lm: Any, prompts: Sequence[str], catalog: SCIDCatalog, *, batch_size: int = 16, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_prompts` shared by the ranks of the initialised default process group; every rank returns the
    whole result (the same tensors as one process). Without a group, or with one rank, it is
    `decode_prompts`. Under NCCL each rank must have set its CUDA device (torch.cuda.set_device)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decode_prompts(rec_lm, prompts, catalog, batch_size=batch_size, **kwargs)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = rank_rows(rec_lm.tokenizer, prompts, batch_size, rank, world)
    kwargs["show_progress"] = bool(kwargs.get("show_progress")) and rank == 0  # one bar, not one a rank
    items, scores = decode_prompts(rec_lm, [prompts[i] for i in rows], catalog, batch_size=batch_size, **kwargs)
    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (rows, items, scores))
    return merge(parts, len(prompts))


def decode_prompts_sharded(
    rec_lm: Any, prompts: Sequence[str], catalog: SCIDCatalog, *, nproc: int = 1, timeout_s: float | None = None,
    threads: int | None = None, work_dir: str | Path | None = None, where: str = "sharded decoding", **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_prompts(rec_lm, prompts, catalog, **kwargs)` (same tensors, dtypes and order) on ``nproc``
    torchrun ranks (module docstring); ``nproc == 1`` calls it in this process. ``timeout_s``: seconds before
    the ranks are ended (None: no limit); ``threads``: torch threads a rank (None: 1); ``work_dir``: where the
    temporary job directory goes (None: the system's); ``where``: the parameter block errors name."""
    if isinstance(nproc, bool) or not isinstance(nproc, (int, np.integer)) or nproc < 1:
        raise ValueError(f"{where}.nproc_per_node must be an integer >= 1, got {nproc!r}")
    if nproc == 1 or len(prompts) == 0:
        return decode_prompts(rec_lm, prompts, catalog, **kwargs)
    if timeout_s is not None and float(timeout_s) <= 0:
        raise ValueError(f"{where}.launch_timeout_s must be > 0 or null, got {timeout_s}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"{where}: threads per rank must be >= 1 or null, got {threads}")
    device = next(rec_lm.model.parameters()).device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: decoding across processes runs on cpu or cuda, the model is on {device}")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"{where}.nproc_per_node={nproc}: one rank a GPU, and {torch.cuda.device_count()} are visible")
    threads = int(threads or 1)
    with tempfile.TemporaryDirectory(prefix="sharded_decoding_", dir=work_dir, ignore_cleanup_errors=True) as tmp:
        job = Path(tmp)
        write_job(job, rec_lm, prompts, catalog, {"device": device.type, "threads": threads, "decode": kwargs}, where)
        run_torchrun(MODULE, job, nproc, timeout_s, f"{where}: torchrun", f"{where}.launch_timeout_s",
                     {"OMP_NUM_THREADS": str(threads)}, expect="result.pt")
        result = torch.load(job / "result.pt")
    return result["items"], result["scores"]


def write_job(job: Path, rec_lm: Any, prompts: Sequence[str], catalog: SCIDCatalog, spec: dict[str, Any], where: str) -> None:
    """What the ranks read (`read_job`): the model (`RecLM.save_pretrained`; its weights' dtype joins `spec`),
    the prompts and the catalogue's tables, and `spec` (device, threads, decode_prompts' arguments)."""
    _bundle(rec_lm, where).save_pretrained(str(job / "model"))
    cpu = catalog.to("cpu")
    torch.save({"prompts": list(map(str, prompts)), "catalog": {f.name: getattr(cpu, f.name) for f in fields(SCIDCatalog)}},
               job / "data.pt")
    spec = {**spec, "dtype": check_dtype_setting(_weights_dtype(rec_lm.model), where)}
    (job / "config.json").write_text(json.dumps(spec))


def read_job(job: Path, device: str) -> tuple[RecLM, list[str], SCIDCatalog, dict[str, Any]]:
    """(model on `device` in the dtype it had, prompts, catalogue, spec) of a `write_job` directory."""
    spec = json.loads((job / "config.json").read_text())
    data = torch.load(job / "data.pt")
    rec = RecLM.from_pretrained(str(job / "model"), device=device, dtype=spec["dtype"])
    return rec, data["prompts"], SCIDCatalog(**data["catalog"]), spec


def _bundle(rec_lm: Any, where: str) -> RecLM:
    """A RecLM that `save_pretrained` writes and `from_pretrained` rebuilds: a PEFT model is rebuilt from its
    base, which only the bundle's meta names."""
    meta = dict(getattr(rec_lm, "meta", None) or {})
    if hasattr(rec_lm.model, "peft_config") and not (meta.get("peft") and meta.get("base_model")):
        raise ValueError(f"{where}: a PEFT (LoRA) model is decoded across processes only as a RecLM whose meta names its "
                         "base (meta['peft'], meta['base_model']), which the ranks rebuild it from; pass the checkpoint's "
                         "meta, or decode in one process (nproc_per_node: 1)")
    return RecLM(model=rec_lm.model, tokenizer=rec_lm.tokenizer, meta=meta)


def _weights_dtype(model: Any) -> torch.dtype:
    """The dtype most weights have: the base's for a PEFT model (its adapter stays fp32)."""
    sizes: Counter = Counter()
    for p in model.parameters():
        if p.is_floating_point():
            sizes[p.dtype] += p.numel()
    return sizes.most_common(1)[0][0]


def _worker(job_dir: str) -> None:
    """One torchrun rank: load the job's model on this rank's device, decode this rank's batches
    (`decode_in_group`); rank 0 writes the merged result."""
    job = Path(job_dir)
    cuda = json.loads((job / "config.json").read_text())["device"] == "cuda"
    local = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        rec, prompts, catalog, spec = read_job(job, f"cuda:{local}" if cuda else "cpu")
        torch.set_num_threads(int(spec["threads"]))
        items, scores = decode_in_group(rec, prompts, catalog, **spec["decode"])
        if dist.get_rank() == 0:
            torch.save({"items": items, "scores": scores}, job / "result.pt")
        # Leave together: a rank tearing gloo down while the other still writes once aborted rank 0 at exit
        # ("terminate called without an active exception", a CI run of 2026-12-04).
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: torchrun --nproc_per_node=N -m {MODULE} JOB_DIR")
    _worker(sys.argv[1])
