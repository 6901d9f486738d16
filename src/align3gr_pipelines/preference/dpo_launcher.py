"""Softmax-DPO of one preference stage on several processes (issue 27; ``training.nproc_per_node`` > 1).

The caller (the Kedro node's process) writes a job directory under ``$TMPDIR``: the stage's input policy
(``RecLM.save_pretrained``), the tokenised preference examples and the selection's valid sample
(``data.pt``), the DPO and selection settings (``config.json``). It runs ``torchrun --standalone
--nproc_per_node=N -m align3gr_pipelines.preference.dpo_launcher <job>`` in its own process group (ended
whole on ``training.launch_timeout_s``), waits, and copies the trained tensors rank 0 wrote into its own
model: only the caller ever writes catalog outputs, and the stage's metadata is made exactly as in one process.

Each rank (nccl on GPUs, gloo on a CPU) runs `dpo_trainer.train_dpo` with its `Ranks`: the reference pass
split by blocks of examples and gathered, every global micro-batch split across the ranks, the gradients
summed by hand (why not DDP: `train_dpo`'s docstring), and the valid sample's constrained decoding split
by whole decode batches (`lm.sharded_decoding.decode_in_group`: the lists equal one process's) and gathered
before they are scored, so every rank scores every checkpoint on all users and takes the same selection decision.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from align3gr_pipelines.devices import pick_device
from align3gr_pipelines.evaluation import valid_recall
from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.lm.sharded_decoding import decode_in_group
from align3gr_pipelines.preference.dpo_trainer import (
    DPOConfig,
    DPOResult,
    PreferenceExample,
    Ranks,
    Selection,
    _is_trained,
    restore_snapshot,
    sample_evaluator,
    train_dpo,
    trainable_parameters,
    trainable_snapshot,
)
from align3gr_pipelines.torchrun import run_torchrun


def _weights_dtype(rec: RecLM) -> torch.dtype:
    """The dtype the ranks load the policy in, so that they train what this process would have trained: the
    weights' dtype, or the frozen base's for a PEFT model (its adapter is fp32 either way)."""
    named = list(rec.model.named_parameters())
    frozen = [p for n, p in named if not _is_trained(n)] if rec.is_peft else []
    return (frozen or [p for _, p in named])[0].dtype


def fit_distributed(
    policy: RecLM,
    examples: list[PreferenceExample],
    cfg: DPOConfig,
    pad_id: int,
    seed: int,
    stage: str,
    evaluate: Any = None,
    selection: Selection | None = None,
    input_score: float | None = None,
) -> DPOResult:
    """`train_dpo` on ``cfg.nproc_per_node`` torchrun ranks. ``policy.model`` ends holding the weights rank 0
    kept (the selected checkpoint), as `train_dpo` leaves its model; returns rank 0's `DPOResult`."""
    nproc = int(cfg.nproc_per_node)
    where = f"{stage}: training.nproc_per_node={nproc}"
    device = pick_device(cfg.device)
    if device.type == "cuda" and torch.cuda.device_count() < nproc:
        raise ValueError(f"{where} needs one CUDA device per process; {torch.cuda.device_count()} are visible")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"{where}: distributed DPO runs on CUDA (nccl) or the CPU (gloo), not on {device.type}")
    if cfg.batch_size % nproc:
        raise ValueError(f"{where}: training.batch_size={cfg.batch_size} must be divisible by it")
    select = evaluate is not None and selection is not None and selection.enabled
    if select and getattr(evaluate, "sample", None) is None:
        raise ValueError(
            f"{where}: the ranks rebuild the selection's evaluator from its valid sample; pass one made by "
            "dpo_trainer.valid_recall_evaluator (or sample_evaluator), not an arbitrary callable"
        )
    timeout = None if cfg.launch_timeout_s is None else float(cfg.launch_timeout_s)
    with tempfile.TemporaryDirectory(prefix=f"{stage}_dpo_job_") as tmp:
        job = Path(tmp)
        policy.save_pretrained(str(job / "policy"))
        torch.save({"examples": [asdict(e) for e in examples], "sample": evaluate.sample if select else None},
                   job / "data.pt")
        (job / "config.json").write_text(json.dumps({
            "dpo": asdict(cfg), "selection": None if selection is None else asdict(selection), "seed": int(seed),
            "pad_id": int(pad_id), "input_score": input_score, "sample_seed": int(evaluate.seed) if select else None,
            "dtype": str(_weights_dtype(policy)).removeprefix("torch."),
        }))
        run_torchrun("align3gr_pipelines.preference.dpo_launcher", job, nproc, timeout, f"{stage}: distributed DPO",
                     "training.launch_timeout_s", expect="result.json")
        result = json.loads((job / "result.json").read_text())
        trained = torch.load(job / "trained.pt", map_location="cpu")
    model = policy.model
    trainable_parameters(model)  # the same requires_grad flags as after a one-process stage
    missing = sorted(set(trained) - {n for n, _ in model.named_parameters()})
    if missing:
        raise RuntimeError(f"{stage}: the ranks trained tensors this policy does not have: {missing[:5]}")
    restore_snapshot(model, trained)
    model.eval()
    return DPOResult(curves=result["curves"], scalars=result["scalars"])


