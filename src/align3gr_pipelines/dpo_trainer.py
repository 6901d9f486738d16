"""A short Softmax-DPO training loop over preference pairs (one prompt, one chosen, N rejected responses).

Used by both DPO stages (self-play and real feedback). One call trains one curriculum stage:

1. The reference is the policy as it enters the stage. Its sequence log-probabilities of every pair are
   computed once, before the first update, and cached — the reference model is never run again and
   never kept in memory. This is what chains the curriculum: the policy after stage i is the
   reference of stage i+1 (``meta["dpo"]["reference_fingerprint"]`` records the hash of its weights).
2. AdamW over the trainable parameters, gradient accumulation, clipping, linear warm-up, tqdm.

LoRA / PEFT: the reference is the base model plus the adapter *as it stood at the start of the stage*
(the previous stage's policy, adapter unmerged); only the adapter (and any ``modules_to_save`` /
trainable-token rows) is trained, the base weights never change, and the next stage keeps training the
same adapter.

Speed: an SCID response is a handful of tokens (one per level + EOS) while the prompt holds a whole
history, so the prompt is run once per example and its KV cache is expanded to the 1 + N responses
(``sequence_logps``); the naive way would run the prompt 1 + N times.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from align3gr_pipelines.constrained_decoding import cache_argument, output_cache
from align3gr_pipelines.rec_lm import RecLM, encode_prompt, encode_response, pick_device
from align3gr_pipelines.softmax_dpo import softmax_dpo_loss

# Curves logged at every optimizer step (names in the metrics JSON).
CURVES = ("loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp", "lr")


@dataclass
class DPOConfig:
    beta: float = 0.1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    batch_size: int = 8  # prompts per micro-batch (each with 1 + N responses)
    grad_accum_steps: int = 1
    epochs: int = 1
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    ref_batch_size: int = 32  # prompts per batch for the one-off reference pass (no gradients)
    device: str = "auto"
    show_progress: bool = True

    @classmethod
    def from_params(cls, params: dict[str, Any], where: str) -> "DPOConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{where}: unknown training parameter(s) {unknown}; expected some of {sorted(known)}")
        cfg = cls(**params)
        for name in ("batch_size", "grad_accum_steps", "epochs", "ref_batch_size"):
            if int(getattr(cfg, name)) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.beta <= 0 or cfg.learning_rate <= 0:
            raise ValueError(f"{where}: beta and learning_rate must be > 0, got {cfg.beta}, {cfg.learning_rate}")
        return cfg


@dataclass
class PreferenceExample:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[list[int]]


# ---------------------------------------------------------------- data


def examples_from_pairs(pairs: pd.DataFrame, tokenizer: Any) -> list[PreferenceExample]:
    """Token ids of each pair, laid out as in SFT: ``encode_prompt(prompt) + encode_response(response)``."""
    for col in ("prompt", "chosen_tokens", "rejected_tokens"):
        if col not in pairs.columns:
            raise ValueError(f"preference pairs: missing column {col!r} (columns: {list(pairs.columns)})")
    cache: dict[str, list[int]] = {}

    def response(tokens: str) -> list[int]:
        if tokens not in cache:
            cache[tokens] = encode_response(tokenizer, tokens)
        return cache[tokens]

    out = []
    for row in pairs.itertuples(index=False):
        rejected = [response(str(t)) for t in row.rejected_tokens]
        if not rejected:
            raise ValueError(f"preference pairs: a pair for prompt {row.prompt[:60]!r}... has no rejected response")
        out.append(PreferenceExample(encode_prompt(tokenizer, row.prompt), response(str(row.chosen_tokens)), rejected))
    return out


def collate(examples: list[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded (so every prompt ends at the last column); responses [B, 1+N, R], chosen first,
    right-padded; padded rejected slots are fully masked."""
    b = len(examples)
    p_len = max(len(e.prompt_ids) for e in examples)
    n_resp = 1 + max(len(e.rejected_ids) for e in examples)
    r_len = max(len(r) for e in examples for r in [e.chosen_ids, *e.rejected_ids])
    prompt = torch.full((b, p_len), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, p_len), dtype=torch.long)
    resp = torch.full((b, n_resp, r_len), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((b, n_resp, r_len), dtype=torch.long)
    for i, e in enumerate(examples):
        prompt[i, p_len - len(e.prompt_ids) :] = torch.tensor(e.prompt_ids)
        prompt_mask[i, p_len - len(e.prompt_ids) :] = 1
        for j, r in enumerate([e.chosen_ids, *e.rejected_ids]):
            resp[i, j, : len(r)] = torch.tensor(r)
            resp_mask[i, j, : len(r)] = 1
    return {"prompt": prompt, "prompt_mask": prompt_mask, "responses": resp, "response_mask": resp_mask}


def _keep_last(model: Any) -> dict[str, int]:
    # Only the last prompt position's logits are needed; skipping the others saves the [B, P, V] LM head.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def sequence_logps(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """log π(response | prompt), summed over response tokens: [B, 1+N] (0 for fully padded slots).

    The prompt runs once; its KV cache is repeated for the 1 + N responses, which then only feed their
    own tokens. Positions follow each row's real length, so left padding does not shift them.
    """
    prompt, prompt_mask = batch["prompt"], batch["prompt_mask"]
    resp, resp_mask = batch["responses"], batch["response_mask"]
    b, c, r = resp.shape
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=prompt, attention_mask=prompt_mask, position_ids=pos, use_cache=True, **_keep_last(model))
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]: distribution of response token 0
    flat = resp.view(b * c, r)
    logp = first.repeat_interleave(c, dim=0).gather(-1, flat[:, :1])  # [B*C, 1]
    if r > 1:
        cache = output_cache(out)
        cache.batch_repeat_interleave(c)
        lengths = prompt_mask.sum(-1).repeat_interleave(c)
        rpos = lengths.unsqueeze(1) + torch.arange(r - 1, device=resp.device)
        # Padded tail tokens of shorter responses are masked out of the sum below; they never influence
        # earlier (real) tokens because attention is causal, so the attention mask can stay all-ones there.
        mask = torch.cat([prompt_mask.repeat_interleave(c, dim=0), torch.ones_like(flat[:, :-1])], dim=1)
        out2 = model(input_ids=flat[:, :-1], attention_mask=mask, position_ids=rpos, use_cache=True, **{cache_argument(model): cache})
        rest = torch.log_softmax(out2.logits.float(), dim=-1).gather(-1, flat[:, 1:].unsqueeze(-1)).squeeze(-1)
        logp = torch.cat([logp, rest], dim=1)
    return (logp * resp_mask.view(b * c, r)).sum(-1).view(b, c)


def _move(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def reference_logps(
    model: Any, examples: list[PreferenceExample], pad_id: int, batch_size: int, show_progress: bool = True
) -> list[torch.Tensor]:
    """Per example, log π_ref of [chosen, rejected_1..N] (a CPU tensor of length 1 + N_i)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Sorting by prompt length keeps left padding small; results go back to their original slots.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    out: list[torch.Tensor | None] = [None] * len(examples)
    for s in tqdm(range(0, len(order), batch_size), desc="reference log-probs", disable=not show_progress):
        idx = order[s : s + batch_size]
        logps = sequence_logps(model, _move(collate([examples[i] for i in idx], pad_id), device)).cpu()
        for row, i in enumerate(idx):
            out[i] = logps[row, : 1 + len(examples[i].rejected_ids)].clone()
    model.train(was_training)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- model helpers


def weights_fingerprint(model: Any) -> str:
    """sha256 of every parameter and buffer (name, dtype, shape, bytes): identical weights, identical hash."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    """Scratch model: every parameter. PEFT model: the adapter (and modules_to_save / trainable-token
    rows) only — a checkpoint reloaded for inference comes back frozen, so those are re-enabled."""
    if hasattr(model, "peft_config"):
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "modules_to_save", "trainable_tokens")):
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
    if not params:
        raise ValueError("DPO: the policy has no trainable parameters")
    return params


def pairs_fingerprint(pairs: pd.DataFrame) -> str:
    cols = [c for c in ("prompt", "chosen_tokens", "rejected_tokens") if c in pairs.columns]
    payload = pairs[cols].to_json(orient="values") if len(pairs) else "[]"
    return hashlib.sha256(payload.encode()).hexdigest()


# ---------------------------------------------------------------- training


@dataclass
class DPOResult:
    curves: dict[str, list[list[float]]]
    scalars: dict[str, float]


def train_dpo(model: Any, examples: list[PreferenceExample], cfg: DPOConfig, pad_id: int, seed: int) -> DPOResult:
    """Train ``model`` in place on the examples with the Softmax-DPO loss; the reference is ``model`` as given."""
    if not examples:
        raise ValueError("DPO: no preference pairs to train on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device

    t0 = time.perf_counter()
    ref = reference_logps(model, examples, pad_id, cfg.ref_batch_size, cfg.show_progress)
    ref_seconds = time.perf_counter() - t0

    params = trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    per_step = cfg.batch_size * cfg.grad_accum_steps
    steps_per_epoch = math.ceil(len(examples) / per_step)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    )
    curves: dict[str, list[list[float]]] = {k: [] for k in CURVES}
    model.train()
    step = 0
    t1 = time.perf_counter()
    bar = tqdm(total=total_steps, desc="softmax-DPO", disable=not cfg.show_progress)
    for _ in range(cfg.epochs):
        order = rng.permutation(len(examples))
        for s in range(0, len(order), per_step):
            step_idx = order[s : s + per_step]
            acc = {k: 0.0 for k in CURVES if k != "lr"}
            for m in range(0, len(step_idx), cfg.batch_size):
                idx = step_idx[m : m + cfg.batch_size]
                batch = _move(collate([examples[i] for i in idx], pad_id), device)
                logps = sequence_logps(model, batch)
                ref_b = torch.zeros_like(logps)
                for row, i in enumerate(idx):
                    ref_b[row, : len(ref[i])] = ref[i].to(device)
                rej_mask = batch["response_mask"][:, 1:, 0].bool()
                out = softmax_dpo_loss(logps[:, 0], logps[:, 1:], ref_b[:, 0], ref_b[:, 1:], cfg.beta, rej_mask)
                # Weight micro-batches by size so an accumulated step is the mean over all its examples.
                w = len(idx) / len(step_idx)
                (out.loss * w).backward()
                acc["loss"] += out.loss.item() * w
                acc["reward_margin"] += out.reward_margin.mean().item() * w
                acc["reward_accuracy"] += out.reward_accuracy.mean().item() * w
                acc["chosen_logp"] += logps[:, 0].mean().item() * w
                rej = logps[:, 1:].detach().masked_fill(~rej_mask, 0.0).sum() / rej_mask.sum().clamp(min=1)
                acc["rejected_logp"] += rej.item() * w
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            for k, v in acc.items():
                curves[k].append([step, float(v)])
            curves["lr"].append([step, float(lr)])
            bar.update(1)
            bar.set_postfix(loss=f"{acc['loss']:.4f}", margin=f"{acc['reward_margin']:.3f}")
    bar.close()
    model.eval()
    train_seconds = time.perf_counter() - t1

    tail = max(1, len(curves["loss"]) // 10)  # "final" = mean over the last 10% of steps

    def final(name: str) -> float:
        return float(np.mean([v for _, v in curves[name][-tail:]]))

    n_rejected = [len(e.rejected_ids) for e in examples]
    scalars = {
        "n_pairs": float(len(examples)),
        "mean_rejected_per_pair": float(np.mean(n_rejected)),
        "optimizer_steps": float(step),
        # At step 0 the policy is the reference, all rewards are 0 and the loss is log(1 + N).
        "loss_at_reference": float(np.mean(np.log1p(n_rejected))),
        "initial_loss": float(curves["loss"][0][1]),
        "final_loss": final("loss"),
        "final_reward_margin": final("reward_margin"),
        "final_reward_accuracy": final("reward_accuracy"),
        "final_chosen_logp": final("chosen_logp"),
        "final_rejected_logp": final("rejected_logp"),
        "reference_seconds": ref_seconds,
        "train_seconds": train_seconds,
        "pairs_per_second": len(examples) * cfg.epochs / max(train_seconds, 1e-9),
    }
    return DPOResult(curves=curves, scalars=scalars)


def require_policy(policy: RecLM | None, dataset: str, hint: str) -> RecLM:
    if policy is None:
        raise ValueError(f"'{dataset}' has no checkpoint (the catalog gave None): {hint}")
    if not isinstance(policy, RecLM):
        raise TypeError(f"'{dataset}' must be an align3gr_pipelines.rec_lm.RecLM, got {type(policy).__name__}")
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
) -> tuple[RecLM, dict[str, Any]]:
    """One curriculum stage: a copy of ``policy`` trained on ``pairs`` against ``policy`` itself as the
    reference. Returns the new RecLM (meta records stage, reference and both weight hashes) and the
    metrics dict ``{"scalars", "curves", "info"}``."""
    model = copy.deepcopy(policy.model)
    model.to(pick_device(cfg.device))
    _disable_activation_checkpointing(model)
    tok = policy.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    reference_fp = weights_fingerprint(model)
    examples = examples_from_pairs(pairs, tok)
    result = train_dpo(model, examples, cfg, pad_id, seed)
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
    }
    meta.update(stage=stage, skipped=False, dpo=dpo_meta)
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
    draw(axes[1, 1], ["lr"], "learning rate")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def stage_metrics_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy (numpy scalars → float)."""
    return json.loads(json.dumps(metrics, default=float))
