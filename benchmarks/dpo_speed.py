"""Wall time of the two DPO stages on the demo: sp_dpo_curriculum (3 stages) and rf_dpo (2 stages).

Runs both Kedro pipelines through a SequentialRunner with the parameters in conf/base, on the demo
artifacts in data/ when they exist (item_scids, user_scids, sft_examples, sft_model). Missing upstream
artifacts are stood in for, at the demo's size, so the DPO stages can be timed on their own:
- item/user SCIDs: 3 levels x 256 codes, drawn hierarchically (codes cluster as RQ-VAE codes do);
- sft_examples: the SEQ prompts of every train_sequences row through `prompts.seq_prompt`;
- sft_model: the sft_train scratch backbone from conf/base/parameters_sft_train.yml, untrained (the cost
  of a forward/backward pass does not depend on the weights; pair statistics do).

    python benchmarks/dpo_speed.py [--threads N] [--out results.json]

Targets: sp_dpo_curriculum <= 180 s, rf_dpo <= 120 s on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from kedro.framework.hooks import hook_impl  # noqa: E402
from kedro.framework.hooks.manager import _create_hook_manager  # noqa: E402
from kedro.io import DataCatalog, MemoryDataset  # noqa: E402
from kedro.runner import SequentialRunner  # noqa: E402

from align3gr_pipelines.lm.rec_lm import RecLM  # noqa: E402
from align3gr_pipelines.pipelines.rf_dpo import create_pipeline as rf_pipeline  # noqa: E402
from align3gr_pipelines.pipelines.sp_dpo_curriculum import create_pipeline as sp_pipeline  # noqa: E402
from align3gr_pipelines.sft.prompts import SEQ_TEMPLATES, seq_prompt  # noqa: E402
from align3gr_pipelines.tokenizer.scid import codes_to_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Kept(MemoryDataset):
    def _release(self) -> None:
        pass


class NodeTimer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t: dict[str, float] = {}

    @hook_impl
    def before_node_run(self, node) -> None:
        self._t[node.name] = time.perf_counter()

    @hook_impl
    def after_node_run(self, node) -> None:
        self.seconds[node.name] = round(time.perf_counter() - self._t[node.name], 2)


def _parquet(rel: str) -> pd.DataFrame | None:
    p = ROOT / "data" / rel
    return pd.read_parquet(p) if p.exists() else None


def _synthetic_scids(ids: list[str], kind: str, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # Hierarchical draw: 24 first-level clusters, 12 sub-clusters each, a free last level; duplicates redrawn.
    seen, rows = set(), []
    for _ in ids:
        while True:
            c0 = int(rng.integers(24)) * 10
            codes = (c0, (c0 + int(rng.integers(12)) * 7) % 256, int(rng.integers(256)))
            if kind == "user" or codes not in seen:
                break
        seen.add(codes)
        rows.append(list(codes))
    return pd.DataFrame({"id": ids, "codes": rows, "tokens": [codes_to_tokens(c, kind) for c in rows]})


def inputs(seed: int) -> tuple[dict, dict]:
    stood_in = {}
    seqs, feedback, inter = _parquet("03_primary/train_sequences.parquet"), _parquet("03_primary/feedback.parquet"), _parquet("02_intermediate/interactions.parquet")
    if seqs is None:
        sys.exit("benchmark needs the demo tables: run `kedro run --pipelines=data_prep` first")
    items = _parquet("02_intermediate/items.parquet")
    item_scids = _parquet("05_model_input/item_scids.parquet")
    if item_scids is None:
        item_scids = _synthetic_scids(items["item_id"].astype(str).tolist(), "item", seed)
        stood_in["item_scids"] = "synthetic 3x256"
    user_scids = _parquet("05_model_input/user_scids.parquet")
    if user_scids is None:
        user_scids = _synthetic_scids(sorted(seqs["user_id"].astype(str).unique()), "user", seed + 1)
        stood_in["user_scids"] = "synthetic 3x256"
    sft = _parquet("05_model_input/sft_examples.parquet")
    if sft is None:
        tok = dict(zip(item_scids["id"], item_scids["tokens"]))
        utok = dict(zip(user_scids["id"], user_scids["tokens"]))
        rng = np.random.default_rng(seed)
        tids = rng.integers(0, len(SEQ_TEMPLATES), len(seqs))
        sft = pd.DataFrame(
            {
                "task": "seq", "template_id": tids,
                "prompt": [seq_prompt([tok[i] for i in h], utok[u], int(t)) for h, u, t in zip(seqs["history"], seqs["user_id"], tids)],
                "response": [tok[t] for t in seqs["target"]], "user_id": seqs["user_id"], "split": "train",
                "target_item_id": seqs["target"],
            }
        )
        stood_in["sft_examples"] = f"{len(sft)} SEQ prompts from train_sequences"
    sft_dir = ROOT / "data/06_models/sft_model"
    if (sft_dir / "_CHECKPOINT_COMPLETE.json").exists():
        policy = RecLM.from_pretrained(str(sft_dir))
    else:
        from align3gr_pipelines.lm.backbone import build_backbone, scid_vocabulary

        cfg = yaml.safe_load((ROOT / "conf/base/parameters_sft_train.yml").read_text())["sft_train"]["backbone"]
        texts = sft["prompt"].tolist() + sft["response"].tolist()
        policy = build_backbone(cfg, texts, scid_vocabulary(item_scids, user_scids), seed, 3)
        policy.model.eval()
        stood_in["sft_model"] = "untrained scratch backbone of conf/base/parameters_sft_train.yml"
    data = {"feedback": feedback, "interactions": inter, "train_sequences": seqs, "item_scids": item_scids,
            "user_scids": user_scids, "sft_examples": sft, "sft_model": policy,
            # DPO stage selection scores valid users' SEQ prompts (issue 15); sft_data writes them
            "seq_eval_prompts": _parquet("05_model_input/seq_eval_prompts.parquet")}
    return data, stood_in


def run(pipe, data: dict, params: dict, seed: int) -> tuple[DataCatalog, NodeTimer, float]:
    catalog = DataCatalog({k: Kept(v) for k, v in data.items()} | {f"params:{k}": Kept(v) for k, v in params.items()}
                          | {"params:seed": Kept(seed)} | {k: Kept() for k in pipe.all_outputs()})
    timer = NodeTimer()
    hooks = _create_hook_manager()
    hooks.register(timer)
    t = time.perf_counter()
    SequentialRunner().run(pipe, catalog, hook_manager=hooks)
    return catalog, timer, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kedro").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    data, stood_in = inputs(args.seed)
    n_params = sum(p.numel() for p in data["sft_model"].model.parameters())
    params = {name: yaml.safe_load((ROOT / f"conf/base/parameters_{name}.yml").read_text())[name] for name in ("sp_dpo_curriculum", "rf_dpo")}
    for p in params.values():  # progress bars off: the timer reports
        for section in ("training", "decoding", "recommend"):
            if section in p:
                p[section]["show_progress"] = False

    sp_cat, sp_timer, sp_s = run(sp_pipeline(), data, params, args.seed)
    rf_data = {**data, "sp_dpo_model_hard": sp_cat.load("sp_dpo_model_hard")}
    rf_cat, rf_timer, rf_s = run(rf_pipeline(), rf_data, params, args.seed)

    def scalars(cat: DataCatalog, name: str) -> dict:
        keep = ("n_pairs", "mean_rejected_per_pair", "optimizer_steps", "initial_loss", "final_loss", "final_reward_margin",
                "final_reward_accuracy", "reference_seconds", "train_seconds", "n_rejected_filled", "pairs_with_fill_fraction",
                "n_from_recommendations", "n_from_user_history", "n_from_unrated", "chosen_from_recommendations_fraction")
        return {k: round(v, 4) for k, v in cat.load(name)["scalars"].items() if k in keep}

    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "stood_in": stood_in,
        "policy_parameters_M": round(n_params / 1e6, 2),
        "sp_dpo_curriculum": {"seconds": round(sp_s, 1), "target_seconds": 180, "nodes": sp_timer.seconds,
                              "stages": {s: scalars(sp_cat, f"sp_dpo_metrics_{s}") for s in ("easy", "medium", "hard")}},
        "rf_dpo": {"seconds": round(rf_s, 1), "target_seconds": 120, "nodes": rf_timer.seconds,
                   "levels": rf_cat.load("rf_dpo_metrics_feedback")["info"]["level_counts"],
                   "stages": {s: scalars(rf_cat, f"rf_dpo_metrics_{s}") for s in ("easy", "hard")}},
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
