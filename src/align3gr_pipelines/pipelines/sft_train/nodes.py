"""Nodes of the `sft_train` stage: thin orchestration over `align3gr_pipelines.sft.trainer`."""
from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from align3gr_pipelines.lm.rec_lm import RecLM  # noqa: E402
from align3gr_pipelines.sft.trainer import fit_sft  # noqa: E402


def train_sft_model(
    sft_examples: pd.DataFrame,
    item_scids: pd.DataFrame,
    user_scids: pd.DataFrame,
    sasrec_model: Any,
    params: dict[str, Any],
    seed: int,
    seq_eval_prompts: pd.DataFrame | None = None,
) -> tuple[RecLM, dict[str, Any]]:
    """Multi-task SFT of the backbone on the SFT examples; returns the RecLM and its metrics JSON.
    `sasrec_model` (None when tokenization never wrote it) is only used by ``objective: tca4rec``;
    `seq_eval_prompts` by model selection on valid recall (``trainer.model_selection.metric: valid_recall``)."""
    return fit_sft(sft_examples, item_scids, user_scids, params, seed, cf_model=sasrec_model,
                   seq_eval_prompts=seq_eval_prompts)


def plot_training_curve(metrics: dict[str, Any]) -> plt.Figure:
    curves = metrics["curves"]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 4))
    train_label = "train (response + history SCIDs)" if metrics["info"].get("history_loss") else "train (response)"
    if metrics["info"].get("objective") == "tca4rec":  # the train curve is then the soft-label loss, valid stays CE
        train_label += f", TCA4Rec α={metrics['info']['tca4rec'].get('alpha', 0.3)}"
    for name, style, label in (("train_loss", "-", train_label), ("eval_loss", "o-", "valid SEQ (response)")):
        if curves.get(name):
            steps, values = zip(*curves[name])
            ax_loss.plot(steps, values, style, label=label)
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss per labelled token")
    ax_loss.set_title("SFT loss")
    ax_loss.legend()
    recall = [k for k in curves if k.startswith("valid_recall@") and curves[k]]
    if recall:  # the selection metric, on its own axis beside the loss
        steps, values = zip(*curves[recall[0]])
        ax_recall = ax_loss.twinx()
        ax_recall.plot(steps, values, "s--", color="tab:green", label=f"{recall[0]} (selection)")
        ax_recall.set_ylabel(recall[0])
        ax_recall.legend(loc="center right")
    if curves.get("learning_rate"):
        steps, values = zip(*curves["learning_rate"])
        ax_lr.plot(steps, values)
    ax_lr.set_xlabel("optimizer step")
    ax_lr.set_title("learning rate")
    s = metrics["scalars"]
    fig.suptitle(f"sft_train: {s.get('tokens_per_s', 0):.0f} tokens/s, best eval loss {s.get('best_eval_loss', float('nan')):.3f}")
    fig.tight_layout()
    return fig
