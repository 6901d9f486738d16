"""Constrained decoding: our vectorized trie beam search vs HF `generate` + a Python-trie callback.

The catalogue is LC-Rec's 4-level item codes for Amazon Instruments (9,922 items, tokens like
"<a_12>"), mapped into a vocabulary built here; prompts are users' real histories from
Instruments.inter.json (last <= 20 items, 4 code tokens each). The model is a from-config Llama with
seeded random weights (the ranking is what matters, not its quality). Both decoders see the same model,
prompts, batch size and beam width; the baseline is the approach of LC-Rec and most TIGER
re-implementations: `generate(num_beams=W, prefix_allowed_tokens_fn=...)` walking a dict trie.

    python benchmarks/decoding_benchmark.py                       # ~10k items, 64 users, beam 20
    python benchmarks/decoding_benchmark.py --hidden 256 --layers 4 --users 32 --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, constrained_beam_search

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruments-lcrec"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
TEMPLATE = ["the", "user", "has", "bought", ":", "next", "item", "?"]  # a fixed word frame around the history


def load(data_dir: Path, n_users: int, max_history: int, seed: int):
    index = json.loads((data_dir / "Instruments.index.json").read_text())
    inter = json.loads((data_dir / "Instruments.inter.json").read_text())
    code_tokens = sorted({t for toks in index.values() for t in toks}, key=lambda t: (t[1], int(t[3:-1])))
    vocab = {t: i for i, t in enumerate(SPECIALS + TEMPLATE + [","] + code_tokens)}
    # LC-Rec's released codes collide for a few items (25 of 9,922); a catalogue needs unique SCIDs, so
    # the first item of each code is kept (histories still show every item's code).
    first: dict[tuple[str, ...], str] = {}
    for k in sorted(index, key=int):
        first.setdefault(tuple(index[k]), k)
    item_keys = list(first.values())
    rows = torch.tensor([[vocab[t] for t in index[k]] for k in item_keys])
    catalog = SCIDCatalog.from_token_ids(rows, item_keys)
    users = sorted(inter, key=int)
    gen = torch.Generator().manual_seed(seed)
    picked = [users[i] for i in torch.randperm(len(users), generator=gen)[:n_users].tolist()]
    prompts = []
    for u in picked:
        history = inter[u][:-1][-max_history:]  # leave-one-out: the last item is the target
        ids = [vocab["<s>"]] + [vocab[w] for w in TEMPLATE[:4]]
        for k, it in enumerate(history):
            ids += ([vocab[","]] if k else []) + [vocab[t] for t in index[str(it)]]
        ids += [vocab[w] for w in TEMPLATE[4:]]
        prompts.append(ids)
    return vocab, catalog, prompts, len(index)


def python_trie(rows: torch.Tensor) -> dict:
    root: dict = {}
    for r in rows.tolist():
        node = root
        for t in r:
            node = node.setdefault(t, {})
    return root


def hf_decode(model, batch: list[list[int]], trie: dict, beam: int, top_k: int, n_levels: int, pad: int):
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(batch):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1

    def allowed(batch_id: int, sent: torch.Tensor) -> list[int]:
        node = trie
        for t in sent[width:].tolist():
            node = node[t]
        return list(node)

    out = model.generate(
        input_ids=ids, attention_mask=mask, num_beams=beam, num_return_sequences=top_k, max_new_tokens=n_levels,
        min_new_tokens=n_levels, do_sample=False, length_penalty=0.0, early_stopping=True, pad_token_id=pad,
        prefix_allowed_tokens_fn=allowed, output_scores=True, return_dict_in_generate=True,
    )
    seqs = out.sequences[:, width:].view(len(batch), top_k, n_levels)
    return seqs, out.sequences_scores.view(len(batch), top_k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--beam", type=int, default=20)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-history", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    if not (args.data / "Instruments.index.json").is_file():
        raise SystemExit(f"no Instruments.index.json under {args.data} (pass --data DIR)")
    torch.set_num_threads(args.threads)
    vocab, catalog, prompts, n_index = load(args.data, args.users, args.max_history, args.seed)
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab), hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32), max_position_embeddings=512,
        pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
    )
    model = LlamaForCausalLM(cfg).eval()
    trie = python_trie(catalog.token_ids)
    n_levels, pad = catalog.n_levels, vocab["<pad>"]
    batches = [prompts[s:s + args.batch_size] for s in range(0, len(prompts), args.batch_size)]

    # warm-up both paths once, then alternate batch by batch so background load hits both alike
    with torch.no_grad():
        constrained_beam_search(model, batches[0][:2], catalog, args.beam, args.top_k, batch_size=2, pad_token_id=pad)
        hf_decode(model, batches[0][:2], trie, args.beam, args.top_k, n_levels, pad)
    t_ours = t_hf = 0.0
    same_lists = invalid_ours = invalid_hf = 0
    max_score_gap = 0.0
    with torch.no_grad():
        for batch in batches:
            t0 = time.perf_counter()
            idx, score = constrained_beam_search(model, batch, catalog, args.beam, args.top_k, batch_size=len(batch), pad_token_id=pad)
            t1 = time.perf_counter()
            seqs, hf_score = hf_decode(model, batch, trie, args.beam, args.top_k, n_levels, pad)
            t2 = time.perf_counter()
            t_ours += t1 - t0
            t_hf += t2 - t1
            hf_idx = catalog.index_of_tokens(seqs.reshape(-1, n_levels)).view(len(batch), args.top_k)
            invalid_hf += int((hf_idx < 0).sum())
            invalid_ours += int((idx < 0).sum())
            same_lists += int((hf_idx == idx).all(-1).sum())
            max_score_gap = max(max_score_gap, float((hf_score - score).abs().max()))
    n = len(prompts)
    result = {
        "items": catalog.n_items, "items_dropped_as_code_collisions": n_index - catalog.n_items, "levels": n_levels, "users": n, "beam": args.beam, "top_k": args.top_k,
        "batch_size": args.batch_size, "model": f"Llama hidden={args.hidden} layers={args.layers} vocab={len(vocab)} "
        f"params={sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
        "mean_prompt_tokens": sum(map(len, prompts)) / n, "threads": torch.get_num_threads(),
        "ours_ms_per_user": 1000 * t_ours / n, "hf_trie_ms_per_user": 1000 * t_hf / n, "speedup": t_hf / t_ours,
        "identical_top_k_users": same_lists, "invalid_ours": invalid_ours, "invalid_hf": invalid_hf,
        "max_abs_score_gap": max_score_gap, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
