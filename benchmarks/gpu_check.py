"""One-command GPU check at Llama-2-7B scale: SFT, one SP-DPO stage and constrained decoding, timed.

    python benchmarks/gpu_check.py --out gpu_check.json                 # CUDA, 80-141 GB, ~8 min at most
    python benchmarks/gpu_check.py --tiny --out /tmp/gpu_check.json     # any machine, seconds (the test's run)

What it measures. A decoder of Llama-2-7B's shape (hidden 4096, 32 layers, 32 heads, intermediate 11008,
vocab 32000) built from a ``LlamaConfig`` with random weights (no download), its frozen base in ``--dtype``
(``lm.precision``: auto = bf16 on CUDA, fp32 on a CPU; the LoRA matrices and SCID rows stay fp32). The
tokenizer is a tiny byte-level BPE trained on the prompts (``lm.backbone.train_bpe_tokenizer``), padded with
reserved tokens to 32000 so the catalogue's SCID tokens (``add_scid_tokens``) are new rows appended by
``resize_token_embeddings``, as for a pretrained LM. The catalogue is LC-Rec's ``Instruments.index.json``
(``--catalogue``; all 4 code levels, ``<a_12>`` -> ``<i0_12>``; the few items whose 4 codes collide with an
earlier item's are dropped, as the trie needs unique SCIDs) or, when that file is absent, a synthetic
3 x 256 catalogue of ``--n-items``. LoRA r=16 on q,k,v,o,gate,up,down plus the SCID rows (PEFT trainable tokens).
Stages, each with wall seconds and peak GPU memory allocated (weights included; reset between stages):
  build   the model on the device;
  sft     AdamW over the LoRA params on SEQ prompts (project's ``seq_prompt``, history ``--history``) with a
          SCID response, bf16 autocast: tokens/s (prompt + response tokens);
  dpo     one SP-DPO stage through ``preference.dpo_trainer`` (``examples_from_pairs``, ``train_dpo``) on
          ``--dpo-prompts`` prompts with ``--rejected`` rejected SCIDs each: tokens/s and pairs/s;
  decode  the project's exact constrained beam search (``lm.constrained_decoding``) for ``--users`` users at
          beam ``--beam``: users/s.
The JSON (``--out``) is rewritten atomically after every stage; stages that would start after ``--deadline``
seconds are recorded as skipped. Without CUDA (and without ``--tiny``) nothing is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from align3gr_pipelines.devices import bf16_autocast  # noqa: E402
from align3gr_pipelines.lm.backbone import add_scid_tokens, train_bpe_tokenizer  # noqa: E402
from align3gr_pipelines.lm.constrained_decoding import constrained_beam_search  # noqa: E402
from align3gr_pipelines.lm.precision import DTYPE_SETTINGS, resolve_dtype  # noqa: E402
from align3gr_pipelines.lm.rec_lm import encode_prompt, encode_response  # noqa: E402
from align3gr_pipelines.lm.scid_catalog import SCIDCatalog  # noqa: E402
from align3gr_pipelines.preference.dpo_trainer import DPOConfig, examples_from_pairs, train_dpo  # noqa: E402
from align3gr_pipelines.sft.prompts import seq_prompt  # noqa: E402
from align3gr_pipelines.tokenizer.scid import scid_token, split_tokens  # noqa: E402

NO_CUDA = "no CUDA device: nothing measured; run on a GPU (or pass --tiny for a CPU smoke run)"
STAGES = ("build", "sft", "dpo", "decode")
LLAMA2_7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=None)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_catalogue(path: Path, n_items: int, seed: int) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """item id -> codes, from an LC-Rec index file ({"0": ["<a_12>", "<b_5>", ...]}) or synthetic 3 x 256."""
    if not path.is_file():
        codes = np.random.default_rng(seed).choice(256**3, size=n_items, replace=False)
        items = {str(i): [int(c) // 65536, int(c) // 256 % 256, int(c) % 256] for i, c in enumerate(codes)}
        return items, {"source": "synthetic 3x256 (catalogue file absent)", "path": str(path), "levels": 3}
    raw = json.loads(path.read_text())
    items: dict[str, list[int]] = {}
    seen: set[tuple[int, ...]] = set()
    scanned = 0
    for item, code_strings in raw.items():
        scanned += 1
        try:  # "<a_12>": level a, code 12; the level is the position in the list
            codes = [int(str(s).strip("<>").split("_")[1]) for s in code_strings]
        except (IndexError, ValueError) as err:
            raise ValueError(f"{path}: item {item!r} has codes {code_strings!r}; expected strings like '<a_12>'") from err
        if tuple(codes) not in seen:
            seen.add(tuple(codes))
            items[str(item)] = codes
        if len(items) == n_items:
            break
    levels = {len(c) for c in items.values()}
    if len(levels) != 1:
        raise ValueError(f"{path}: items have different numbers of code levels {sorted(levels)}; expected one")
    info = {"source": "lcrec index, all code levels", "path": str(path), "levels": levels.pop(),
            "duplicate_scids_dropped": scanned - len(items)}
    return items, info


def scid(codes: list[int]) -> str:
    return "".join(scid_token("item", level, code) for level, code in enumerate(codes))


def scid_table(items: dict[str, list[int]], scids: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"id": list(items), "codes": list(items.values()), "tokens": scids})


def seq_examples(scids: list[str], n: int, history: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(prompt, next item's SCID) pairs: a random history of `history` items, then a random target."""
    picks = rng.integers(0, len(scids), size=(n, history + 1))
    return [(seq_prompt([scids[i] for i in row[:-1]], None), scids[row[-1]]) for row in picks]


