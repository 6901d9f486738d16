"""Supervised fine-tuning of a RecLM with the Hugging Face Trainer.

Examples are laid out as the contract says, ``encode_prompt(tok, prompt) + encode_response(tok, response)``,
and the loss is the causal-LM cross-entropy on the response tokens only (prompt positions are labelled -100).

Runs live in a stable work directory (``output_dir``): the initial model and tokenizer (``init/``), the
Trainer's checkpoints (``checkpoint-<step>/``, optimizer and RNG states included) and a fingerprint of what
is being trained. A rerun after a kill finds the last checkpoint there and resumes from its step; a rerun
with other data, parameters or world size finds a different fingerprint and starts afresh.

Distributed data parallel: with ``nproc_per_node > 1`` the caller's process writes the tokenised data and
the initial model to ``<output_dir>/job``, launches ``torchrun --standalone --nproc_per_node=N -m
align3gr_pipelines.sft_trainer <job>`` (NCCL on GPUs, gloo on CPU), waits, and loads the model rank 0
wrote. Only the caller (a single Kedro process) ever writes catalog outputs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from align3gr_pipelines.backbone import build_backbone, scid_vocabulary
from align3gr_pipelines.rec_lm import RecLM, encode_response, pick_device
from align3gr_pipelines.scid import split_tokens
from align3gr_pipelines.tca4rec import TCA4Rec, history_from_prompt

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
FINGERPRINT_FILE = "run_fingerprint.json"
# Trainer settings that do not change what is trained: a rerun may change them and still resume.
RESUME_NEUTRAL = ("output_dir", "progress_bar", "keep_checkpoints", "torch_threads", "launch_timeout_s")


# ---------------------------------------------------------------------------------------------- data


def encode_examples(
    tokenizer: Any,
    prompts: list[str],
    responses: list[str],
    max_length: int,
    prompt_label_ids: set[int] | frozenset[int] = frozenset(),
    with_index: bool = False,
    label_prompt: list[bool] | None = None,
) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids and labels per example; examples longer than `max_length` are dropped (count returned).

    Prompt positions are unlabelled (-100) except tokens in `prompt_label_ids`: with the item SCID tokens
    there, the history inside a prompt is trained too (each item predicted from the items before it), the
    all-positions supervision SASRec gets from a sequence, at no extra forward cost.
    ``with_index`` adds ``example`` (position in the inputs) and ``response_start`` (first response index).
    ``label_prompt`` (one flag per example) limits that to the flagged examples, e.g. the sequence tasks:
    an item SCID inside another task's prompt (C1's "what is <i..>?") has no history before it, and
    training it as a next-item target pulls the item prior towards uniform.
    """
    if label_prompt is not None and len(label_prompt) != len(prompts):
        raise ValueError(f"encode_examples: {len(label_prompt)} label_prompt flags for {len(prompts)} prompts")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]  # == encode_prompt, batched
    out, dropped = [], 0
    for k, (p_ids, response) in enumerate(zip(prompt_ids, responses)):
        r_ids = encode_response(tokenizer, response)
        if len(p_ids) + len(r_ids) > max_length:
            dropped += 1
            continue
        labelled = prompt_label_ids if label_prompt is None or label_prompt[k] else frozenset()
        p_labels = [i if i in labelled else IGNORE_INDEX for i in p_ids]
        out.append({"input_ids": list(p_ids) + r_ids, "labels": p_labels + r_ids})
        if with_index:
            out[-1].update(example=k, response_start=len(p_ids))
    return out, dropped


class ExampleDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, list[int]]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        return self.rows[i]


@dataclass
class PadCollator:
    """Right-pads a batch to its longest example; padding is masked from attention and loss."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for k, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[k, :n] = torch.tensor(b["input_ids"])
            labels[k, :n] = torch.tensor(b["labels"])
            mask[k, :n] = 1
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "tca_row" in batch[0]:  # TCA4Rec training rows (validation rows never carry them: plain CE)
            out.update(_tca4rec_batch(batch))
        return out


def _tca4rec_batch(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    fields = {
        "tca_row": torch.tensor([b["tca_row"] for b in batch], dtype=torch.long),
        "tca_start": torch.tensor([b["tca_start"] for b in batch], dtype=torch.long),
    }
    shaped = [b["tca_dist"] for b in batch if "tca_dist" in b]
    if shaped:  # plain-CE rows get zeros, which the loss never reads
        dist = torch.zeros((len(batch), *shaped[0].shape))
        for k, b in enumerate(batch):
            if "tca_dist" in b:
                dist[k] = b["tca_dist"]
        fields["tca_dist"] = dist
    return fields


# ------------------------------------------------------------------------------------------- training


@dataclass
class TrainResult:
    log_history: list[dict[str, Any]]
    global_step: int
    max_steps: int
    resumed_from_step: int
    tokens_per_s: float
    tokens_seen: int
    train_runtime_s: float
    world_size: int
    device: str
    early_stopped: bool
    best_eval_loss: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _throughput_callback() -> Any:
    """Non-padding tokens per second over this session's steps (a resumed run counts only its own).
    Built on call: importing the Trainer stack costs seconds, which `kedro` commands should not pay."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        seconds, tokens = 0.0, 0

        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

        def on_train_end(self, args, state, control, **kwargs):
            self.seconds = time.perf_counter() - self.t0
            self.tokens = state.num_input_tokens_seen - self.tokens0

    return Throughput()


