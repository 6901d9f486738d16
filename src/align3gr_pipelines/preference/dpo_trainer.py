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

Selection (``Selection``): DPO's loss can fall while top-K recall falls too, so a stage is judged on what
is reported. The stage's input policy and the checkpoints every ``eval_every`` optimizer steps (and the
last one) are scored by valid Recall@K (or NDCG@K / MRR@K of the same top-K: ``Selection.metric``) with the
constrained decoder on a seeded sample of valid users (``valid_recall``); the best one is kept, and the
input policy wins ties — a stage never hands on a policy that is worse on that sample than the one it got, unless ``allow_worse`` (then the last checkpoint is kept,
as the paper does). With ``max_p_value`` a checkpoint replaces the input policy only when it beats it on a
one-sided sign test over the sampled users (``valid_recall.sign_test_p``): the maximum over several noisy
evaluations of the same few hundred users is biased upwards, and gains of 2-4 users of 610 chosen that way
did not hold on test (ml-latest-small study, 2026-11-30). Each evaluation also records the drift of the
chosen and rejected log-probabilities (policy − reference, mean over a fixed subset of the pairs), the likelihood-displacement signal.
With ``confirm_half`` the choice (and its gate) uses one seeded half of the sampled users, and the chosen
checkpoint replaces the input policy only if it beats it on the other half too (``confirmed_on_other_half``).
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from align3gr_pipelines.evaluation import valid_recall
from align3gr_pipelines.lm.constrained_decoding import cache_argument, output_cache
from align3gr_pipelines.lm.lean_token_rows import lean_token_rows
from align3gr_pipelines.lm.precision import autocast as autocast_context
from align3gr_pipelines.lm.precision import check_autocast_setting
from align3gr_pipelines.lm.rec_lm import RecLM, encode_prompt, encode_response
from align3gr_pipelines.lm.sharded_decoding import shard_indices
from align3gr_pipelines.preference.softmax_dpo import softmax_dpo_loss

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
    # RPO-style NLL on the chosen response, per token (softmax_dpo.py); 0 = plain Softmax-DPO (the paper).
    nll_weight: float = 0.0
    # true: the stage trains the input policy's own model (no copy: for large models, where a second copy
    # does not fit); the input RecLM object then holds the trained weights. false: a copy is trained.
    in_place: bool = False
    # The policy and reference forward passes (lm.precision.autocast): auto = bf16 autocast on a CUDA GPU,
    # none elsewhere (a CPU run is exact fp32, as before); off | bfloat16 | float16.
    autocast: str = "auto"
    # Processes that train the stage together (issue 27): 1 = in the calling process (before issue 27); N > 1 =
    # `dpo_launcher` runs torchrun --standalone --nproc_per_node=N (one rank per GPU, nccl; gloo on a CPU), each
    # rank taking batch_size / N prompts of every micro-batch, so the gradient is that of the same global batch.
    nproc_per_node: int = 1
    # Seconds the torchrun job may take before its processes are ended and the stage fails; None = no limit.
    launch_timeout_s: float | None = None
    # true: PEFT's trainable-token layers (the SCID rows of the embedding and untied LM head) run
    # `lm.lean_token_rows`'s forward during the stage, which never builds their merged [vocab, hidden] weight
    # (PEFT copies it on every forward and keeps the head's copy for the backward); same values and gradients
    # (the head's to float32 rounding). false: PEFT's forward (before issue 27).
    lean_token_rows: bool = False

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
        if cfg.nll_weight < 0:
            raise ValueError(f"{where}.nll_weight must be >= 0, got {cfg.nll_weight}")
        check_autocast_setting(cfg.autocast, f"{where}.autocast")
        if isinstance(cfg.nproc_per_node, bool) or not isinstance(cfg.nproc_per_node, int) or cfg.nproc_per_node < 1:
            raise ValueError(f"{where}.nproc_per_node must be an integer >= 1, got {cfg.nproc_per_node!r}")
        if cfg.batch_size % cfg.nproc_per_node:
            raise ValueError(
                f"{where}.batch_size={cfg.batch_size} must be divisible by {where}.nproc_per_node={cfg.nproc_per_node}: "
                "each process takes batch_size / nproc_per_node prompts of every micro-batch"
            )
        if cfg.launch_timeout_s is not None and not float(cfg.launch_timeout_s) > 0:
            raise ValueError(f"{where}.launch_timeout_s must be > 0 or null, got {cfg.launch_timeout_s}")
        if not isinstance(cfg.lean_token_rows, bool):
            raise ValueError(f"{where}.lean_token_rows must be true or false, got {cfg.lean_token_rows!r}")
        return cfg


