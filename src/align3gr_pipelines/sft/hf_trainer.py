"""One run of the Hugging Face Trainer on tokenised SFT examples: encoding, padding, training arguments,
checkpoint selection (eval loss or valid recall), resume from the last complete checkpoint.

Examples are laid out as the contract says, ``encode_prompt(tok, prompt) + encode_response(tok, response)``,
and the loss is the causal-LM cross-entropy on the response tokens only (prompt positions are labelled -100),
or `tca4rec.TCA4Rec.loss` on rows that carry TCA4Rec fields. With ``trainer.logits: labelled`` the
cross-entropy applies the output layer to the labelled positions only (the same loss, a fraction of the cost:
on SFT batches most positions are prompt or padding). The same loop runs in one process (`trainer.fit_sft`)
and in each torchrun rank (`launcher`).
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from align3gr_pipelines.devices import pick_device
from align3gr_pipelines.lm.rec_lm import encode_response
from align3gr_pipelines.sft.tca4rec import TCA4Rec

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TCA4REC_FIELDS = ("tca_row", "tca_start", "tca_dist", "tca_hist_rows", "tca_hist_starts")

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
    if "tca_hist_rows" in batch[0]:  # positions: all_labelled — the prompts' labelled history SCIDs, -1 padded
        width = max(1, max(len(b["tca_hist_rows"]) for b in batch))
        for key in ("tca_hist_rows", "tca_hist_starts"):
            padded = torch.full((len(batch), width), -1, dtype=torch.long)
            for k, b in enumerate(batch):
                padded[k, : len(b[key])] = torch.tensor(b[key], dtype=torch.long)
            fields[key] = padded
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
CONFIRM_SUFFIX = "_confirm"  # valid recall on the half of the users a checkpoint was not selected on


def selection_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """`trainer.model_selection` with defaults; metric eval_loss = the loss of the valid SEQ examples."""
    sel = {"metric": "eval_loss", "k": 10, "n_users": 200, "beam_width": 20, "batch_size": 64, "confirm_half": False,
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
    Put it before the EarlyStoppingCallback: callbacks run in order. Under torchrun every rank runs it, so
    `score` must return the same value on every rank (`valid_recall_ranks` all-reduces the hits), or the
    ranks would stop early or keep a best checkpoint differently."""
    from transformers import TrainerCallback

    class ValidRecall(TrainerCallback):
        def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
            was_training = model.training
            model.eval()
            try:
                value = score(model)
            finally:
                model.train(was_training)
            # (select, confirm): the Trainer selects on the first; the second is only recorded.
            values = {key: float(value)} if not isinstance(value, tuple) else {key: value[0], key + CONFIRM_SUFFIX: value[1]}
            if metrics is not None:
                metrics.update(values)
            for entry in reversed(state.log_history):
                if "eval_loss" in entry and entry.get("step") == state.global_step:
                    entry.update(values)
                    break
            log.info("sft_train: step %d %s", state.global_step, ", ".join(f"{k} {v:.4f}" for k, v in values.items()))

    return ValidRecall()


def _bf16(setting: Any) -> bool:
    if setting == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(setting)


SHARDED_TRAINING_KEYS = ("fsdp", "fsdp_config", "deepspeed")  # passed to TrainingArguments only when set


def sharded_training(cfg: dict[str, Any]) -> dict[str, Any]:
    """`trainer.fsdp` / `fsdp_config` / `deepspeed` as TrainingArguments keywords, the unset ones left out
    (so a run without them builds exactly the arguments it did before they existed). Copies: TrainingArguments
    rewrites an fsdp_config dict in place, and the parameters also go into the fingerprint and the model meta."""
    out = {key: copy.deepcopy(cfg[key]) for key in SHARDED_TRAINING_KEYS if cfg.get(key) is not None}
    if "fsdp_config" in out and not out.get("fsdp"):
        raise ValueError("sft_train.trainer.fsdp_config is set but sft_train.trainer.fsdp is not; set fsdp "
                         "(e.g. true, or 'full_shard auto_wrap') to turn FSDP on, or drop fsdp_config")
    if out.get("fsdp") and out.get("deepspeed"):
        raise ValueError("sft_train.trainer.fsdp and sft_train.trainer.deepspeed are both set; choose one")
    if out.get("deepspeed"):
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise ImportError("sft_train.trainer.deepspeed is set but the deepspeed package is not installed; "
                              "`pip install deepspeed` (on the training machine), or set it to null")
    return out