SELECTION_METRICS = ("valid_recall", "eval_loss")


def selection_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """`trainer.model_selection` with defaults; metric eval_loss = the loss of the valid SEQ examples."""
    sel = {"metric": "eval_loss", "k": 10, "n_users": 200, "beam_width": 20, "batch_size": 64,
           **(cfg.get("model_selection") or {})}
    if sel["metric"] not in SELECTION_METRICS:
        raise ValueError(f"sft_train.trainer.model_selection.metric must be one of {SELECTION_METRICS}, got {sel['metric']!r}")
    return sel


def selection_metric(cfg: dict[str, Any]) -> str:
    """The Trainer's metric_for_best_model (early stopping watches it too)."""
    sel = selection_settings(cfg)
    return "eval_loss" if sel["metric"] == "eval_loss" else f"eval_recall@{int(sel['k'])}"


def valid_recall_callback(score: Any, key: str) -> Any:
    """A Trainer callback that adds `score(model)` (e.g. valid Recall@10 with the constrained decoder) to
    every evaluation's metrics under `key`, before checkpoint selection and early stopping read them, and
    to the evaluation's entry of the log history (so the curve survives a resume and reaches MLflow).
    Put it before the EarlyStoppingCallback: callbacks run in order."""
    from transformers import TrainerCallback

    class ValidRecall(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            was_training = model.training
            model.eval()
            try:
                value = float(score(model))
            finally:
                model.train(was_training)
            if metrics is not None:
                metrics[key] = value
            for entry in reversed(state.log_history):
                if "eval_loss" in entry and entry.get("step") == state.global_step:
                    entry[key] = value
                    break
            log.info("sft_train: step %d %s %.4f", state.global_step, key, value)

    return ValidRecall()


def _bf16(setting: Any) -> bool:
    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(setting)


def training_arguments(cfg: dict[str, Any], output_dir: str, seed: int) -> Any:
    from transformers import TrainingArguments

    device = pick_device(cfg.get("device", "auto"))
    eval_steps = int(cfg["eval_steps"])
    warmup = float(cfg["warmup_ratio"])
    if not 0.0 <= warmup < 1.0:  # as warmup_steps, 1 or more would silently mean a step count
        raise ValueError(f"sft_train.trainer.warmup_ratio must be in [0, 1), got {warmup}")
    return TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=int(cfg["batch_size"]),
        per_device_eval_batch_size=int(cfg.get("eval_batch_size") or cfg["batch_size"]),
        gradient_accumulation_steps=int(cfg["gradient_accumulation_steps"]),
        num_train_epochs=float(cfg["num_train_epochs"]),
        max_steps=int(cfg.get("max_steps") or -1),
        learning_rate=float(cfg["learning_rate"]),
        weight_decay=float(cfg["weight_decay"]),
        adam_beta1=float(cfg.get("adam_beta1", 0.9)),
        adam_beta2=float(cfg.get("adam_beta2", 0.999)),
        max_grad_norm=float(cfg.get("max_grad_norm", 1.0)),
        optim="adamw_torch",
        lr_scheduler_type=cfg["lr_scheduler_type"],
        # transformers >= 5 reads a warmup_steps below 1 as a fraction of all steps (warmup_ratio is deprecated).
        warmup_steps=warmup,
        bf16=_bf16(cfg.get("bf16", "auto")),
        # transformers >= 5.23 (gradient_checkpointing is its deprecated alias); pyproject's floor says so.
        activation_checkpointing=bool(cfg.get("gradient_checkpointing", False)),
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=int(cfg["logging_steps"]),
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,  # early stopping needs a checkpoint at every evaluation
        save_total_limit=int(cfg.get("save_total_limit", 2)),
        load_best_model_at_end=True,
        metric_for_best_model=selection_metric(cfg),
        greater_is_better=selection_metric(cfg) != "eval_loss",
        restore_callback_states_from_checkpoint=True,
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="group_by_length" if cfg.get("group_by_length", True) else "random",
        remove_unused_columns=False,
        label_names=["labels"],
        dataloader_num_workers=int(cfg.get("dataloader_num_workers", 0)),
        use_cpu=device.type == "cpu",
        # Only inside torchrun workers: naming a backend makes accelerate set up a process group.
        ddp_backend=("nccl" if device.type == "cuda" else "gloo") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=not cfg.get("progress_bar", True),
        report_to="none",  # metrics go to MLflow through the stage's metrics JSON and the project hook
        seed=int(seed),
        data_seed=int(seed),
    )