@dataclass
class Selection:
    """Checkpoint selection of one stage on valid Recall@K, NDCG@K or MRR@K (``metric``; module docstring).
    ``enabled: false`` = the paper's behaviour: the last step's policy, no evaluation."""

    enabled: bool = False
    eval_every: int = 8  # optimizer steps between evaluations (the last step is always evaluated)
    n_users: int | None = 200  # seeded sample of valid users (valid_recall.sample_valid_prompts)
    k: int = 10
    beam_width: int = 20
    batch_size: int = 64
    allow_worse: bool = False  # true: keep the last checkpoint even when the input policy scored higher
    # A checkpoint must beat the input policy on the one-sided sign test over the sampled users with p <= this
    # to replace it; null = any higher valid recall does (the behaviour before 2026-11-30).
    max_p_value: float | None = None
    drift_examples: int = 64  # pairs on which the chosen / rejected log-prob drift is measured
    # true: checkpoints are chosen (and gated) on one seeded half of the sampled users, and the chosen one
    # replaces the input policy only if it also beats it on the other half (sign test at max_p_value, or
    # a higher recall when max_p_value is null). false: both on the same users (before 2026-12-03).
    confirm_half: bool = False
    # The per-user score selection, its sign test and confirm_half compare (valid_recall.SELECTION_METRICS):
    # recall = hit@K (before issue 25); ndcg / mrr = NDCG@K / MRR@K of the same decoded top-K, where a
    # preference stage acts (the head of the list). The paper has no selection at all.
    metric: str = "recall"

    @classmethod
    def from_params(cls, params: dict[str, Any] | None, where: str) -> "Selection":
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"{where}: unknown selection parameter(s) {unknown}; expected some of {sorted(known)}")
        sel = cls(**params)
        for name in ("eval_every", "k", "beam_width", "batch_size", "drift_examples"):
            if int(getattr(sel, name)) < 1:
                raise ValueError(f"{where}.{name} must be >= 1, got {getattr(sel, name)}")
        if sel.max_p_value is not None and not 0.0 < float(sel.max_p_value) <= 1.0:
            raise ValueError(f"{where}.max_p_value must be in (0, 1] or null, got {sel.max_p_value}")
        if sel.metric not in valid_recall.SELECTION_METRICS:
            raise ValueError(f"{where}.metric: expected one of {valid_recall.SELECTION_METRICS}, got {sel.metric!r}")
        return sel


def valid_recall_evaluator(
    seq_eval_prompts: pd.DataFrame, item_scids: pd.DataFrame, tokenizer: Any, sel: Selection, seed: int
) -> Callable[[Any], np.ndarray]:
    """model → per-user valid score of ``sel.metric`` on the stage's seeded sample of valid users (the same
    users for every stage): hits@K (bool[n]; their mean is valid Recall@K), or NDCG@K / MRR@K (float[n]).
    Every call also leaves all head metrics of the same decoded lists in ``evaluate.last_head``
    (`valid_recall.head_scores`: recall@K, ndcg@K, mrr@K, hr@1, per user), so the stage can report them
    side by side without a second decode."""
    sample = valid_recall.build_valid_sample(
        valid_recall.sample_valid_prompts(seq_eval_prompts, sel.n_users, seed), item_scids, tokenizer
    )
    return sample_evaluator(sample, tokenizer, sel, seed)


