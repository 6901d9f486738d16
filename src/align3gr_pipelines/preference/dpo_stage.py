"""One preference stage of the DAG around the Softmax-DPO loop (`dpo_trainer.train_dpo`): check the input
policy, train a copy of it against itself as the reference, record what it was trained from and on, or pass
it through unchanged when the stage is skipped; the stage's metrics JSON and curve figure."""
from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pandas as pd

from align3gr_pipelines.devices import pick_device
from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.preference.dpo_trainer import (
    DPOConfig,
    Selection,
    examples_from_pairs,
    pairs_fingerprint,
    train_dpo,
    weights_fingerprint,
)


def require_policy(policy: RecLM | None, dataset: str, hint: str) -> RecLM:
    if policy is None:
        raise ValueError(f"'{dataset}' has no checkpoint (the catalog gave None): {hint}")
    if not isinstance(policy, RecLM):
        raise TypeError(f"'{dataset}' must be an align3gr_pipelines.lm.rec_lm.RecLM, got {type(policy).__name__}")
    return policy


def _disable_activation_checkpointing(model: Any) -> None:
    # Checkpointing turns the KV cache off in training mode, and the shared-prompt forward needs it; DPO
    # sequences here are short, so the memory it saves is small.
    if hasattr(model, "is_activation_checkpointing"):  # transformers >= 5
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def train_stage(
    policy: RecLM,
    pairs: pd.DataFrame,
    cfg: DPOConfig,
    seed: int,
    stage: str,
    reference: str,
    info: dict[str, Any] | None = None,
    evaluate: Callable[[Any], float] | None = None,
    selection: Selection | None = None,
) -> tuple[RecLM, dict[str, Any]]:
    """One curriculum stage: a copy of ``policy`` (``cfg.in_place``: its own model) trained on ``pairs``
    against ``policy`` itself as the reference. Returns the new RecLM (meta records stage, reference and both weight hashes) and the
    metrics dict ``{"scalars", "curves", "info"}``."""
    model = policy.model if cfg.in_place else copy.deepcopy(policy.model)
    if cfg.nproc_per_node == 1:
        model.to(pick_device(cfg.device))
    # else the torchrun ranks train on their own devices; this copy only receives the trained weights
    _disable_activation_checkpointing(model)
    tok = policy.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    reference_fp = weights_fingerprint(model)
    examples = examples_from_pairs(pairs, tok)
    known = policy.meta.get("valid_recall") or {}
    key = getattr(evaluate, "key", None)
    input_score = known.get("score") if key is not None and known.get("key") == key else None
    if cfg.nproc_per_node == 1:
        result = train_dpo(model, examples, cfg, pad_id, seed, evaluate, selection, input_score)
    else:
        from align3gr_pipelines.preference.dpo_launcher import fit_distributed

        result = fit_distributed(RecLM(model=model, tokenizer=tok, meta=policy.meta), examples, cfg, pad_id, seed,
                                 stage, evaluate, selection, input_score)
    policy_fp = weights_fingerprint(model)
    meta = copy.deepcopy(policy.meta)
    dpo_meta = {
        "stage": stage,
        "reference": reference,
        "reference_fingerprint": reference_fp,
        "policy_fingerprint": policy_fp,
        "config": asdict(cfg),
        "seed": seed,
        "n_pairs": len(examples),
        "selection": asdict(selection) if selection is not None else None,
        "selected_step": int(result.scalars["selected_step"]),
    }
    meta.update(stage=stage, skipped=False, dpo=dpo_meta)
    if "valid_recall_selected" in result.scalars and key is not None:
        meta["valid_recall"] = {"key": key, "score": result.scalars["valid_recall_selected"]}
    else:
        meta.pop("valid_recall", None)
    meta.setdefault("dpo_history", []).append({"stage": stage, "reference": reference, "policy_fingerprint": policy_fp})
    meta["trained_from"] = {"reference_policy": reference_fp, "pairs": pairs_fingerprint(pairs)}
    metrics = {
        "scalars": result.scalars,
        "curves": result.curves,
        "info": {"stage": stage, "reference": reference, "skipped": False, "config": asdict(cfg), **(info or {})},
    }
    return RecLM(model=model, tokenizer=tok, meta=meta), metrics


def pass_through(policy: RecLM, stage: str, reason: str, info: dict[str, Any] | None = None) -> tuple[RecLM, dict[str, Any]]:
    """A stage an ablation mode skips: the unchanged policy, marked ``meta["skipped"] = True``."""
    meta = copy.deepcopy(policy.meta)
    meta.update(stage=stage, skipped=True, skip_reason=reason)
    metrics = {"scalars": {"skipped": 1.0}, "curves": {}, "info": {"stage": stage, "skipped": True, "reason": reason, **(info or {})}}
    return RecLM(model=policy.model, tokenizer=policy.tokenizer, meta=meta), metrics


def plot_dpo_metrics(metrics: dict[str, Any], title: str) -> Any:
    """2×2 figure: loss, reward margin and accuracy, chosen vs rejected log-probs, learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    curves = metrics.get("curves", {})
    if not curves.get("loss"):
        for ax in axes.flat:
            ax.axis("off")
        reason = metrics.get("info", {}).get("reason", "no training")
        axes[0, 0].text(0, 0.5, f"{title}\nskipped: {reason}", fontsize=12, va="center")
        return fig

    def draw(ax: Any, names: list[str], ylabel: str) -> None:
        for name in names:
            xs, ys = zip(*curves[name]) if curves.get(name) else ([], [])
            ax.plot(xs, ys, label=name.replace("_", " "))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    draw(axes[0, 0], ["loss"], "Softmax-DPO loss")
    ref = metrics.get("scalars", {}).get("loss_at_reference")
    if ref is not None:
        axes[0, 0].axhline(ref, ls="--", c="grey", lw=0.8, label="log(1+N) (policy = reference)")
        axes[0, 0].legend(fontsize=8)
    draw(axes[0, 1], ["reward_margin", "reward_accuracy"], "reward")
    draw(axes[1, 0], ["chosen_logp", "rejected_logp"], "sequence log-prob")
    if curves.get("valid_recall"):
        draw(axes[1, 1], ["valid_recall"], "valid recall (selection)")
    else:
        draw(axes[1, 1], ["lr"], "learning rate")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def stage_metrics_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (numpy scalars → float)."""
    return json.loads(json.dumps(metrics, default=float))
