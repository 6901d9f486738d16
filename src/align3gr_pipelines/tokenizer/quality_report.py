"""What the tokenizer's codes look like: per side and level, codebook utilisation and perplexity, collisions
before and after resolution, reconstruction loss and U2I AUC, as a long table and a codebook-usage figure."""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def quality_table(scid_report: dict[str, Any], sc_log: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, float]]:
    """(side, level, metric, value) rows and the same figures as flat MLflow scalars."""
    rows: list[dict[str, Any]] = []
    scalars: dict[str, float] = {}
    for side, entry in scid_report.items():
        for u in entry["usage"]:
            for metric in ("utilisation", "perplexity"):
                rows.append({"side": side, "level": u["level"], "metric": metric, "value": u[metric]})
                scalars[f"{side}_l{u['level']}_{metric}"] = u[metric]
        overall = {
            "codebook_size": entry["codebook_size"],
            # absent where the codes were not quantised here (item SCIDs taken from LC-Rec's index)
            **({"reconstruction_loss": entry["reconstruction_loss"]} if "reconstruction_loss" in entry else {}),
            "colliding_before": entry["before"]["colliding"],
            "collision_rate_before": entry["before"]["collision_rate"],
            "colliding_after": entry["after"]["colliding"],
            "collision_rate_after": entry["after"]["collision_rate"],
            "unique_scids": entry["after"]["unique_scids"],
        }
        if "resolution" in entry:
            overall["items_touched_by_resolution"] = entry["resolution"]["items_touched"]
            overall["scid_levels"] = entry["resolution"]["levels"]
        for metric, value in overall.items():
            rows.append({"side": side, "level": None, "metric": metric, "value": float(value)})
            scalars[f"{side}_{metric}"] = float(value)
    for name in ("auc_before_training", "phase1_auc", "phase2_auc"):
        if name in sc_log["scalars"]:
            rows.append({"side": "u2i", "level": None, "metric": name, "value": float(sc_log["scalars"][name])})
    quality = pd.DataFrame(rows, columns=["side", "level", "metric", "value"])
    quality["level"] = quality["level"].astype("Int64")
    return quality, scalars


def usage_figure(scid_report: dict[str, Any]) -> plt.Figure:
    """One panel per side and level: how many items (users) each code holds."""
    sides = list(scid_report)
    levels = max(len(e["usage"]) for e in scid_report.values())
    fig, axes = plt.subplots(len(sides), levels, figsize=(4 * levels, 2.8 * len(sides)), squeeze=False)
    for r, side in enumerate(sides):
        for u in scid_report[side]["usage"]:
            ax = axes[r][u["level"]]
            counts = np.asarray(u["counts"])
            ax.bar(np.arange(len(counts)), counts, width=1.0, color="tab:blue" if side == "item" else "tab:orange")
            ax.set_title(f"{side} level {u['level']}: used {u['utilisation']:.0%}, ppl {u['perplexity']:.1f}/{len(counts)}", fontsize=9)
            ax.set_xlabel("code")
            ax.set_ylabel(f"{side}s")
    fig.suptitle("Codebook usage (before collision resolution)")
    fig.tight_layout()
    return fig
