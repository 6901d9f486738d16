"""Supervised fine-tuning of a RecLM: build (or reload) the backbone, encode the examples, train, select.

Runs live in a stable work directory (``output_dir``): the initial model and tokenizer (``init/``), the
Trainer's checkpoints (``checkpoint-<step>/``, optimizer and RNG states included) and a fingerprint of what
is being trained. A rerun after a kill finds the last checkpoint there and resumes from its step; a rerun
with other data, parameters or world size finds a different fingerprint and starts afresh.

The Trainer loop itself is `hf_trainer`; with ``nproc_per_node > 1`` it runs under torchrun (`launcher`), and
selection by valid recall with it (`valid_recall_ranks`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from align3gr_pipelines.devices import free_cores
from align3gr_pipelines.lm.backbone import build_backbone, scid_vocabulary
from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.sft.hf_trainer import (
    CONFIRM_SUFFIX,
    SHARDED_TRAINING_KEYS,
    TrainResult,
    encode_examples,
    logits_setting,
    selection_metric,
    selection_settings,
    train_causal_lm,
    valid_recall_callback,
)
from align3gr_pipelines.sft.launcher import fit_distributed
from align3gr_pipelines.sft.tca4rec import TCA4Rec, history_from_prompt, labelled_history_items
from align3gr_pipelines.tokenizer.scid import split_tokens

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "run_fingerprint.json"
# Trainer settings that do not change what is trained: a rerun may change them and still resume. `logits`
# changes only where the CE objective's output layer runs (the same loss up to float rounding, as torch_threads),
# so work dirs from before the key existed still resume.
RESUME_NEUTRAL = ("output_dir", "progress_bar", "keep_checkpoints", "torch_threads", "launch_timeout_s", "logits")


# ----------------------------------------------------------------------------- TCA4Rec objective

OBJECTIVES = ("ce", "tca4rec")
TCA4REC_SETTINGS = ("alpha", "variant", "label", "temperature", "positions")
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


def attach_tca4rec_history(rows: list[dict[str, Any]], tca4rec: TCA4Rec) -> dict[str, int]:
    """``positions: all_labelled``: give every training row (encoded ``with_index``) ``tca_hist_rows`` and
    ``tca_hist_starts``, the code-table rows of its prompt's labelled item SCIDs (oldest first; what
    ``trainer.history_loss`` labels) and the index of each one's level-0 token. Only these indices are stored:
    the labels themselves are computed per batch (`TCA4Rec.history_targets`). Returns counts for the metrics."""
    token_codes = tca4rec.token_codes()
    row_by_codes = {tuple(codes): k for k, codes in enumerate(tca4rec.codes.tolist())}
    counts = {"n_rows_with_history": 0, "n_history_scids": 0, "n_history_first_ce": 0}
    for r in rows:
        try:
            hist, starts = labelled_history_items(r["input_ids"], r["labels"], int(r["response_start"]), token_codes,
                                                  row_by_codes)
        except ValueError as err:
            raise ValueError(f"sft_examples training example {r['example']}: {err}") from None
        r.update(tca_hist_rows=hist, tca_hist_starts=starts)
        if hist:
            counts["n_rows_with_history"] += 1
            counts["n_history_scids"] += len(hist) - 1
            counts["n_history_first_ce"] += 1
    return counts


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


def _valid_recall_rows(seq_eval_prompts: pd.DataFrame | None, selection: dict[str, Any], seed: int) -> pd.DataFrame:
    from align3gr_pipelines.evaluation.valid_recall import sample_valid_prompts

    if seq_eval_prompts is None:
        raise ValueError("sft_train.trainer.model_selection.metric=valid_recall needs 'seq_eval_prompts' (from sft_data); "
                         "pass it or set model_selection.metric: eval_loss")
    n_users = selection.get("n_users")
    return sample_valid_prompts(seq_eval_prompts, None if n_users is None else int(n_users), seed)


def recall_scorer(rec: RecLM, item_scids: pd.DataFrame, seq_eval_prompts: pd.DataFrame | None,
                  selection: dict[str, Any], seed: int) -> Any:
    """model -> valid Recall@K over a seeded sample of valid users (the same users at every evaluation).
    With ``confirm_half`` it returns (recall on the select half, recall on the confirm half): the Trainer
    picks its checkpoint on the first, and the second is an unbiased figure for the one it picked.
    Inside a torchrun rank the same scorer decodes the rank's share of the users and all-reduces the hits
    (`valid_recall_ranks`; the ranks build it from `valid_recall_job`)."""
    from align3gr_pipelines.evaluation.valid_recall import build_valid_sample, confirm_half
    from align3gr_pipelines.sft.valid_recall_ranks import sharded_recall_scorer

    rows = _valid_recall_rows(seq_eval_prompts, selection, seed)
    sample = build_valid_sample(rows, item_scids, rec.tokenizer)
    k, beam, batch = int(selection["k"]), int(selection["beam_width"]), int(selection["batch_size"])
    confirm = confirm_half(len(sample), seed) if selection.get("confirm_half") else None
    return sharded_recall_scorer(rec.tokenizer, sample, confirm, k, beam, batch)


def valid_recall_job(item_scids: pd.DataFrame, seq_eval_prompts: pd.DataFrame | None, selection: dict[str, Any],
                     seed: int) -> dict[str, Any]:
    """The valid-recall sample of `recall_scorer` as plain lists, for the torchrun job (`launcher`)."""
    from align3gr_pipelines.sft.valid_recall_ranks import valid_recall_spec

    return valid_recall_spec(_valid_recall_rows(seq_eval_prompts, selection, seed), item_scids, selection, seed)


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
    """Intra-op threads for CPU training: 'auto' takes the cores no other process is using when training starts
    (`devices.free_cores`: torch's spinning workers collapse as soon as anything else wants their core); an
    int forces; None = torch's default."""
    if setting is None or torch.cuda.is_available():
        return None
    if setting == "auto":
        return free_cores()
    if isinstance(setting, bool) or not str(setting).strip().isdigit() or int(setting) < 1:
        raise ValueError(f"sft_train.trainer.torch_threads must be auto, null or an integer >= 1, got {setting!r}")
    return int(setting)


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
    (`tca4rec.py`) from `cf_model` (the tokenization stage's SASRec) — and, with ``tca4rec.positions:
    all_labelled``, every labelled history SCID of the prompts too; validation loss stays plain CE.
    ``trainer.model_selection.metric: valid_recall`` chooses the checkpoint (and stops early) by Recall@K of
    the constrained decoder on a seeded sample of the valid users of `seq_eval_prompts`; under
    ``nproc_per_node > 1`` each torchrun rank decodes its share of those users and the hits are all-reduced,
    so the ranks agree and the recall equals one process's on the same model."""
    torch.manual_seed(seed)
    tcfg = cfg["trainer"]
    selection = selection_settings(tcfg)
    logits_setting(tcfg)  # a bad value fails here, not inside the torchrun ranks
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            "sft_train: do not start `kedro run` under torchrun/accelerate; run it once and set "
            "sft_train.trainer.nproc_per_node=N — the node launches torchrun itself so that only one "
            "process writes the catalog outputs"
        )
    nproc = int(tcfg.get("nproc_per_node", 1))
    if nproc > 1 and compute_loss_func is not None:
        raise ValueError("sft_train: a custom compute_loss_func cannot cross into torchrun workers; use nproc_per_node=1")
    sharded = [key for key in ("fsdp", "deepspeed") if tcfg.get(key)]
    if nproc > 1 and sharded and selection["metric"] == "valid_recall":
        # Each rank decodes its own share of the users, a different number of forwards per rank; with sharded
        # weights every forward is a collective, so the ranks would wait on each other for ever.
        raise ValueError(
            f"sft_train.trainer.{sharded[0]} with nproc_per_node > 1 shards the weights, which the ranks' valid-recall "
            "decoding (each rank its own users) cannot run on; set sft_train.trainer.model_selection.metric: eval_loss"
        )
    tca_settings = tca4rec_settings(cfg)
    if tca_settings is not None:
        if tca_settings.get("positions") == "all_labelled" and not tcfg.get("history_loss", False):
            raise ValueError(
                "sft_train.tca4rec.positions=all_labelled trains the labelled history SCIDs of the prompts, but "
                "sft_train.trainer.history_loss is false (no prompt SCID is labelled); turn it on or use positions=response"
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
    # Unset FSDP / DeepSpeed keys are left out, so work dirs from before those keys existed still resume.
    fingerprint = {"inputs": inputs, "backbone": cfg["backbone"], "seed": int(seed), "nproc": nproc,
                   "trainer": {k: v for k, v in tcfg.items()
                               if k not in RESUME_NEUTRAL and not (k in SHARDED_TRAINING_KEYS and v is None)}}
    if nproc > 1 and selection["metric"] == "valid_recall":  # ranks used to fall back to eval_loss: not resumable
        fingerprint["selection"] = "valid_recall_in_ranks"
    if tca_settings is not None:  # absent for CE, so existing CE work dirs keep their fingerprint
        fingerprint["tca4rec"] = {**tca_settings, "cf_model": cf_model_fingerprint(cf_model) if cf_model is not None else None}
    fingerprint = json.loads(json.dumps(fingerprint, default=str))

    resumable = _prepare_output_dir(output_dir, fingerprint)
    if resumable:
        init = str(output_dir / "init")  # weights in the dtype of the device SFT trains on, not the CPU's
        rec = RecLM.from_pretrained(init, device="cpu", trainable=True, dtype=RecLM.dtype_on(init, tcfg.get("device", "auto")))
    else:
        rec = build_backbone(cfg["backbone"], pd.concat([examples["prompt"], examples["response"]]).tolist(), vocab, seed, levels,
                             device=tcfg.get("device", "auto"))
        rec.save_pretrained(str(output_dir / "init"))  # the exact starting point a resumed run needs
        (output_dir / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2))
    rec.model.train()

    max_length = int(tcfg["max_length"])
    history_ids = frozenset(rec.token_ids(vocab["item"])) if tcfg.get("history_loss", False) else frozenset()
    train_rows, dropped_train = encode_examples(
        rec.tokenizer, train_df["prompt"].tolist(), train_df["response"].tolist(), max_length, history_ids,
        with_index=tca_settings is not None, label_prompt=history_label_flags(train_df, tcfg),
    )
    tca, n_tca, history_counts = None, 0, {}
    if tca_settings is not None:
        cf_ids = cf_model.item_ids if tca_settings.get("label", "cf") == "cf" else None
        tca = TCA4Rec.from_item_scids(item_scids, rec.tokenizer, cf_ids, **tca_settings)
        n_tca = attach_tca4rec_targets(train_rows, train_df, item_scids, tca, cf_model)
        if n_tca == 0:
            raise ValueError("sft_train.objective=tca4rec: no SEQ training example (task 'seq') to apply it to")
        if tca.positions == "all_labelled":
            history_counts = attach_tca4rec_history(train_rows, tca)
            if history_counts["n_history_scids"] == 0:
                log.warning("sft_train: tca4rec.positions=all_labelled found no labelled history SCID after the first "
                            "in any prompt (trainer.history_loss_tasks=%s): only the SEQ responses get TCA4Rec",
                            tcfg.get("history_loss_tasks"))
    eval_rows, dropped_eval = encode_examples(rec.tokenizer, valid_df["prompt"].tolist(), valid_df["response"].tolist(), max_length)
    if dropped_train or dropped_eval:
        log.warning("sft_train: dropped %d train / %d valid examples longer than max_length=%d", dropped_train, dropped_eval, max_length)

    callbacks = list(callbacks or [])
    recall_job = None
    if selection["metric"] == "valid_recall":
        if nproc > 1:  # each rank scores its share of the users and all-reduces the hits (launcher)
            recall_job = valid_recall_job(item_scids, seq_eval_prompts, selection, seed)
        else:
            callbacks.append(valid_recall_callback(recall_scorer(rec, item_scids, seq_eval_prompts, selection, seed),
                                                   selection_metric(tcfg)))
    # The history labels of positions=all_labelled come from SASRec per batch; the response's are in the rows.
    batch_cf = cf_model if tca is not None and tca.positions == "all_labelled" and tca.label == "cf" else None
    if nproc > 1:  # torchrun gives each worker one thread on CPU
        rec, result = fit_distributed(rec, train_rows, eval_rows, tcfg, seed, output_dir, nproc, tca, batch_cf,
                                       valid_recall=recall_job)
    else:
        threads, previous = cpu_threads(tcfg.get("torch_threads", "auto")), torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            trainer, result = train_causal_lm(
                rec.model, rec.tokenizer, train_rows, eval_rows, tcfg, str(output_dir), seed, callbacks, compute_loss_func,
                tca4rec=tca, cf_model=batch_cf,
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
    coverage = metrics["info"].pop("tca4rec_coverage", None)
    if tca_settings is not None:
        metrics["info"]["tca4rec"] = {**tca_settings, "positions": tca.positions, "n_train_examples": n_tca,
                                      **history_counts, "coverage": coverage}
        if coverage:
            metrics["scalars"]["tca4rec_scids_per_micro_batch"] = float(coverage["mean_scids_per_micro_batch"])
            log.info("sft_train: TCA4Rec covered %s: %.1f SCIDs per micro-batch (%.1f response, %.1f history; "
                     "%d first history items kept plain CE)", "+".join(coverage["covered"]),
                     coverage["mean_scids_per_micro_batch"], coverage["mean_response_scids_per_micro_batch"],
                     coverage["mean_history_scids_per_micro_batch"], coverage["history_first_ce"])
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
    for key in (k for k in recall_keys if not k.endswith(CONFIRM_SUFFIX)):
        name = "valid_" + key[len("eval_"):]
        scalars["best_" + name] = max(v for _, v in curves[name])
        confirm = dict(map(tuple, curves.get(name + CONFIRM_SUFFIX, [])))
        if confirm:  # the selected (first best) step's recall on the users it was not chosen on
            step = next(s for s, v in curves[name] if v == scalars["best_" + name])
            scalars[f"selected_{name}{CONFIRM_SUFFIX}"] = confirm[step]
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
