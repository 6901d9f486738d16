"""CPU cost of one SFT training step with ``sft_train.trainer.logits: all`` against ``labelled``.

The demo's own model (data/06_models/sft_model, from `make run`) and examples (data/05_model_input/
sft_examples.parquet), encoded as sft_train encodes them (max_length 192, item SCIDs of the seq / seq2text
prompts labelled as with history_loss, right padding), in shuffled batches of 32 as the demo trains. One step
= the Trainer's `compute_loss` (the plain HF Trainer for all, `LabelledLogitsTrainer` for labelled) + backward;
no optimizer step, which both settings share. CPU time (process_time), so other jobs on the machine count
less; the two settings alternate batch by batch, so both see the same load. It also checks that both settings
give the same loss on every batch.

    python benchmarks/sft_logits_cost.py [--batches 9] [--rounds 3] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd
import torch

from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.sft.hf_trainer import PadCollator, _labelled_logits_trainer_class, encode_examples, output_head

ROOT = Path(__file__).resolve().parents[1]
HISTORY_TASKS = ("seq", "seq2text")  # trainer.history_loss_tasks in conf/base


def demo_batches(rec: RecLM, examples: pd.DataFrame, n_batches: int, batch_size: int) -> list[dict[str, torch.Tensor]]:
    train = examples[examples["split"] == "train"].sample(frac=1.0, random_state=0)
    items = frozenset(i for t, i in rec.tokenizer.get_vocab().items() if t.startswith("<i"))
    rows, _ = encode_examples(rec.tokenizer, train["prompt"].tolist(), train["response"].tolist(), 192, items,
                              label_prompt=train["task"].isin(HISTORY_TASKS).tolist())
    collate = PadCollator(rec.tokenizer.pad_token_id)
    return [collate(rows[k : k + batch_size]) for k in range(0, n_batches * batch_size, batch_size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "data/06_models/sft_model"))
    parser.add_argument("--examples", default=str(ROOT / "data/05_model_input/sft_examples.parquet"))
    parser.add_argument("--batches", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="passes over the batches (each batch both settings)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo: all cores but one)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    for path in (args.model, args.examples):
        if not Path(path).exists():
            raise SystemExit(f"{path} not found: run `make run` (or the sft_data and sft_train pipelines) first")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import Trainer, TrainingArguments

    rec = RecLM.from_pretrained(args.model, device="cpu", trainable=True)
    model = rec.model.train()
    batches = demo_batches(rec, pd.read_parquet(args.examples), args.batches, args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(output_dir=tmp, use_cpu=True, report_to="none", remove_unused_columns=False)
        trainers = {"all": Trainer(model=model, args=targs),
                    "labelled": _labelled_logits_trainer_class()(model=model, args=targs, head=output_head(model))}
        times: dict[str, list[float]] = {name: [] for name in trainers}
        losses: dict[str, list[float]] = {name: [] for name in trainers}
        for r in range(args.rounds):
            for k, batch in enumerate(batches):
                order = list(trainers) if (r + k) % 2 == 0 else list(reversed(trainers))  # neither always goes first
                for name in order:
                    model.zero_grad(set_to_none=True)
                    start = time.process_time()
                    loss = trainers[name].compute_loss(model, dict(batch))
                    loss.backward()
                    times[name].append(time.process_time() - start)
                    if r == 0:
                        losses[name].append(loss.item())
    padded = sum(b["labels"].numel() for b in batches)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    gap = max(abs(a - b) / abs(a) for a, b in zip(losses["all"], losses["labelled"]))
    report = {
        "model": args.model, "vocab": len(rec.tokenizer), "params": sum(p.numel() for p in model.parameters()),
        "batches": len(batches), "batch_size": args.batch_size, "rounds": args.rounds, "threads": args.threads,
        "real_fraction": real / padded, "labelled_fraction": labelled / padded,
        "cpu_ms_per_step_median": ms, "labelled_over_all": ms["labelled"] / ms["all"],
        "max_relative_loss_gap": gap, "first_losses": {n: v[:3] for n, v in losses.items()},
    }
    print(f"{len(batches)} demo batches of {args.batch_size}: {report['real_fraction']:.2f} of padded positions real, "
          f"{report['labelled_fraction']:.2f} labelled")
    print(f"CPU ms per step (median of {len(times['all'])}, {args.threads} thread(s)): all {ms['all']:.0f}, "
          f"labelled {ms['labelled']:.0f} ({report['labelled_over_all']:.2f}x); max relative loss gap {gap:.1e}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