def train_causal_lm(
    model: Any,
    tokenizer: Any,
    train_rows: list[dict[str, list[int]]],
    eval_rows: list[dict[str, list[int]]],
    cfg: dict[str, Any],
    output_dir: str,
    seed: int,
    callbacks: list[Any] | None = None,
    compute_loss_func: Any = None,
    tca4rec: TCA4Rec | None = None,
) -> tuple[Any, TrainResult]:
    """Train with the HF Trainer, resuming from the last checkpoint in `output_dir` if there is one.

    Works the same in a single process and inside a torchrun worker (the Trainer wraps the model in DDP).
    Returns the trainer (its model is the best checkpoint's when eval ran) and a summary. With `tca4rec`,
    training rows carrying ``tca_*`` fields (see `attach_tca4rec_targets`) are trained with its loss.
    """
    from transformers import EarlyStoppingCallback, Trainer

    if not train_rows:
        raise ValueError("sft_train: no training examples left (all longer than max_length?)")
    if not eval_rows:
        raise ValueError("sft_train: no validation examples (sft_examples needs rows with split == 'valid')")
    args = training_arguments(cfg, output_dir, seed)
    throughput = _throughput_callback()
    stop = cfg.get("early_stopping") or {}
    cbs = [throughput, *(callbacks or [])]  # valid-recall scoring comes in `callbacks`, before early stopping
    if stop.get("patience"):
        cbs.append(EarlyStoppingCallback(int(stop["patience"]), float(stop.get("threshold", 0.0))))
    if getattr(model, "peft_config", None) and args.activation_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need a grad-carrying input under frozen embeddings
    if tca4rec is not None and compute_loss_func is not None:
        raise ValueError("sft_train: give either compute_loss_func or tca4rec, not both")
    trainer_class = Trainer if tca4rec is None else _tca4rec_trainer_class()
    extra = {} if tca4rec is None else {"tca4rec": tca4rec}
    trainer = trainer_class(
        **extra,
        model=model,
        args=args,
        train_dataset=ExampleDataset(train_rows),
        eval_dataset=ExampleDataset(eval_rows),
        data_collator=PadCollator(tokenizer.pad_token_id),
        callbacks=cbs,
        compute_loss_func=compute_loss_func,
    )
    last = last_complete_checkpoint(output_dir)
    resumed = 0
    if last:
        resumed = json.loads((Path(last) / "trainer_state.json").read_text())["global_step"]
        log.info("sft_train: resuming from %s (step %d)", last, resumed)
    trainer.train(resume_from_checkpoint=last)
    state = trainer.state
    evals = [h["eval_loss"] for h in state.log_history if "eval_loss" in h]
    result = TrainResult(
        log_history=list(state.log_history),
        global_step=int(state.global_step),
        max_steps=int(state.max_steps),
        resumed_from_step=int(resumed),
        tokens_per_s=float(throughput.tokens / max(throughput.seconds, 1e-9)),
        tokens_seen=int(throughput.tokens),
        train_runtime_s=float(throughput.seconds),
        world_size=int(args.world_size),
        device=str(args.device),
        early_stopped=int(state.global_step) < int(state.max_steps),
        best_eval_loss=float(min(evals)) if evals else None,
    )
    return trainer, result


# ----------------------------------------------------------------------------- TCA4Rec objective

OBJECTIVES = ("ce", "tca4rec")
TCA4REC_SETTINGS = ("alpha", "variant", "label", "temperature")
TCA4REC_FIELDS = ("tca_row", "tca_start", "tca_dist")
TCA4REC_TASK = "seq"  # the only task whose response is the next item of a history