def sample_evaluator(
    sample: valid_recall.ValidSample, tokenizer: Any, sel: Selection, seed: int,
    decode: Callable[[RecLM, valid_recall.ValidSample], np.ndarray] | None = None,
) -> Callable[[Any], np.ndarray]:
    """`valid_recall_evaluator` on an already drawn sample. ``decode`` (RecLM, sample → int64[n, k] lists)
    replaces the one-process constrained decoder: the torchrun ranks of `dpo_launcher` decode their share of
    the users and gather the lists. ``evaluate.sample`` / ``evaluate.seed`` let those ranks rebuild it."""
    key = valid_recall.selection_key(sel.metric, sel.k)
    if decode is None:
        def decode(rec: RecLM, sample: valid_recall.ValidSample) -> np.ndarray:
            return valid_recall.decode_top_k(rec, sample, k=sel.k, beam_width=sel.beam_width, batch_size=sel.batch_size)

    def evaluate(model: Any) -> np.ndarray:
        rec = RecLM(model=model, tokenizer=tokenizer, meta={})
        top = decode(rec, sample)
        evaluate.last_head = valid_recall.head_scores(top, sample.target_index, sel.k)  # type: ignore[attr-defined]
        return evaluate.last_head[key]  # type: ignore[attr-defined]

    evaluate.last_head = None  # type: ignore[attr-defined]
    evaluate.sample, evaluate.seed = sample, seed  # type: ignore[attr-defined]
    # Identifies the sample, decoder settings and score, so a stage can reuse the score its input policy got
    # as the previous stage's selected checkpoint (recorded in meta["valid_recall"]) instead of decoding
    # again. The metric joins the payload only when it is not recall, so recall keys stay as they were.
    payload = json.dumps([sample.prompts, sample.target_index.tolist(), sel.k, sel.beam_width]
                         + ([sel.metric] if sel.metric != "recall" else []))
    evaluate.key = hashlib.sha256(payload.encode()).hexdigest()  # type: ignore[attr-defined]
    # The select / confirm halves of this sample (used with sel.confirm_half), fixed by the run's seed so
    # that every stage splits the same users the same way.
    evaluate.confirm = valid_recall.confirm_half(len(sample), seed)  # type: ignore[attr-defined]
    return evaluate


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
    model: Any, examples: list[PreferenceExample], pad_id: int, batch_size: int, show_progress: bool = True,
    autocast: str = "auto",
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
        with autocast_context(autocast, device):
            logps = sequence_logps(model, _move(collate([examples[i] for i in idx], pad_id), device)).cpu()
        for row, i in enumerate(idx):
            out[i] = logps[row, : 1 + len(examples[i].rejected_ids)].clone()
    model.train(was_training)
    return out  # type: ignore[return-value]


# ---------------------------------------------------------------- model helpers


def _is_trained(name: str) -> bool:
    return any(k in name for k in ("lora_", "modules_to_save", "trainable_tokens"))