# ---------------------------------------------------------------- inside a rank


def _decode_in_ranks(sel: Selection, ranks: Ranks) -> Any:
    """A `sample_evaluator` decoder: each rank decodes whole decode batches of the sample (the batches one
    process would form, so the lists equal one process's exactly) and the lists are all-gathered."""
    del ranks  # the process group is the one torchrun set up

    def decode(rec: RecLM, sample: valid_recall.ValidSample) -> np.ndarray:
        idx, _ = decode_in_group(rec, sample.prompts, sample.catalog, beam_width=max(sel.beam_width, sel.k),
                                 top_k=sel.k, batch_size=sel.batch_size)
        return idx.numpy()

    return decode


def _worker(job_dir: str) -> None:
    """One torchrun rank: `train_dpo` with its share of every batch; rank 0 writes the trained tensors and the
    result."""
    import torch.distributed as dist

    from align3gr_pipelines.preference.dpo_stage import _disable_activation_checkpointing

    job = Path(job_dir)
    spec = json.loads((job / "config.json").read_text())
    cfg = DPOConfig(**spec["dpo"])
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    device = pick_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        rec = RecLM.from_pretrained(str(job / "policy"), device="cpu", trainable=True, dtype=getattr(torch, spec["dtype"]))
        model = rec.model.to(device)
        _disable_activation_checkpointing(model)
        data = torch.load(job / "data.pt", weights_only=False)
        examples = [PreferenceExample(**e) for e in data["examples"]]
        sel = None if spec["selection"] is None else Selection(**spec["selection"])
        evaluate = None
        if spec["sample_seed"] is not None:  # selection is enabled
            evaluate = sample_evaluator(data["sample"], rec.tokenizer, sel, spec["sample_seed"], _decode_in_ranks(sel, ranks))
        result = train_dpo(model, examples, cfg, spec["pad_id"], spec["seed"], evaluate, sel, spec["input_score"], ranks)
        # Every rank must have kept the same checkpoint; a disagreement would mean the ranks' weights diverged.
        steps: list[Any] = [None] * ranks.world_size
        dist.all_gather_object(steps, result.scalars["selected_step"])
        if len(set(steps)) != 1:
            raise RuntimeError(f"distributed DPO: the ranks selected different checkpoints {steps}")
        if ranks.rank == 0:
            torch.save({n: t.cpu() for n, t in trainable_snapshot(model).items()}, job / "trained.pt")
            (job / "result.json").write_text(json.dumps(asdict(result), default=float))  # last: the caller checks it exists
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: torchrun --nproc_per_node=N -m align3gr_pipelines.preference.dpo_launcher JOB_DIR")
    _worker(sys.argv[1])
