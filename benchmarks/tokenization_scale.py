"""Tokenizer training at the paper's Instruments scale (~25k users, ~10k items, ~206k interactions).

Synthetic semantic (768-d, like sentence-t5-base) and CF (64-d) embeddings with a topic structure stand in
for the real ones: the cost of SC-encoder + RQ-VAE training does not depend on what the vectors mean. Runs
phase 1 and phase 2 with the stage's parameters (conf/base/parameters_tokenization.yml), then assigns and
de-duplicates item SCIDs, and prints wall time, CPU time and peak memory.

    python benchmarks/tokenization_scale.py                      # defaults: 24,772 users, 9,922 items
    python benchmarks/tokenization_scale.py --phase2-epochs 2    # a quicker look
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from align3gr_pipelines.tokenizer.rq_vae import effective_codebook_size, usage_stats  # noqa: E402
from align3gr_pipelines.tokenizer.sc_tokenizer import SCTokenizer, U2IData, fit_sc_tokenizer, sample_eval_negatives  # noqa: E402
from align3gr_pipelines.tokenizer.scid_collisions import collision_stats, resolve_collisions  # noqa: E402


def synthetic(n_users: int, n_items: int, n_interactions: int, sem_dim: int, cf_dim: int, topics: int, seed: int):
    """Items belong to topics, users mix two topics; interactions follow taste and item popularity."""
    rng = np.random.default_rng(seed)
    item_topic = rng.integers(0, topics, n_items)
    centres_sem = rng.normal(size=(topics, sem_dim)).astype(np.float32)
    centres_cf = rng.normal(size=(topics, cf_dim)).astype(np.float32)
    item_sem = centres_sem[item_topic] + 0.7 * rng.normal(size=(n_items, sem_dim)).astype(np.float32)
    item_cf = centres_cf[item_topic] + 0.5 * rng.normal(size=(n_items, cf_dim)).astype(np.float32)
    user_topics = rng.integers(0, topics, (n_users, 2))
    user_sem = centres_sem[user_topics].mean(1) + 1.0 * rng.normal(size=(n_users, sem_dim)).astype(np.float32)
    user_cf = centres_cf[user_topics].mean(1) + 0.5 * rng.normal(size=(n_users, cf_dim)).astype(np.float32)
    by_topic = [np.flatnonzero(item_topic == t) for t in range(topics)]
    popularity = rng.zipf(1.5, n_items).astype(np.float64)
    per_user = np.maximum(5, rng.poisson(n_interactions / n_users, n_users))
    train, held_out = [], []
    for u in range(n_users):
        pool = np.concatenate([by_topic[user_topics[u, 0]], by_topic[user_topics[u, 1]]])
        p = popularity[pool] / popularity[pool].sum()
        chosen = rng.choice(pool, size=min(per_user[u], len(pool)), replace=False, p=p)
        train.extend((u, int(i)) for i in chosen[:-2])
        held_out.append((u, int(chosen[-2])))  # the "valid" item, never trained on
    return item_sem, user_sem, item_cf, user_cf, np.array(train), np.array(held_out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=24_772)
    ap.add_argument("--items", type=int, default=9_922)
    ap.add_argument("--interactions", type=int, default=206_153)
    ap.add_argument("--semantic-dim", type=int, default=768)
    ap.add_argument("--cf-dim", type=int, default=64)
    ap.add_argument("--topics", type=int, default=300)
    ap.add_argument("--phase1-epochs", type=int, default=None, help="default: the parameter file's")
    ap.add_argument("--phase2-epochs", type=int, default=None, help="default: the parameter file's")
    ap.add_argument("--threads", type=int, default=None, help="default: the parameter file's num_threads")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()

    params = yaml.safe_load((REPO / "conf/base/parameters_tokenization.yml").read_text())["tokenization"]
    if args.phase1_epochs is not None:
        params["phase1"]["epochs"] = args.phase1_epochs
    if args.phase2_epochs is not None:
        params["phase2"]["epochs"] = args.phase2_epochs
    threads = args.threads if args.threads is not None else params.get("num_threads")
    if threads:
        torch.set_num_threads(threads)

    t0 = time.perf_counter()
    item_sem, user_sem, item_cf, user_cf, pairs, held_out = synthetic(
        args.users, args.items, args.interactions, args.semantic_dim, args.cf_dim, args.topics, args.seed
    )
    t_data = time.perf_counter() - t0
    sc, rq = params["sc_encoder"], params["rq_vae"]
    config = {
        "semantic_dim": args.semantic_dim, "cf_dim": args.cf_dim, "use_cf": True, "u2i_alignment": True, "user_scids": True,
        "sc_hidden_dim": sc["hidden_dim"], "sc_dim": sc["sc_dim"], "dropout": sc["dropout"], "temperature": sc["temperature"],
        "latent_dim": rq["latent_dim"], "rq_hidden_dim": rq["hidden_dim"], "levels": rq["levels"], "beta": rq["beta"],
        "item_codebook_size": effective_codebook_size(args.items, rq["codebook_size"], rq["min_items_per_code"]),
        "user_codebook_size": effective_codebook_size(args.users, rq["codebook_size"], rq["min_items_per_code"]),
    }
    torch.manual_seed(args.seed)
    tok = SCTokenizer(config)
    rng = np.random.default_rng(args.seed)
    neg = sample_eval_negatives(held_out[:, 1], args.items, params["auc"]["n_negatives"], rng)
    data = U2IData(
        item_x=tok.features(item_sem, item_cf), user_x=tok.features(user_sem, user_cf),
        pairs=torch.from_numpy(pairs), eval_users=torch.from_numpy(held_out[:, 0]),
        eval_pos=torch.from_numpy(held_out[:, 1]), eval_neg=torch.from_numpy(neg),
    )
    print(f"data: {args.users} users, {args.items} items, {len(pairs)} training pairs, codebooks "
          f"item {config['item_codebook_size']} / user {config['user_codebook_size']} x {rq['levels']} levels "
          f"({t_data:.1f}s to generate)", flush=True)

    wall, cpu = time.perf_counter(), time.process_time()
    log = fit_sc_tokenizer(
        tok, data, phase1=params["phase1"], phase2=params["phase2"], n_random_negatives=sc["n_random_negatives"],
        kmeans_iters=rq["kmeans_iters"], dead_code_window=rq["dead_code_window"], seed=args.seed,
    )
    train_wall = time.perf_counter() - wall
    codes, residuals = tok.codes("item", data.item_x)
    final, report = resolve_collisions(codes.numpy(), residuals.numpy(), tok.item_rq.quantizer.codebooks.detach().numpy())
    user_codes, _ = tok.codes("user", data.user_x)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    result = {
        "wall_seconds": wall, "train_wall_seconds": train_wall, "cpu_seconds": cpu, "peak_rss_mb": peak_mb,
        "torch_threads": torch.get_num_threads(), "training_pairs": len(pairs),
        "phase1_epochs": params["phase1"]["epochs"], "phase2_epochs": params["phase2"]["epochs"],
        "phase1_auc": log["scalars"].get("phase1_auc"), "phase2_auc": log["scalars"].get("phase2_auc"),
        "item_collisions_before": report["colliding_items_before"], "items_touched": report["items_touched"],
        "item_utilisation": [u["utilisation"] for u in usage_stats(codes.numpy(), config["item_codebook_size"])],
        "user_collision_rate": collision_stats(user_codes.numpy())["collision_rate"],
        "dead_codes_restarted": log["scalars"]["dead_codes_restarted_item"] + log["scalars"]["dead_codes_restarted_user"],
    }
    print(json.dumps(result, indent=2))
    print(f"SC encoders + RQ-VAEs at Instruments scale: {wall / 60:.1f} min wall ({cpu / 60:.1f} min CPU), "
          f"peak memory {peak_mb:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
