"""Distributed data parallel SFT: the caller's process writes the tokenised data and the initial model to
``<output_dir>/job``, launches ``torchrun --standalone --nproc_per_node=N -m align3gr_pipelines.sft.launcher
<job>`` (NCCL on GPUs, gloo on CPU), waits, and loads the model rank 0 wrote. Only the caller (a single Kedro
process) ever writes catalog outputs. The TCA4Rec objective travels too: its tables and settings in
``data.pt`` (the per-example response labels are in the rows), and the frozen SASRec that labels the history
positions of ``positions: all_labelled`` as a SASRec checkpoint in ``<job>/cf_model``. So does selection by
valid recall: the sampled users' prompts and targets, the catalogue and the decoding settings in ``data.pt``
(`valid_recall_ranks.valid_recall_spec`); each rank scores its share of the users and the hits are summed."""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.sft.hf_trainer import TrainResult, selection_metric, train_causal_lm, valid_recall_callback
from align3gr_pipelines.sft.tca4rec import TCA4Rec
from align3gr_pipelines.torchrun import run_torchrun


def fit_distributed(
    rec: RecLM, train_rows: list, eval_rows: list, tcfg: dict[str, Any], seed: int, output_dir: Path, nproc: int,
    tca4rec: TCA4Rec | None = None, cf_model: Any = None, valid_recall: dict[str, Any] | None = None,
) -> tuple[RecLM, TrainResult]:
    """Train under torchrun; `valid_recall` (a `valid_recall_spec`) makes the ranks select by valid recall
    (``tcfg``'s model_selection says which key)."""
    from align3gr_pipelines.cf.sasrec import SASRec

    if cf_model is not None and not isinstance(cf_model, SASRec):
        raise TypeError(f"sft_train: torchrun workers reload the CF model as a SASRec checkpoint, got {type(cf_model).__name__}")
    job = output_dir / "job"
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir(parents=True)
    torch.save({"train": train_rows, "eval": eval_rows, "tca4rec": None if tca4rec is None else tca4rec.state(),
                "valid_recall": valid_recall}, job / "data.pt")
    if cf_model is not None:
        cf_model.save_pretrained(job / "cf_model")
    (job / "config.json").write_text(json.dumps({"trainer": tcfg, "seed": seed, "init": str(output_dir / "init"),
                                                 "output_dir": str(output_dir),
                                                 "cf_model": None if cf_model is None else str(job / "cf_model")},
                                                default=str))
    timeout = tcfg.get("launch_timeout_s")
    timeout = None if timeout is None else float(timeout)
    if timeout is not None and timeout <= 0:
        raise ValueError(f"sft_train.trainer.launch_timeout_s must be > 0 or null, got {timeout}")
    run_torchrun("align3gr_pipelines.sft.launcher", job, nproc, timeout, "sft_train: distributed training",
                 "sft_train.trainer.launch_timeout_s", expect="result.json")
    result = TrainResult(**json.loads((job / "result.json").read_text()))
    final = str(job / "final")
    trained = RecLM.from_pretrained(final, device="cpu", trainable=True, dtype=RecLM.dtype_on(final, tcfg.get("device", "auto")))
    trained.meta = rec.meta
    return trained, result


def _worker(job_dir: str) -> None:
    """One torchrun rank: train on the job's data; rank 0 writes the final model and the summary."""
    job = Path(job_dir)
    if os.environ.get("RANK", "0") == "0":  # a rank is a fresh interpreter: our INFO lines (valid recall) would be lost
        ours = logging.getLogger("align3gr_pipelines")
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s rank 0 %(levelname)s %(message)s"))
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
    spec = json.loads((job / "config.json").read_text())
    data = torch.load(job / "data.pt")
    rec = RecLM.from_pretrained(spec["init"], device="cpu", trainable=True,
                                dtype=RecLM.dtype_on(spec["init"], spec["trainer"].get("device", "auto")))
    rec.model.train()
    tca4rec = None if data.get("tca4rec") is None else TCA4Rec.from_state(data["tca4rec"])
    cf_model = None
    if spec.get("cf_model"):
        from align3gr_pipelines.cf.sasrec import SASRec

        cf_model = SASRec.from_pretrained(spec["cf_model"])
    callbacks = []
    if data.get("valid_recall") is not None:  # before early stopping, which reads the recall it adds
        from align3gr_pipelines.sft.valid_recall_ranks import scorer_from_spec

        callbacks.append(valid_recall_callback(scorer_from_spec(data["valid_recall"], rec.tokenizer),
                                               selection_metric(spec["trainer"])))
    trainer, result = train_causal_lm(rec.model, rec.tokenizer, data["train"], data["eval"], spec["trainer"],
                                      spec["output_dir"], int(spec["seed"]), callbacks, tca4rec=tca4rec,
                                      cf_model=cf_model)
    if trainer.is_world_process_zero():
        rec.model = trainer.model
        rec.save_pretrained(str(job / "final"))
        (job / "result.json").write_text(json.dumps(asdict(result), default=str))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: torchrun --nproc_per_node=N -m align3gr_pipelines.sft.launcher JOB_DIR")
    _worker(sys.argv[1])
