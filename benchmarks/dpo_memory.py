"""Peak memory of one SP-DPO stage on a ~200M-parameter random Llama with LoRA, on a CPU (issue 27).

    python benchmarks/dpo_memory.py --out dpo_memory.json            # ~200M parameters, a few CPU-minutes
    python benchmarks/dpo_memory.py --tiny --out /tmp/dpo_memory.json # seconds

A random Llama (hidden 1024, 12 layers, vocab 32000: ~220M parameters; no download) is saved as a pretrained
base, `lm.backbone.build_backbone` (kind hf: LoRA r=16 on every projection + the SCID rows as trainable
tokens) turns it into the SFT bundle, and each configuration then runs in a fresh process exactly as the
pipeline does: `RecLM.from_pretrained` (what the catalog's sft_model load does) in ``--dtype``, then
`preference.dpo_stage.train_stage` on a few seeded pairs (20 rejected each). Per configuration: the loaded
model's bytes, the process RSS before the stage and its peak during the stage (VmHWM reset by
/proc/self/clear_refs just before), their difference, and whether the stage's output shares its frozen base
with the input (same storage). Only the stage's peak is compared, so the load's transient copies do not count.
The *_lean configurations run the stage with ``lean_token_rows`` (`lm.lean_token_rows`: no merged
[vocab, hidden] copy of the SCID rows' layers per forward).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from align3gr_pipelines.lm.backbone import build_backbone, train_bpe_tokenizer  # noqa: E402
from align3gr_pipelines.lm.rec_lm import RecLM  # noqa: E402
from align3gr_pipelines.preference.dpo_stage import train_stage  # noqa: E402
from align3gr_pipelines.preference.dpo_trainer import DPOConfig  # noqa: E402
from align3gr_pipelines.sft.prompts import seq_prompt  # noqa: E402
from align3gr_pipelines.tokenizer.scid import scid_token  # noqa: E402

SHAPE = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, intermediate_size=2816, vocab_size=32000)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=600)
LORA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {  # name -> (dtype, in_place, lean_token_rows)
    "copy_float32": ("float32", False, False),  # what the stage did before issue 27 on every device
    "in_place_float32": ("float32", True, False),
    "in_place_bfloat16": ("bfloat16", True, False),  # what dtype auto gives a LoRA base on a CUDA GPU
    # + lm.lean_token_rows: no merged [vocab, hidden] copy of the embedding and LM head per forward
    "in_place_float32_lean": ("float32", True, True),
    "in_place_bfloat16_lean": ("bfloat16", True, True),
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _scids(n_items: int, seed: int) -> list[str]:
    codes = np.random.default_rng(seed).choice(64**3, size=n_items, replace=False)
    return ["".join(scid_token("item", lv, int(c) // 64 ** (2 - lv) % 64) for lv in range(3)) for c in codes]


def _pairs(scids: list[str], n: int, history: int, n_rejected: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        pick = rng.choice(len(scids), history + 1 + n_rejected, replace=False)
        rows.append({"prompt": seq_prompt([scids[i] for i in pick[:history]], None), "chosen_tokens": scids[pick[history]],
                     "rejected_tokens": [scids[i] for i in pick[history + 1 :]]})
    return pd.DataFrame(rows)


def setup(work: Path, shape: dict[str, Any], scids: list[str], seed: int) -> Path:
    """The SFT bundle: a random pretrained-style base + LoRA + SCID rows, saved as the pipeline saves it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [seq_prompt(scids[i : i + 5], None) for i in range(0, len(scids) - 5, 5)]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    tok.add_tokens([f"<reserved_{i}>" for i in range(shape["vocab_size"] - len(tok))])  # the rest of a real vocabulary
    torch.manual_seed(seed)
    base = LlamaForCausalLM(LlamaConfig(**{**shape, "vocab_size": len(tok)}, num_key_value_heads=shape["num_attention_heads"],
                                        max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    base.save_pretrained(str(work / "base"))
    tok.save_pretrained(str(work / "base"))
    del base
    cfg = {"kind": "hf", "dtype": "float32", "hf": {"name_or_path": str(work / "base"), "gguf_file": None,
           "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": LORA}}}
    vocab = {"item": sorted({scid_token("item", lv, c) for lv in range(3) for c in range(64)}), "user": []}
    rec = build_backbone(cfg, texts, vocab, seed, 3, device="cpu")
    rec.save_pretrained(str(work / "sft"))
    return work / "sft"


def child(sft: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    dtype, in_place, lean = CONFIGS[name]
    torch.set_num_threads(1)
    policy = RecLM.from_pretrained(str(sft), device="cpu", dtype=dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    base_ptrs = {n: p.data_ptr() for n, p in policy.model.named_parameters() if not p.requires_grad and "lora_" not in n}
    pairs = _pairs(_scids(args.n_items, args.seed), args.pairs, args.history, args.rejected, args.seed)
    cfg = DPOConfig(batch_size=args.batch, ref_batch_size=args.batch, learning_rate=1e-4, device="cpu", show_progress=False,
                    in_place=in_place, lean_token_rows=lean)
    rss_before = _status_kb("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS, so the peak below is the stage's own
    new, metrics = train_stage(policy, pairs, cfg, args.seed, "sp_dpo_easy", "sft")
    peak = _status_kb("VmHWM") * 1024
    now = dict(new.model.named_parameters())
    return {"config": name, "dtype": dtype, "in_place": in_place, "lean_token_rows": lean, "model_bytes": model_bytes,
            "params": sum(p.numel() for p in policy.model.parameters()),
            "rss_before_stage": rss_before, "peak_rss_stage": peak, "stage_extra_bytes": peak - rss_before,
            "peak_over_model_bytes": peak / model_bytes, "extra_over_model_bytes": (peak - rss_before) / model_bytes,
            "base_shared_with_input": all(now[n].data_ptr() == p for n, p in base_ptrs.items()),
            "loss_first": metrics["scalars"]["initial_loss"], "train_seconds": metrics["scalars"]["train_seconds"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("dpo_memory.json"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--rejected", type=int, default=20)
    ap.add_argument("--history", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--n-items", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", nargs=2, metavar=("SFT_DIR", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args)), flush=True)
        return 0
    shape = TINY if args.tiny else SHAPE
    report: dict[str, Any] = {"shape": shape, "lora_r": 16, "pairs": args.pairs, "rejected": args.rejected,
                              "history": args.history, "torch": torch.__version__, "runs": []}
    with tempfile.TemporaryDirectory(prefix="dpo_memory_") as tmp:
        sft = setup(Path(tmp), shape, _scids(args.n_items, args.seed), args.seed)
        passthrough = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in ("--tiny",)]
        for name in args.configs:
            out = subprocess.run([sys.executable, __file__, *passthrough, "--child", str(sft), name],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                report["runs"].append({"config": name, "error": out.stderr[-2000:]})
                continue
            run = json.loads(out.stdout.strip().splitlines()[-1])
            report["runs"].append(run)
            print(json.dumps(run), flush=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    os.replace(tmp_out, args.out)
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
