"""SFT training throughput (non-padding tokens/s) of the scratch backbone, raw loop vs our HF Trainer path.

    python benchmarks/sft_throughput.py --hidden 256 --layers 4 --batch-size 32 --steps 20

Synthetic examples shaped like the demo's SFT set (SCID prompts of ~`--tokens` tokens); the raw loop is a
plain forward/backward/AdamW step, the Trainer figure includes its logging, evaluation-free stepping and
padding. Prints one JSON line. Use `taskset -c 0,1` to pin it to two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument("--scid-tokens", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=55, help="mean example length")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--skip-trainer", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from align3gr_pipelines.devices import pick_device
    from align3gr_pipelines.sft.hf_trainer import PadCollator, train_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    vocab = args.vocab + args.scid_tokens
    config = LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875),
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=256,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, use_cache=False)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.normal(args.tokens, args.tokens * 0.25, size=args.batch_size * (args.steps + 3)), 8, 250).astype(int)
    rows = []
    for n in lengths:
        ids = rng.integers(3, vocab, size=n).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n - 4) + ids[-4:]})
    collate = PadCollator(0)

    model = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens, t0 = 0, None
    for step in range(args.steps + 3):
        batch = {k: v.to(device) for k, v in collate(rows[step * args.batch_size : (step + 1) * args.batch_size]).items()}
        if step == 3:  # warm-up steps excluded
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0, c0, tokens = time.perf_counter(), time.process_time(), 0
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    raw = tokens / (time.perf_counter() - t0)
    cpu = tokens / (time.process_time() - c0)  # per CPU-second: what a core gives when it is not shared
    out = {"device": str(device), "threads": torch.get_num_threads(), "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "raw_tokens_per_s": round(raw, 1), "raw_tokens_per_cpu_s": round(cpu, 1)}

    if not args.skip_trainer:
        model = LlamaForCausalLM(config)
        cfg = {"batch_size": args.batch_size, "gradient_accumulation_steps": 1, "num_train_epochs": 1, "max_steps": args.steps,
               "learning_rate": 1e-3, "weight_decay": 0.01, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05,
               "logging_steps": 5, "eval_steps": 10_000, "max_eval_examples": 8, "early_stopping": {"patience": None},
               "progress_bar": False, "device": args.device}
        with tempfile.TemporaryDirectory() as tmp:
            _, result = train_causal_lm(model, type("T", (), {"pad_token_id": 0})(), rows, rows[:8], cfg, os.path.join(tmp, "w"), 0)
        out["trainer_tokens_per_s"] = round(result.tokens_per_s, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