def tca4rec_settings(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """The `sft_train.tca4rec` block when `sft_train.objective` is tca4rec, None for plain CE."""
    objective = cfg.get("objective") or "ce"
    if objective not in OBJECTIVES:
        raise ValueError(f"sft_train.objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "ce":
        return None
    settings = dict(cfg.get("tca4rec") or {})
    unknown = set(settings) - set(TCA4REC_SETTINGS)
    if unknown:
        raise ValueError(f"sft_train.tca4rec: unknown keys {sorted(unknown)}; expected {list(TCA4REC_SETTINGS)}")
    return settings


def _tca4rec_trainer_class() -> type:
    from transformers import Trainer

    class TCA4RecTrainer(Trainer):
        """Trains with `TCA4Rec.loss` on batches carrying ``tca_*`` fields; evaluation stays plain CE."""

        def __init__(self, *args: Any, tca4rec: TCA4Rec, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tca4rec = tca4rec

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            fields = {k: inputs.pop(k) for k in TCA4REC_FIELDS if k in inputs}
            if not fields or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            # Same normalisation as the model's own loss: over the accumulated batch's labelled tokens when
            # the Trainer counts them for the model, else a per-batch mean the Trainer divides by GA steps.
            n_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss = self.tca4rec.loss(outputs.logits, labels, fields["tca_row"], fields["tca_start"],
                                     num_items_in_batch=n_items, dist=fields.get("tca_dist"))
            return (loss, outputs) if return_outputs else loss

    return TCA4RecTrainer


def attach_tca4rec_targets(
    rows: list[dict[str, Any]],
    examples: pd.DataFrame,
    item_scids: pd.DataFrame,
    tca4rec: TCA4Rec,
    cf_model: Any = None,
    batch_size: int = 512,
) -> int:
    """Give each training row (from `encode_examples(..., with_index=True)` over `examples`) its TCA4Rec fields:
    ``tca_row`` (target's item_scids row, -1 = plain CE), ``tca_start`` (index of its first response SCID
    token) and, for SEQ rows, ``tca_dist`` [L, V], the label distribution p_u computed once from the frozen
    CF model's scores of the history in the prompt (or the uniform ablation). Returns the count of SEQ rows."""
    levels = int(tca4rec.codes.shape[1])
    row_by_tokens = {str(t): k for k, t in enumerate(item_scids["tokens"])}
    item_by_tokens = {str(t): str(i) for t, i in zip(item_scids["tokens"], item_scids["id"])}
    tasks, prompts, responses = (examples[c].astype(str).tolist() for c in ("task", "prompt", "response"))
    seq: list[dict[str, Any]] = []
    for r in rows:
        r.update(tca_row=-1, tca_start=-1)
        if tasks[r["example"]] != TCA4REC_TASK:
            continue
        response = "".join(split_tokens(responses[r["example"]]))
        if response not in row_by_tokens:
            raise ValueError(f"sft_examples: SEQ response {responses[r['example']]!r} is not the SCID of any item in item_scids")
        r.update(tca_row=row_by_tokens[response], tca_start=int(r["response_start"]))
        seq.append(r)
    needs_cf = tca4rec.label == "cf"
    if needs_cf and cf_model is None:
        raise ValueError("TCA4Rec with label='cf' needs the CF model (sasrec_model)")
    for k in tqdm(range(0, len(seq), batch_size), desc="tca4rec: collaborative labels", disable=len(seq) <= batch_size):
        chunk = seq[k : k + batch_size]
        targets = torch.tensor([r["tca_row"] for r in chunk], dtype=torch.long)
        cf_logits = None
        if needs_cf:
            histories = [history_from_prompt(prompts[r["example"]], item_by_tokens, levels) for r in chunk]
            with torch.no_grad():
                cf_logits = cf_model.score(histories)
        dist = tca4rec.target_distribution(targets, cf_logits)
        for r, d in zip(chunk, dist):
            r["tca_dist"] = d.clone()
    return len(seq)


def cf_model_fingerprint(cf_model: Any) -> str:
    """A content hash of a torch CF model's weights and item table (resume must not mix CF models)."""
    digest = hashlib.sha256(",".join(getattr(cf_model, "item_ids", [])).encode())
    for name, tensor in sorted(cf_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------- run orchestration


def frame_fingerprint(df: pd.DataFrame) -> str:
    """A content hash of a table's scalar columns (list columns as their string form)."""
    if df is None or len(df) == 0:
        return "empty"
    flat = df.apply(lambda c: c.astype(str) if c.dtype == object else c)
    digest = hashlib.sha256(pd.util.hash_pandas_object(flat, index=False).to_numpy().tobytes())
    digest.update(",".join(map(str, df.columns)).encode())
    return digest.hexdigest()[:16]


def _prepare_output_dir(output_dir: Path, fingerprint: dict[str, Any]) -> bool:
    """True when `output_dir` holds a resumable run of exactly this fingerprint; otherwise empties it."""
    marker = output_dir / FINGERPRINT_FILE
    if marker.is_file() and json.loads(marker.read_text()) == fingerprint and (output_dir / "init").is_dir():
        return True
    if output_dir.exists():
        if any(output_dir.iterdir()) and not marker.is_file():
            raise ValueError(
                f"sft_train.trainer.output_dir {output_dir} is not empty and holds no {FINGERPRINT_FILE}: it is not "
                "an sft_train work directory, so it will not be emptied; point output_dir at a directory of its own"
            )
        log.info("sft_train: %s holds another run (or none); starting afresh", output_dir)
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    return False


def _split_rows(examples: pd.DataFrame, cfg: dict[str, Any], seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    for col in ("prompt", "response", "split"):
        if col not in examples.columns:
            raise ValueError(f"sft_train: 'sft_examples' lacks column {col!r}; it has {list(examples.columns)}")
    train = examples[examples["split"] == "train"]
    valid = examples[examples["split"] == "valid"]
    cap = cfg.get("max_eval_examples")
    if cap and len(valid) > int(cap):  # eval loss is a trend line, a fixed random subset is enough
        valid = valid.iloc[np.sort(np.random.default_rng(seed).choice(len(valid), int(cap), replace=False))]
    return train, valid


def recall_scorer(rec: RecLM, item_scids: pd.DataFrame, seq_eval_prompts: pd.DataFrame | None,
                  selection: dict[str, Any], seed: int) -> Any:
    """model -> valid Recall@K over a seeded sample of valid users (the same users at every evaluation)."""
    from types import SimpleNamespace

    from align3gr_pipelines.valid_recall import build_valid_sample, recall_at_k, sample_valid_prompts

    if seq_eval_prompts is None:
        raise ValueError("sft_train.trainer.model_selection.metric=valid_recall needs 'seq_eval_prompts' (from sft_data); "
                         "pass it or set model_selection.metric: eval_loss")
    n_users = selection.get("n_users")
    rows = sample_valid_prompts(seq_eval_prompts, None if n_users is None else int(n_users), seed)
    sample = build_valid_sample(rows, item_scids, rec.tokenizer)
    k, beam, batch = int(selection["k"]), int(selection["beam_width"]), int(selection["batch_size"])
    return lambda model: recall_at_k(SimpleNamespace(model=model, tokenizer=rec.tokenizer), sample, k, beam, batch)


def history_label_flags(train_df: pd.DataFrame, tcfg: dict[str, Any]) -> list[bool] | None:
    """Which training examples get their prompt's item SCIDs labelled (`trainer.history_loss_tasks`):
    None = every example (the old behaviour), else the examples of the listed tasks."""
    tasks = tcfg.get("history_loss_tasks")
    if tasks is None:
        return None
    if "task" not in train_df.columns:
        raise ValueError("sft_train.trainer.history_loss_tasks needs the 'task' column in 'sft_examples'")
    return train_df["task"].isin(list(tasks)).tolist()


def cpu_threads(setting: Any) -> int | None:
    """Intra-op threads for CPU training: 'auto' leaves one core free (torch's spinning workers collapse,
    4x on our 2-core machines, as soon as anything else wants a core); an int forces; None = torch's default."""
    if setting is None or torch.cuda.is_available():
        return None
    if setting == "auto":
        return max(1, (os.cpu_count() or 1) - 1)
    return max(1, int(setting))


def fit_sft(
    examples: pd.DataFrame,
    item_scids: pd.DataFrame,
    user_scids: pd.DataFrame,
    cfg: dict[str, Any],
    seed: int,
    callbacks: list[Any] | None = None,
    compute_loss_func: Any = None,
    cf_model: Any = None,
    seq_eval_prompts: pd.DataFrame | None = None,
) -> tuple[RecLM, dict[str, Any]]:
    """Build (or reload, to resume) the backbone, train it on `examples`, return the RecLM and metrics.

    `callbacks` are extra Trainer callbacks; `compute_loss_func(outputs, labels, num_items_in_batch)`
    replaces the causal-LM cross-entropy (the hook an alternative SFT objective plugs into).
    ``cfg["objective"] == "tca4rec"`` trains the SEQ examples' response SCIDs with TCA4Rec soft labels
    (`tca4rec.py`) from `cf_model` (the tokenization stage's SASRec); validation loss stays plain CE.
    ``trainer.model_selection.metric: valid_recall`` chooses the checkpoint (and stops early) by Recall@K of
    the constrained decoder on a seeded sample of the valid users of `seq_eval_prompts`."""
    torch.manual_seed(seed)
    tcfg = cfg["trainer"]
    selection = selection_settings(tcfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "sft_train: do not start `kedro run` under torchrun/accelerate; run it once and set "
            "sft_train.trainer.nproc_per_node=N — the node launches torchrun itself so that only one "
            "process writes the catalog outputs"
        )
    nproc = int(tcfg.get("nproc_per_node", 1))
    if nproc > 1 and compute_loss_func is not None:
        raise ValueError("sft_train: a custom compute_loss_func cannot cross into torchrun workers; use nproc_per_node=1")
    tca_settings = tca4rec_settings(cfg)
    if tca_settings is not None:
        if nproc > 1:
            raise ValueError(
                "sft_train.objective=tca4rec is single-process only (its loss and per-example labels are not "
                f"carried into torchrun workers); set sft_train.trainer.nproc_per_node=1 (got {nproc}) or objective=ce"
            )
        if compute_loss_func is not None:
            raise ValueError("sft_train: objective=tca4rec and a custom compute_loss_func cannot be combined")
        if tca_settings.get("label", "cf") == "cf" and cf_model is None:
            raise ValueError(
                "sft_train.objective=tca4rec with tca4rec.label=cf needs the collaborative model 'sasrec_model' "
                "(data/06_models/sasrec), which the tokenization stage writes; run `kedro run --pipelines=tokenization` "
                "first, or set sft_train.tca4rec.label=uniform"
            )
    output_dir = Path(tcfg["output_dir"])
    train_df, valid_df = _split_rows(examples, tcfg, seed)
    vocab = scid_vocabulary(item_scids, user_scids)
    levels = len(item_scids["codes"].iloc[0]) if "codes" in item_scids.columns and len(item_scids) else 0
    inputs = {
        "sft_examples": frame_fingerprint(examples[["task", "template_id", "prompt", "response", "split"]]),
        "item_scids": frame_fingerprint(item_scids[["id", "tokens"]]),
        "user_scids": frame_fingerprint(user_scids[["id", "tokens"]]) if len(user_scids) else "empty",
    }
    fingerprint = {"inputs": inputs, "backbone": cfg["backbone"], "seed": int(seed), "nproc": nproc,
                   "trainer": {k: v for k, v in tcfg.items() if k not in RESUME_NEUTRAL}}
    if tca_settings is not None:  # absent for CE, so existing CE work dirs keep their fingerprint
        fingerprint["tca4rec"] = {**tca_settings, "cf_model": cf_model_fingerprint(cf_model) if cf_model is not None else None}
    fingerprint = json.loads(json.dumps(fingerprint, default=str))

    resumable = _prepare_output_dir(output_dir, fingerprint)
    if resumable:
        rec = RecLM.from_pretrained(str(output_dir / "init"), device="cpu", trainable=True)
    else:
        rec = build_backbone(cfg["backbone"], pd.concat([examples["prompt"], examples["response"]]).tolist(), vocab, seed, levels)
        rec.save_pretrained(str(output_dir / "init"))  # the exact starting point a resumed run needs
        (output_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2))
    rec.model.train()

    max_length = int(tcfg["max_length"])
    history_ids = frozenset(rec.token_ids(vocab["item"])) if tcfg.get("history_loss", False) else frozenset()
    train_rows, dropped_train = encode_examples(
        rec.tokenizer, train_df["prompt"].tolist(), train_df["response"].tolist(), max_length, history_ids,
        with_index=tca_settings is not None, label_prompt=history_label_flags(train_df, tcfg),
    )
    tca, n_tca = None, 0
    if tca_settings is not None:
        cf_ids = cf_model.item_ids if tca_settings.get("label", "cf") == "cf" else None
        tca = TCA4Rec.from_item_scids(item_scids, rec.tokenizer, cf_ids, **tca_settings)
        n_tca = attach_tca4rec_targets(train_rows, train_df, item_scids, tca, cf_model)
        if n_tca == 0:
            raise ValueError("sft_train.objective=tca4rec: no SEQ training example (task 'seq') to apply it to")
    eval_rows, dropped_eval = encode_examples(rec.tokenizer, valid_df["prompt"].tolist(), valid_df["response"].tolist(), max_length)
    if dropped_train or dropped_eval:
        log.warning("sft_train: dropped %d train / %d valid examples longer than max_length=%d", dropped_train, dropped_eval, max_length)

    callbacks = list(callbacks or [])
    if selection["metric"] == "valid_recall":
        if nproc > 1:
            log.warning("sft_train: model_selection valid_recall is single-process only; torchrun ranks select on eval_loss")
            tcfg = {**tcfg, "model_selection": {**selection, "metric": "eval_loss"}}
        else:
            callbacks.append(valid_recall_callback(recall_scorer(rec, item_scids, seq_eval_prompts, selection, seed),
                                                   selection_metric(tcfg)))
    if nproc > 1:  # torchrun gives each worker one thread on CPU
        rec, result = _fit_distributed(rec, train_rows, eval_rows, tcfg, seed, output_dir, nproc)
    else:
        threads, previous = cpu_threads(tcfg.get("torch_threads", "auto")), torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            trainer, result = train_causal_lm(
                rec.model, rec.tokenizer, train_rows, eval_rows, tcfg, str(output_dir), seed, callbacks, compute_loss_func,
                tca4rec=tca,
            )
        finally:
            torch.set_num_threads(previous)
        rec.model = trainer.model
        result.extra["torch_threads"] = threads or previous
    rec.model.eval()
    rec.model.to("cpu")

    metrics = training_metrics(result, rec, train_rows, eval_rows, dropped_train + dropped_eval, tcfg)
    metrics["info"]["task_counts"] = train_df["task"].value_counts().to_dict() if "task" in train_df else {}
    objective = "ce" if tca_settings is None else "tca4rec"
    metrics["info"]["objective"] = objective
    if tca_settings is not None:
        metrics["info"]["tca4rec"] = {**tca_settings, "n_train_examples": n_tca}
    rec.meta.update({
        "stage": "sft",
        "objective": objective,  # evaluation labels a tca4rec checkpoint's row "sft+tca4rec"
        "trained_from": inputs,
        "training_args": {"backbone": cfg["backbone"], "trainer": tcfg, "seed": int(seed)},
        "metrics": metrics["scalars"],
        "max_length": max_length,
    })
    if tca_settings is not None:
        rec.meta["tca4rec"] = {**tca_settings, "cf_model": fingerprint["tca4rec"]["cf_model"]}
    if not tcfg.get("keep_checkpoints", False):
        shutil.rmtree(output_dir, ignore_errors=True)
    return rec, metrics


def training_metrics(result: TrainResult, rec: RecLM, train_rows: list, eval_rows: list, dropped: int, tcfg: dict[str, Any]) -> dict[str, Any]:
    curves: dict[str, list[list[float]]] = {"train_loss": [], "eval_loss": [], "learning_rate": [], "grad_norm": []}
    recall_keys = sorted({k for h in result.log_history for k in h if k.startswith("eval_recall@")})
    pairs = [("loss", "train_loss"), ("eval_loss", "eval_loss"), ("learning_rate", "learning_rate"), ("grad_norm", "grad_norm")]
    pairs += [(k, "valid_" + k[len("eval_"):]) for k in recall_keys]  # valid_recall@10: the selection curve
    for h in result.log_history:
        for key, name in pairs:
            if key in h:
                curves.setdefault(name, []).append([int(h["step"]), float(h[key])])
    n_params = sum(p.numel() for p in rec.model.parameters())
    n_trainable = sum(p.numel() for p in rec.model.parameters() if p.requires_grad)
    scalars = {
        "final_train_loss": curves["train_loss"][-1][1] if curves["train_loss"] else None,
        "final_eval_loss": curves["eval_loss"][-1][1] if curves["eval_loss"] else None,
        "best_eval_loss": result.best_eval_loss,
        "tokens_per_s": result.tokens_per_s,
        "train_runtime_s": result.train_runtime_s,
        "global_step": float(result.global_step),
        "n_train_examples": float(len(train_rows)),
        "n_eval_examples": float(len(eval_rows)),
        "n_params": float(n_params),
        "n_trainable_params": float(n_trainable),
        "vocab_size": float(len(rec.tokenizer)),
    }
    for key in recall_keys:
        name = "valid_" + key[len("eval_"):]
        scalars["best_" + name] = max(v for _, v in curves[name])
    scalars = {k: v for k, v in scalars.items() if v is not None}  # JSON has no NaN; absent means not measured
    info = {
        "device": result.device,
        "world_size": result.world_size,
        "resumed_from_step": result.resumed_from_step,
        "max_steps": result.max_steps,
        "early_stopped": result.early_stopped,
        "tokens_seen_this_session": result.tokens_seen,
        # train loss covers the labelled history SCIDs too when history_loss is on; eval loss is response-only
        "history_loss": bool(tcfg.get("history_loss", False)),
        "history_loss_tasks": tcfg.get("history_loss_tasks"),
        "model_selection": selection_metric(tcfg),
        **result.extra,
        "dropped_too_long": dropped,
        "backbone": rec.meta.get("backbone"),
        "peft": rec.meta.get("peft"),
        "mean_tokens_per_example": float(np.mean([len(r["input_ids"]) for r in train_rows])) if train_rows else 0.0,
    }
    return {"scalars": scalars, "curves": curves, "info": info}


# ------------------------------------------------------------------------------------- distributed


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-<step>`` the Trainer finished writing, or None. The Trainer writes
    ``trainer_state.json`` last, so a folder without it was cut short by a kill; such folders (newer than
    the last complete one) are removed, as resuming from them fails and the Trainer would write into them."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = sorted(
        (int(p.name.split("-")[-1]), p) for p in root.iterdir()
        if p.is_dir() and p.name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and p.name.split("-")[-1].isdigit()
    )
    for _, path in reversed(steps):
        if (path / "trainer_state.json").is_file():
            return str(path)
        log.warning("sft_train: %s is incomplete (no trainer_state.json; a kill while saving?): removed", path)
        shutil.rmtree(path, ignore_errors=True)
    return None


def _fit_distributed(
    rec: RecLM, train_rows: list, eval_rows: list, tcfg: dict[str, Any], seed: int, output_dir: Path, nproc: int
) -> tuple[RecLM, TrainResult]:
    job = output_dir / "job"
    shutil.rmtree(job, ignore_errors=True)
    job.mkdir(parents=True)
    torch.save({"train": train_rows, "eval": eval_rows}, job / "data.pt")
    (job / "config.json").write_text(json.dumps({"trainer": tcfg, "seed": seed, "init": str(output_dir / "init"),
                                                 "output_dir": str(output_dir)}, default=str))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "align3gr_pipelines.sft_trainer", str(job)]
    timeout = tcfg.get("launch_timeout_s")
    timeout = None if timeout is None else float(timeout)
    if timeout is not None and timeout <= 0:
        raise ValueError(f"sft_train.trainer.launch_timeout_s must be > 0 or null, got {timeout}")
    log.info("sft_train: launching %s (timeout %s s)", " ".join(cmd), timeout)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # Its own process group, so that a timeout ends torchrun *and* its ranks (a hung gloo rank would
    # otherwise outlive a killed torchrun).
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        returncode = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _end_group(proc)
        raise RuntimeError(
            f"sft_train: distributed training did not finish within sft_train.trainer.launch_timeout_s={timeout:g} s; "
            "its processes were ended (raise the limit for longer runs, or null for none)"
        ) from None
    except BaseException:
        _end_group(proc)
        raise
    if returncode != 0 or not (job / "result.json").is_file():
        raise RuntimeError(f"sft_train: distributed training failed (torchrun exit code {returncode}); see the log above")
    result = TrainResult(**json.loads((job / "result.json").read_text()))
    trained = RecLM.from_pretrained(str(job / "final"), device="cpu", trainable=True)
    trained.meta = rec.meta
    return trained, result


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM, a grace period, then SIGKILL to the process group `proc` leads (started in a new session):
    ranks that outlive torchrun are ended too."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _worker(job_dir: str) -> None:
    """One torchrun rank: train on the job's data; rank 0 writes the final model and the summary."""
    job = Path(job_dir)
    spec = json.loads((job / "config.json").read_text())
    data = torch.load(job / "data.pt")
    rec = RecLM.from_pretrained(spec["init"], device="cpu", trainable=True)
    rec.model.train()
    trainer, result = train_causal_lm(rec.model, rec.tokenizer, data["train"], data["eval"], spec["trainer"],
                                      spec["output_dir"], int(spec["seed"]))
    if trainer.is_world_process_zero():
        rec.model = trainer.model
        rec.save_pretrained(str(job / "final"))
        (job / "result.json").write_text(json.dumps(asdict(result), default=str))
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: torchrun --nproc_per_node=N -m align3gr_pipelines.sft_trainer JOB_DIR")
    _worker(sys.argv[1])
