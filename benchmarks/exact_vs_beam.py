"""Exact ranking (every catalogue item's SCID log-probability, `item_logprobs`) against the constrained
beam search the evaluation runs (width 20), on the same model and prompts: how much recall the beam loses.

Reads a finished run's artifacts (sft_model or any RecLM checkpoint, seq_eval_prompts, item_scids):

    python benchmarks/exact_vs_beam.py --data data                         # the demo's last `make run`
    python benchmarks/exact_vs_beam.py --data <study>/data --model 06_models/sft_model --users 200
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, decode_prompts, item_logprobs
from align3gr_pipelines.lm.rec_lm import RecLM, encode_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data"), help="the run's data root")
    ap.add_argument("--model", default="06_models/sft_model", help="checkpoint, relative to --data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--users", type=int, default=None, help="a seeded sample of this many users (default all)")
    ap.add_argument("--beams", default="20,50", help="beam widths to compare with exact ranking")
    ap.add_argument("--ks", default="5,10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-exact", action="store_true", help="beam search only (a quick test recall)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rec = RecLM.from_pretrained(str(args.data / args.model), device="cpu")
    rows = pd.read_parquet(args.data / "05_model_input/seq_eval_prompts.parquet")
    rows = rows[rows["split"] == args.split].reset_index(drop=True)
    if args.users and args.users < len(rows):
        rows = rows.iloc[np.sort(np.random.default_rng(args.seed).choice(len(rows), args.users, replace=False))]
    catalog = SCIDCatalog.from_scids(pd.read_parquet(args.data / "05_model_input/item_scids.parquet"), rec.tokenizer)
    where = {item: i for i, item in enumerate(catalog.item_ids)}
    rows = rows[rows["target"].astype(str).isin(where)]
    target = rows["target"].astype(str).map(where).to_numpy()
    ks = [int(k) for k in args.ks.split(",")]
    result: dict = {"users": len(rows), "n_items": catalog.n_items, "split": args.split, "model": args.model}

    if not args.no_exact:
        t0 = time.perf_counter()
        ids = [encode_prompt(rec.tokenizer, p) for p in rows["prompt"]]
        scores = item_logprobs(rec.model, ids, catalog, batch_size=8, pad_token_id=rec.tokenizer.pad_token_id)
        # rank = items scored strictly higher than the target (ties count in the target's favour)
        rank = (scores > torch.as_tensor(scores.numpy()[np.arange(len(target)), target]).unsqueeze(1)).sum(1).numpy()
        result["exact"] = {f"recall@{k}": float((rank < k).mean()) for k in ks}
        result["exact"]["seconds"] = time.perf_counter() - t0
    for width in (int(b) for b in args.beams.split(",")):
        t0 = time.perf_counter()
        idx, _ = decode_prompts(rec, rows["prompt"].tolist(), catalog, beam_width=width, top_k=max(ks), batch_size=64)
        hit = idx.numpy() == target[:, None]
        result[f"beam{width}"] = {f"recall@{k}": float(hit[:, :k].any(1).mean()) for k in ks}
        result[f"beam{width}"]["seconds"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