def training_arguments(cfg: dict[str, Any], output_dir: str, seed: int) -> Any:
    from transformers import TrainingArguments

    sharded = sharded_training(cfg)
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
        **sharded,
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
    cf_model: Any = None,
) -> tuple[Any, TrainResult]:
    """Train with the HF Trainer, resuming from the last checkpoint in `output_dir` if there is one.

    Works the same in a single process and inside a torchrun worker (the Trainer wraps the model in DDP).
    Returns the trainer (its model is the best checkpoint's when eval ran) and a summary. With `tca4rec`,
    training rows carrying ``tca_*`` fields (see `trainer.attach_tca4rec_targets`) are trained with its loss;
    `cf_model` (the frozen SASRec) labels the history positions of ``tca4rec.positions: all_labelled`` on the fly.
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
    head = _labelled_logits_head(model, logits_setting(cfg), tca4rec is not None, compute_loss_func is not None)
    if tca4rec is not None:
        trainer_class, extra = _tca4rec_trainer_class(), {"tca4rec": tca4rec, "cf_model": cf_model}
    elif head is not None:
        trainer_class, extra = _labelled_logits_trainer_class(), {"head": head}
    else:
        trainer_class, extra = Trainer, {}
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
    result.extra["logits"] = "labelled" if head is not None else "all"  # what ran: a fallback shows here
    if tca4rec is not None:
        result.extra["tca4rec_coverage"] = trainer.tca4rec_coverage()
    return trainer, result


# ---------------------------------------------------------------------------- logits of labelled positions

LOGITS_SETTINGS = ("labelled", "all")


def logits_setting(cfg: dict[str, Any]) -> str:
    """`trainer.logits`: labelled = the CE objective's output layer runs on the labelled positions only; all =
    the model's own loss over logits at every position (the behaviour before the key existed, hence the
    default when it is absent)."""
    value = cfg.get("logits", "all")
    if value not in LOGITS_SETTINGS:
        raise ValueError(f"sft_train.trainer.logits must be one of {LOGITS_SETTINGS}, got {value!r}")
    return value


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [B, L], targets [N]): position t predicts label t+1, as in the HF causal-LM loss (the last
    position predicts nothing); keep marks the positions whose target is labelled, targets lists those
    targets in row-major order (the order of ``hidden[keep]``)."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    keep = shifted != IGNORE_INDEX
    return keep, shifted[keep]


def labelled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """HF's ForCausalLMLoss reduction over logits [N, V] of labelled positions only: float32, then the mean
    over the N targets, or their sum over `num_items_in_batch` (the accumulated batch's labelled count) when
    it is given. No labelled position gives NaN with the mean and 0 with the sum, as there."""
    if num_items_in_batch is None:
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX)
    total = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def output_head(model: Any) -> torch.nn.Module | None:
    """The module a causal LM (PEFT-wrapped or not) applies to its last hidden state to get logits, when its
    loss is HF's causal-LM cross-entropy (which `labelled_cross_entropy` reproduces); None otherwise."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    if getattr(base, "loss_function", None) is not ForCausalLMLoss:
        return None
    get_head = getattr(base, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, torch.nn.Module) else None


@contextmanager
def head_on_rows(head: torch.nn.Module, keep: torch.Tensor) -> Iterator[list[int]]:
    """While open, `head` (an output layer) is fed only the hidden states at `keep` ([B, L] -> [N, H] rows),
    so the model's forward returns logits [N, V]. The selection happens inside the model's own forward, so
    DDP / FSDP / DeepSpeed wrappers, PEFT adapters and activation checkpointing all see an ordinary forward.
    Yields the list of the head's calls (one entry per call) for the caller to check."""
    calls: list[int] = []

    def select(module: torch.nn.Module, args: tuple) -> tuple:
        hidden = args[0]
        if tuple(hidden.shape[:-1]) != tuple(keep.shape):
            raise RuntimeError(
                f"sft_train.trainer.logits=labelled: the output layer got hidden states of shape {tuple(hidden.shape)}, "
                f"expected [batch, length, hidden] with batch, length = {tuple(keep.shape)}; this model computes its "
                "logits differently; set sft_train.trainer.logits: all"
            )
        calls.append(1)
        return (hidden[keep.to(hidden.device)], *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield calls
    finally:
        handle.remove()


def cross_rank_factor(trainer: Any, num_items_in_batch: Any) -> int:
    """What the HF Trainer multiplies the model's loss by when ``average_tokens_across_devices`` made
    num_items_in_batch count every rank's labelled tokens: DDP then averages the ranks' gradients, and the factor
    turns that mean back into the sum over ranks, i.e. the whole global batch's per-token mean. 1 in one process."""
    if not (trainer.args.average_tokens_across_devices and trainer.model_accepts_loss_kwargs and num_items_in_batch is not None):
        return 1
    return trainer.accelerator.num_processes // trainer.get_tp_size() if trainer.args.n_gpu <= 1 else trainer.args.n_gpu


def _labelled_logits_head(model: Any, setting: str, tca4rec: bool, custom_loss: bool) -> torch.nn.Module | None:
    """The output layer `LabelledLogitsTrainer` restricts, or None where the logits stay at every position:
    setting all, the TCA4Rec objective (its own loss reads every position's logits), a custom
    compute_loss_func (it is given the model's outputs), or a model without a recognisable output layer."""
    if setting != "labelled" or tca4rec:
        return None
    if custom_loss:
        log.info("sft_train: a custom compute_loss_func reads the full logits; trainer.logits=labelled does not apply")
        return None
    head = output_head(model)
    if head is None:
        log.warning("sft_train.trainer.logits=labelled: %s has no output layer (get_output_embeddings) under HF's "
                    "causal-LM loss; computing the logits at every position instead (as logits: all)", type(model).__name__)
    return head


def _labelled_logits_trainer_class() -> type:
    from transformers import Trainer

    class LabelledLogitsTrainer(Trainer):
        """The causal-LM cross-entropy with the output layer run on the labelled positions only. The loss is
        HF's (shift, float32, mean or sum / num_items_in_batch, the cross-device factor), up to float rounding."""

        def __init__(self, *args: Any, head: torch.nn.Module, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.head = head

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if "labels" not in inputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            keep, targets = shifted_targets(labels)
            with head_on_rows(self.head, keep) as calls:
                outputs = model(**inputs)
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
            if len(calls) != 1 or tuple(logits.shape[:-1]) != tuple(targets.shape):
                raise RuntimeError(
                    f"sft_train.trainer.logits=labelled: the output layer ran {len(calls)} times and the model returned "
                    f"logits of shape {tuple(logits.shape)} for {targets.numel()} labelled positions; this model does "
                    "not compute its logits as one output layer over the last hidden state; set sft_train.trainer.logits: all"
                )
            # As the model's own loss: normalised by the accumulated batch's labelled count only when the
            # Trainer hands that count to the model (else a per-batch mean the Trainer divides by GA steps).
            n_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            loss = labelled_cross_entropy(logits, targets.to(logits.device), n_items)
            loss = loss * cross_rank_factor(self, num_items_in_batch)
            if isinstance(outputs, dict):
                outputs["loss"] = loss
            return (loss, outputs) if return_outputs else loss

    return LabelledLogitsTrainer


def _tca4rec_trainer_class() -> type:
    from transformers import Trainer

    class TCA4RecTrainer(Trainer):
        """Trains with `TCA4Rec.loss` on batches carrying ``tca_*`` fields; evaluation stays plain CE."""

        def __init__(self, *args: Any, tca4rec: TCA4Rec, cf_model: Any = None, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.tca4rec = tca4rec.to(self.args.device)
            self.cf_model = None
            if cf_model is not None and tca4rec.positions == "all_labelled":  # a frozen copy beside the LM
                self.cf_model = copy.deepcopy(cf_model).to(self.args.device).eval().requires_grad_(False)
            # TCA4Rec items seen in this session's training micro-batches (this process's, under torchrun)
            self.counts = {"micro_batches": 0, "response": 0, "history": 0, "history_first_ce": 0}

        def tca4rec_coverage(self) -> dict[str, Any]:
            """Which positions TCA4Rec covered and how many SCIDs per micro-batch, for the stage's metrics."""
            n = max(1, self.counts["micro_batches"])
            covered = ["seq_response"] + (["labelled_history_t>=1"] if self.tca4rec.positions == "all_labelled" else [])
            return {"positions": self.tca4rec.positions, "covered": covered, **self.counts,
                    "mean_response_scids_per_micro_batch": self.counts["response"] / n,
                    "mean_history_scids_per_micro_batch": self.counts["history"] / n,
                    "mean_scids_per_micro_batch": (self.counts["response"] + self.counts["history"]) / n}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            fields = {k: inputs.pop(k) for k in TCA4REC_FIELDS if k in inputs}
            if not fields or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            # Same normalisation as the model's own loss: over the accumulated batch's labelled tokens when
            # the Trainer counts them for the model, else a per-batch mean the Trainer divides by GA steps.
            n_items = num_items_in_batch if self.model_accepts_loss_kwargs else None
            history = fields.get("tca_hist_rows")
            loss = self.tca4rec.loss(outputs.logits, labels, fields["tca_row"], fields["tca_start"],
                                     num_items_in_batch=n_items, dist=fields.get("tca_dist"), history_rows=history,
                                     history_starts=fields.get("tca_hist_starts"), cf_model=self.cf_model)
            # HF's compute_loss scales a model loss summed over num_items_in_batch (the tokens of all ranks) by
            # the world size before DDP averages gradients; without it a torchrun TCA4Rec step is 1/N too small.
            loss = loss * cross_rank_factor(self, n_items)
            self.counts["micro_batches"] += 1
            self.counts["response"] += int((fields["tca_row"] >= 0).sum())
            if history is not None:
                self.counts["history"] += int((history[:, 1:] >= 0).sum())
                self.counts["history_first_ce"] += int((history[:, 0] >= 0).sum())
            return (loss, outputs) if return_outputs else loss

    return TCA4RecTrainer


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