def build(args: argparse.Namespace, shape: dict[str, Any], texts: list[str], scids: list[str], device: str) -> tuple[Any, Any, int]:
    """(PEFT model, tokenizer, number of SCID tokens): random-weight Llama + SCID rows + LoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe_tokenizer(texts, vocab_size=400, min_frequency=2)
    if shape["vocab_size"]:  # stand-ins for the rest of Llama-2's vocabulary, so SCID rows come after 32000
        tok.add_tokens([f"<reserved_{i}>" for i in range(shape["vocab_size"] - len(tok))])
    n_base = len(tok)
    tokens = sorted({t for s in scids for t in split_tokens(s)})
    new_ids = add_scid_tokens(tok, tokens)
    config = LlamaConfig(**{**shape, "vocab_size": n_base}, num_key_value_heads=shape["num_attention_heads"],
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, use_cache=False)
    torch.manual_seed(args.seed)
    dtype = resolve_dtype(args.dtype, device, frozen_base=True, where="--dtype")  # the base never trains
    # Built on the device in its final dtype: a 7B model initialised in fp32 on the CPU is slow and 27 GB.
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM",
                      trainable_token_indices={"embed_tokens": new_ids, "lm_head": new_ids})
    return get_peft_model(model, lora), tok, len(new_ids)


def sft(model: Any, tok: Any, examples: list[tuple[str, str]], batch: int, device: str) -> dict[str, Any]:
    """A plain AdamW loop, loss on the response tokens only; tokens/s over prompt + response tokens."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    n_tokens, losses = 0, []
    for s in range(0, len(examples), batch):
        rows = [(encode_prompt(tok, p), encode_response(tok, r)) for p, r in examples[s : s + batch]]
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        for i, (p, r) in enumerate(rows):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            labels[i, len(p) : len(p) + len(r)] = torch.tensor(r)
        with bf16_autocast(device):
            loss = model(input_ids=ids.to(device), attention_mask=(ids != tok.pad_token_id).long().to(device),
                         labels=labels.to(device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_tokens += sum(len(p) + len(r) for p, r in rows)
        losses.append(loss.item())
    return {"steps": len(losses), "batch_size": batch, "tokens": n_tokens, "loss_first": losses[0], "loss_last": losses[-1],
            "trainable_params": sum(p.numel() for p in params)}


def dpo(model: Any, tok: Any, examples: list[tuple[str, str]], scids: list[str], n_rejected: int,
        batch: int, device: str, seed: int) -> dict[str, Any]:
    """One Softmax-DPO stage on the project's trainer; negatives are random other SCIDs (timing, not quality)."""
    rng = np.random.default_rng(seed)
    rejected = [[scids[j] for j in rng.choice(len(scids), n_rejected + 1, replace=False) if scids[j] != chosen][:n_rejected]
                for _, chosen in examples]
    pairs = pd.DataFrame({"prompt": [p for p, _ in examples], "chosen_tokens": [c for _, c in examples],
                          "rejected_tokens": rejected})
    prefs = examples_from_pairs(pairs, tok)
    cfg = DPOConfig(batch_size=batch, ref_batch_size=batch, device=device, show_progress=False)
    # As the DPO stages run: the base in --dtype, the adapter in fp32, bf16 autocast on CUDA (DPOConfig.autocast).
    result = train_dpo(model, prefs, cfg, pad_id=tok.pad_token_id, seed=seed)
    sc = result.scalars
    tokens = sum(len(e.prompt_ids) + len(e.chosen_ids) + sum(map(len, e.rejected_ids)) for e in prefs)
    return {"pairs": len(prefs), "rejected_per_pair": float(sc["mean_rejected_per_pair"]), "steps": int(sc["optimizer_steps"]),
            "tokens": tokens, "train_seconds": sc["train_seconds"], "reference_seconds": sc["reference_seconds"],
            "pairs_per_s": sc["pairs_per_second"], "loss_first": sc["initial_loss"], "loss_last": sc["final_loss"],
            "tokens_per_s_train": tokens / sc["train_seconds"] if sc["train_seconds"] > 0 else None}


def decode(model: Any, tok: Any, catalog: SCIDCatalog, prompts: list[str], beam: int, batch: int, device: str) -> dict[str, Any]:
    ids = [encode_prompt(tok, p) for p in prompts]
    items, _ = constrained_beam_search(model, ids, catalog, beam_width=beam, top_k=beam, batch_size=batch,
                                       pad_token_id=tok.pad_token_id)
    return {"users": len(ids), "beam": beam, "batch_size": batch, "valid_top1": float((items[:, 0] >= 0).float().mean())}


def write(report: dict[str, Any], out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--catalogue", type=Path, default=Path("../shared/data/instruments-lcrec/Instruments.index.json"))
    ap.add_argument("--n-items", type=int, default=10000, help="items kept (first of the file) or synthesised")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    ap.add_argument("--deadline", type=float, default=420.0, help="seconds; later stages are skipped")
    ap.add_argument("--tiny", action="store_true", help="a tiny model and data; runs on a CPU in seconds")
    ap.add_argument("--history", type=int, default=20)
    ap.add_argument("--sft-steps", type=int, default=10)
    ap.add_argument("--sft-batch", type=int, default=16)
    ap.add_argument("--dpo-prompts", type=int, default=16)
    ap.add_argument("--rejected", type=int, default=20)
    ap.add_argument("--dpo-batch", type=int, default=4)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=DTYPE_SETTINGS, default="auto",
                    help="the base weights' dtype (lm.precision): auto = bfloat16 on CUDA, float32 on a CPU")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print(NO_CUDA)
        return 0
    if args.tiny:
        args.n_items, args.users, args.sft_steps, args.sft_batch = 50, 8, 2, 4
        args.dpo_prompts, args.dpo_batch, args.beam, args.decode_batch, args.history = 2, 2, 4, 4, 5
    t_start = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = TINY if args.tiny else LLAMA2_7B
    import peft
    import transformers

    items, cat_info = load_catalogue(args.catalogue, args.n_items, args.seed)
    scids = [scid(c) for c in items.values()]
    rng = np.random.default_rng(args.seed)
    sft_ex = seq_examples(scids, args.sft_steps * args.sft_batch, args.history, rng)
    dpo_ex = seq_examples(scids, args.dpo_prompts, args.history, rng)
    users = [p for p, _ in seq_examples(scids, args.users, args.history, rng)]
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "tiny": args.tiny,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "shape": {k: v for k, v in shape.items() if v is not None},
        "dtype": str(resolve_dtype(args.dtype, device, frozen_base=True)).removeprefix("torch."),
        "lora": {"r": 16, "target_modules": LORA_TARGETS}, "catalogue": {**cat_info, "items": len(items)},
        "history": args.history, "deadline_s": args.deadline, "stages": {},
    }
    state: dict[str, Any] = {}
    failed = False

    def run_build() -> dict[str, Any]:
        state["model"], state["tok"], n_scid = build(args, shape, [p for p, _ in sft_ex], scids, device)
        state["catalog"] = SCIDCatalog.from_scids(scid_table(items, scids), state["tok"])
        report["shape"]["vocab_size"] = state["model"].get_base_model().config.vocab_size
        return {"params": sum(p.numel() for p in state["model"].parameters()), "scid_tokens": n_scid}

    stages = {
        "build": run_build,
        "sft": lambda: sft(state["model"], state["tok"], sft_ex, args.sft_batch, device),
        "dpo": lambda: dpo(state["model"], state["tok"], dpo_ex, scids, args.rejected, args.dpo_batch, device, args.seed),
        "decode": lambda: decode(state["model"], state["tok"], state["catalog"], users, args.beam, args.decode_batch, device),
    }
    for name in STAGES:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.deadline or (name != "build" and "model" not in state):
            why = f"deadline {args.deadline:.0f}s reached at {elapsed:.0f}s" if elapsed > args.deadline else "no model (build failed)"
            report["stages"][name] = {"skipped": why}
            write(report, args.out)
            continue
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            out = stages[name]()
        except Exception as err:  # e.g. out of memory: keep the report, and try the stages that can still run
            report["stages"][name] = {"error": f"{type(err).__name__}: {err}"[:2000], "seconds": time.perf_counter() - t0}
            write(report, args.out)
            print(f"{name} failed: {err}", file=sys.stderr, flush=True)
            failed = True
            if device == "cuda":
                torch.cuda.empty_cache()
            continue
        if device == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - t0
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        if name in ("sft", "dpo"):  # DPO: wall time, the reference pass included (tokens_per_s_train: without)
            out["tokens_per_s"] = out["tokens"] / out["seconds"]
        elif name == "decode":
            out["users_per_s"] = out["users"] / out["seconds"]
        report["stages"][name] = out
        write(report, args.out)
        print(f"{name}: {json.dumps(out)}", flush=True)
    report["total_seconds"] = time.perf_counter() - t_start
    write(report, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