def weights_fingerprint(model: Any) -> str:
    """sha256 of the weights DPO can change (name, dtype, shape, bytes): every parameter and buffer of a
    scratch model; only the adapter (LoRA, modules_to_save, trainable-token rows) of a PEFT model, whose
    frozen base (billions of parameters for a 7B LM) DPO never touches. Identical weights, identical hash."""
    h = hashlib.sha256()
    state = model.state_dict()
    if hasattr(model, "peft_config"):
        state = {n: t for n, t in state.items() if _is_trained(n)}
    for name, tensor in sorted(state.items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def trainable_parameters(model: Any) -> list[torch.nn.Parameter]:
    """Scratch model: every parameter. PEFT model: the adapter (and modules_to_save / trainable-token
    rows) only — a checkpoint reloaded for inference comes back frozen, so those are re-enabled."""
    if hasattr(model, "peft_config"):
        for name, p in model.named_parameters():
            if _is_trained(name):
                p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        params = list(model.parameters())
        for p in params:
            p.requires_grad_(True)
    if not params:
        raise ValueError("DPO: the policy has no trainable parameters")
    return params


def trainable_snapshot(model: Any) -> dict[str, torch.Tensor]:
    """Copies of the parameters that train (requires_grad): what selection must be able to restore. The frozen
    base of a PEFT model is not copied."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def restore_snapshot(model: Any, snapshot: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in snapshot:
                p.copy_(snapshot[n])


def pairs_fingerprint(pairs: pd.DataFrame) -> str:
    cols = [c for c in ("prompt", "chosen_tokens", "rejected_tokens") if c in pairs.columns]
    payload = pairs[cols].to_json(orient="values") if len(pairs) else "[]"
    return hashlib.sha256(payload.encode()).hexdigest()


# ---------------------------------------------------------------- training


# A duration shorter than this many ticks of the clock that measured it has no meaningful rate (its
# relative error is over 1%); one at or under zero is a clock or bookkeeping error, not a duration.
MIN_RATE_TICKS = 100


def rate_per_second(count: float, seconds: float, resolution: float | None = None) -> float | None:
    """``count / seconds``, or None when ``seconds`` is not a measurable duration of ``time.perf_counter``
    (or of a clock of the given ``resolution``): negative, not finite, or under ``MIN_RATE_TICKS`` ticks. A
    clamp such as ``max(seconds, 1e-9)`` turned such a duration into 2.6e11 pairs/s."""
    tick = time.get_clock_info("perf_counter").resolution if resolution is None else resolution
    if not math.isfinite(seconds) or seconds < MIN_RATE_TICKS * tick or seconds <= 0:
        return None
    return count / seconds


@dataclass(frozen=True)
class Ranks:
    """This process's place among the torchrun ranks that train one stage together (`dpo_launcher`), in the
    default process group. Every rank holds the same weights, draws the same global batches and takes its
    contiguous share of each micro-batch (`shard_indices`)."""

    rank: int
    world_size: int


def _sharded_reference(
    model: Any, examples: list[PreferenceExample], pad_id: int, cfg: DPOConfig, ranks: Ranks, show: bool
) -> list[torch.Tensor]:
    """`reference_logps` of every example on every rank: each rank runs its block of the examples, then the
    blocks are gathered in rank order (a rank's later slices can come from any block)."""
    import torch.distributed as dist

    mine = shard_indices(len(examples), ranks.rank, ranks.world_size)
    part = reference_logps(model, [examples[i] for i in mine], pad_id, cfg.ref_batch_size, show, cfg.autocast)
    parts: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(parts, part)
    return [t for p in parts for t in p]


def _all_reduce_step(
    params: list[torch.nn.Parameter], acc: dict[str, float], rejected: list[list[float]], device: torch.device
) -> None:
    """Sum the ranks' gradients and step statistics. Each rank scaled its loss by its share of the step's
    examples, so the sums are the one-process gradient and curves of the global batch. The mean rejected
    log-prob of a micro-batch is over its real rejected slots, so it is rebuilt from the summed totals and
    counts (``rejected``: per micro-batch [sum, count, share of the step]); it goes into ``acc`` here."""
    import torch.distributed as dist

    for p in params:  # a rank whose share of the step is empty has no gradient yet
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    handles = [dist.all_reduce(p.grad, async_op=True) for p in params]
    names = [k for k in acc if k != "rejected_logp"]
    stats = torch.tensor([acc[k] for k in names] + [x for r in rejected for x in r[:2]], dtype=torch.float64, device=device)
    dist.all_reduce(stats)
    for h in handles:
        h.wait()
    stats = stats.cpu().tolist()
    acc.update(zip(names, stats))
    sums = stats[len(names):]
    acc["rejected_logp"] = sum(sums[2 * m] / max(sums[2 * m + 1], 1.0) * r[2] for m, r in enumerate(rejected))


@dataclass
class DPOResult:
    curves: dict[str, list[list[float]]]
    scalars: dict[str, float | None]  # None: not measurable (pairs_per_second over a zero duration)


@torch.no_grad()
def _drift(
    model: Any, examples: list[PreferenceExample], ref: list[torch.Tensor], pad_id: int, batch_size: int, autocast: str = "auto"
) -> tuple[float, float]:
    """Mean (policy − reference) log-prob of the chosen and of the rejected responses over ``examples``."""
    now = reference_logps(model, examples, pad_id, batch_size, show_progress=False, autocast=autocast)
    chosen = [float(n[0] - r[0]) for n, r in zip(now, ref)]
    rejected = [float(x) for n, r in zip(now, ref) for x in (n[1:] - r[1:])]
    return float(np.mean(chosen)), float(np.mean(rejected)) if rejected else 0.0


def train_dpo(
    model: Any,
    examples: list[PreferenceExample],
    cfg: DPOConfig,
    pad_id: int,
    seed: int,
    evaluate: Callable[[Any], Any] | None = None,
    selection: Selection | None = None,
    input_score: float | None = None,
    ranks: Ranks | None = None,
) -> DPOResult:
    """Train ``model`` in place on the examples with the Softmax-DPO loss; the reference is ``model`` as given.

    With ``evaluate`` (model → per-user valid hits, or the valid recall itself) and an enabled ``selection``,
    ``model`` ends holding the weights of the best evaluated checkpoint (step 0 = the input policy; ties keep
    the earlier one; with ``selection.max_p_value`` only checkpoints that beat the input policy on the sign
    test qualify), or the last step's weights when ``selection.allow_worse``. ``input_score``: the input
    policy's known valid recall (not decoded again unless the sign test needs its per-user hits).

    ``ranks`` (world_size > 1): this process is one torchrun rank of `dpo_launcher`; the others run the same
    call. Gradients are summed over the ranks by hand (`_all_reduce_step`) rather than by DDP: the step's
    forward runs the model twice (prompt, then responses on its KV cache) and the last micro-batch can leave a
    rank no example, which DDP's one-forward-per-backward hooks do not allow. ``evaluate`` must then be
    collective and return the same scores on every rank (`dpo_launcher` gathers the decoded lists), so every
    rank takes the same selection decisions.

    ``cfg.lean_token_rows``: every forward of the stage (reference, training, drift, selection) runs with
    `lean_token_rows` on ``model``."""
    with lean_token_rows(model) if cfg.lean_token_rows else contextlib.nullcontext():
        return _train_dpo(model, examples, cfg, pad_id, seed, evaluate, selection, input_score, ranks)


def _train_dpo(
    model: Any,
    examples: list[PreferenceExample],
    cfg: DPOConfig,
    pad_id: int,
    seed: int,
    evaluate: Callable[[Any], Any] | None,
    selection: Selection | None,
    input_score: float | None,
    ranks: Ranks | None,
) -> DPOResult:
    """`train_dpo`'s loop."""
    if not examples:
        raise ValueError("DPO: no preference pairs to train on")
    sharded = ranks is not None and ranks.world_size > 1
    if sharded and cfg.batch_size % ranks.world_size:
        raise ValueError(f"DPO: training.batch_size={cfg.batch_size} is not divisible by the {ranks.world_size} processes")
    show = cfg.show_progress and (not sharded or ranks.rank == 0)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device

    t0 = time.perf_counter()
    if sharded:
        ref = _sharded_reference(model, examples, pad_id, cfg, ranks, show)
    else:
        ref = reference_logps(model, examples, pad_id, cfg.ref_batch_size, cfg.show_progress, cfg.autocast)
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
    select = evaluate is not None and selection is not None and selection.enabled
    drift_idx = np.random.default_rng([seed, 7]).permutation(len(examples))[: selection.drift_examples if selection else 64]
    drift_ex, drift_ref = [examples[i] for i in drift_idx], [ref[i] for i in drift_idx]
    gated = select and selection.max_p_value is not None
    halves = select and selection.confirm_half
    # The selection score's curves and scalars are named for it: valid_recall* (as before issue 25), or
    # valid_ndcg* / valid_mrr*; a recall score is per-user hits (bool), the others floats.
    metric = selection.metric if selection is not None else "recall"
    sname = "valid_recall" if metric == "recall" else f"valid_{metric}"
    as_scores = (lambda h: np.asarray(h, dtype=bool)) if metric == "recall" else (lambda h: np.asarray(h, dtype=np.float64))
    for name in (sname, "chosen_logp_drift", "rejected_logp_drift") + (("valid_p_vs_input",) if gated else ()):
        curves[name] = []
    if halves:
        curves[f"{sname}_confirm"] = []
    head: dict[int, dict[str, float]] = {}  # step -> mean head metrics on the whole sample (evaluate.last_head)
    best: dict[str, Any] = {}
    input_hits: list[np.ndarray] = []
    confirm: np.ndarray | None = None  # bool mask of the confirm half, fixed at the first evaluation
    input_state = trainable_snapshot(model) if halves else None
    confirm_hits: dict[int, np.ndarray] = {}  # step -> hits on the confirm half

    def checkpoint(at: int) -> None:
        nonlocal confirm
        c, r = _drift(model, drift_ex, drift_ref, pad_id, cfg.ref_batch_size, cfg.autocast)
        curves["chosen_logp_drift"].append([at, c])
        curves["rejected_logp_drift"].append([at, r])
        if not select:
            return
        was = model.training
        model.eval()
        if at == 0 and input_score is not None and not gated and not halves:
            score, hits = float(input_score), None
        else:
            hits = evaluate(model)
            last_head = getattr(evaluate, "last_head", None)
            if last_head:
                head[at] = {name: float(np.mean(v)) for name, v in last_head.items()}
            if (gated or halves) and np.ndim(hits) != 1:
                raise ValueError("DPO selection: max_p_value and confirm_half need an evaluator that returns per-user hits "
                                 "(or per-user scores)")
            if halves:
                hits = as_scores(hits)
                if confirm is None:  # the evaluator's own halves: the same users for every stage of a seed
                    confirm = getattr(evaluate, "confirm", None)
                    confirm = valid_recall.confirm_half(len(hits), seed) if confirm is None else confirm
                confirm_hits[at] = hits[confirm]
                curves[f"{sname}_confirm"].append([at, float(hits[confirm].mean())])
                hits = hits[~confirm]  # selection and its gate see the select half only
            score = float(np.mean(hits))
        model.train(was)
        curves[sname].append([at, score])
        qualifies = True
        if gated:
            if at == 0:
                input_hits.append(as_scores(hits))
            else:
                p = valid_recall.sign_test_p(as_scores(hits), input_hits[0])
                curves["valid_p_vs_input"].append([at, p])
                qualifies = p <= float(selection.max_p_value)
        if not best or (qualifies and score > best["score"]):
            best.update(score=score, step=at, state=trainable_snapshot(model))

    t_eval = time.perf_counter()
    checkpoint(0)
    eval_seconds = time.perf_counter() - t_eval
    input_eval_seconds = eval_seconds  # spent before the training clock starts
    model.train()
    step = 0
    t1 = time.perf_counter()
    bar = tqdm(total=total_steps, desc="softmax-DPO", disable=not show)
    for _ in range(cfg.epochs):
        order = rng.permutation(len(examples))
        for s in range(0, len(order), per_step):
            step_idx = order[s : s + per_step]
            acc = {k: 0.0 for k in CURVES if k != "lr"}
            rejected: list[list[float]] = []  # sharded: per micro-batch [sum, count, share of the step]
            for m in range(0, len(step_idx), cfg.batch_size):
                idx = step_idx[m : m + cfg.batch_size]
                if sharded:
                    share = len(idx) / len(step_idx)
                    idx = idx[shard_indices(len(idx), ranks.rank, ranks.world_size)]
                    if not len(idx):
                        rejected.append([0.0, 0.0, share])
                        continue
                batch = _move(collate([examples[i] for i in idx], pad_id), device)
                with autocast_context(cfg.autocast, device):  # the backward pass runs outside it, as autocast wants
                    logps = sequence_logps(model, batch)
                ref_b = torch.zeros_like(logps)
                for row, i in enumerate(idx):
                    ref_b[row, : len(ref[i])] = ref[i].to(device)
                rej_mask = batch["response_mask"][:, 1:, 0].bool()
                out = softmax_dpo_loss(
                    logps[:, 0], logps[:, 1:], ref_b[:, 0], ref_b[:, 1:], cfg.beta, rej_mask,
                    nll_weight=cfg.nll_weight, chosen_lengths=batch["response_mask"][:, 0].sum(-1),
                )
                # Weight micro-batches by size so an accumulated step is the mean over all its examples (a
                # rank's slice likewise: the ranks' sum is then the step's mean).
                w = len(idx) / len(step_idx)
                (out.loss * w).backward()
                acc["loss"] += out.loss.item() * w
                acc["reward_margin"] += out.reward_margin.mean().item() * w
                acc["reward_accuracy"] += out.reward_accuracy.mean().item() * w
                acc["chosen_logp"] += logps[:, 0].mean().item() * w
                if sharded:
                    rejected.append([logps[:, 1:].detach().masked_fill(~rej_mask, 0.0).sum().item(),
                                     float(rej_mask.sum().item()), share])
                    continue
                rej = logps[:, 1:].detach().masked_fill(~rej_mask, 0.0).sum() / rej_mask.sum().clamp(min=1)
                acc["rejected_logp"] += rej.item() * w
            if sharded:
                _all_reduce_step(params, acc, rejected, device)
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
            if select and step % selection.eval_every == 0 and step < total_steps:
                t_eval = time.perf_counter()
                checkpoint(step)
                eval_seconds += time.perf_counter() - t_eval
    bar.close()
    t_eval = time.perf_counter()
    checkpoint(step)
    eval_seconds += time.perf_counter() - t_eval
    last_recall = curves[sname][-1][1] if curves[sname] else float("nan")
    selected_step = step
    if select and not selection.allow_worse and best["step"] != step:
        restore_snapshot(model, best["state"])
        selected_step = best["step"]
    confirmation = None
    if halves and not selection.allow_worse and selected_step != 0:
        confirmation = confirmed_on_other_half(confirm_hits[selected_step], confirm_hits[0], selection.max_p_value)
        if not confirmation["confirmed"]:
            restore_snapshot(model, input_state)
            selected_step = 0
    model.eval()
    train_seconds = time.perf_counter() - t1 - (eval_seconds - input_eval_seconds)

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
        "selection_seconds": eval_seconds,
        "selected_step": float(selected_step),
        # Drift of the fixed subset of pairs between the reference and the last / the selected step.
        "final_chosen_logp_drift": curves["chosen_logp_drift"][-1][1],
        "final_rejected_logp_drift": curves["rejected_logp_drift"][-1][1],
        "selected_chosen_logp_drift": dict(map(tuple, curves["chosen_logp_drift"])).get(selected_step, float("nan")),
        "selected_rejected_logp_drift": dict(map(tuple, curves["rejected_logp_drift"])).get(selected_step, float("nan")),
        "train_seconds": train_seconds,
        "pairs_per_second": rate_per_second(len(examples) * cfg.epochs, train_seconds),
    }
    if select:
        scalars.update({
            f"{sname}_input": curves[sname][0][1],
            f"{sname}_last": last_recall,
            f"{sname}_selected": dict(map(tuple, curves[sname]))[selected_step],
            f"{sname}_best": max(v for _, v in curves[sname]),
        })
        # Recall@K, NDCG@K, MRR@K and HR@1 of the input policy and the kept checkpoint on the whole valid
        # sample, from the lists the selection decoded (absent where that policy was not decoded: a reused
        # input score, or an evaluator without last_head).
        for which, at in (("input", 0), ("selected", selected_step)):
            scalars.update({f"valid_{which}_{name}": v for name, v in head.get(at, {}).items()})
        if gated:
            scalars["selected_p_vs_input"] = dict(map(tuple, curves["valid_p_vs_input"])).get(selected_step, 1.0)
        if halves:
            on_confirm = dict(map(tuple, curves[f"{sname}_confirm"]))
            scalars.update({f"{sname}_confirm_input": on_confirm[0], f"{sname}_confirm_selected": on_confirm[selected_step]})
        if confirmation is not None:
            scalars.update(confirm_p_vs_input=confirmation["p"], confirmed=float(confirmation["confirmed"]))
    return DPOResult(curves=curves, scalars=scalars)


def confirmed_on_other_half(selected: np.ndarray, base: np.ndarray, max_p_value: float | None) -> dict[str, Any]:
    """Whether a checkpoint chosen on the select half also beats the input policy on the confirm half (hits,
    or NDCG / MRR, of the same users): the one-sided sign test at ``max_p_value``, or a higher mean when it is
    null."""
    p = valid_recall.sign_test_p(selected, base)
    ok = p <= float(max_p_value) if max_p_value is not None else float(np.mean(selected)) > float(np.mean(base))
    return {"p": float(p), "confirmed": bool(ok)}
