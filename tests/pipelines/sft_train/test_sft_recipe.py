"""sft_train recipe: history labels only on the sequence tasks, task-mixed batches, and checkpoint
selection / early stopping by valid recall (with a synthetic run where loss and recall disagree)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from align3gr_pipelines.lm.backbone import build_backbone, scid_vocabulary
from align3gr_pipelines.lm.rec_lm import encode_prompt
from align3gr_pipelines.sft.hf_trainer import (
    IGNORE_INDEX,
    ExampleDataset,
    PadCollator,
    encode_examples,
    train_causal_lm,
    training_arguments,
    valid_recall_callback,
)
from align3gr_pipelines.sft.trainer import fit_sft, history_label_flags
from align3gr_pipelines.tokenizer.scid import split_tokens

from .conftest import tiny_train_params

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_TRAINER = yaml.safe_load((ROOT / "conf/base/parameters_sft_train.yml").read_text())["sft_train"]["trainer"]


def test_history_labels_only_on_the_sequence_tasks(toy, examples, train_params):
    """With the default recipe, a SEQ prompt's history SCIDs are targets; the lone SCID of a C1 prompt
    ("what is <i..>?") or of a B1 preference prompt is not."""
    vocab = scid_vocabulary(toy["item_scids"], toy["user_scids"])
    rec = build_backbone(train_params["backbone"], pd.concat([examples["prompt"], examples["response"]]).tolist(), vocab, 0, 3)
    train = examples[examples["split"] == "train"]
    sample = train[train["task"].isin(["seq", "seq2text", "item_scid2text", "preference"])].groupby("task").head(3)
    assert set(sample["task"]) == {"seq", "seq2text", "item_scid2text", "preference"}
    flags = history_label_flags(sample, DEFAULT_TRAINER)
    assert DEFAULT_TRAINER["history_loss"] and flags == sample["task"].isin(["seq", "seq2text"]).tolist()
    item_ids = frozenset(rec.token_ids(vocab["item"]))
    rows, _ = encode_examples(rec.tokenizer, sample["prompt"].tolist(), sample["response"].tolist(), 512, item_ids,
                              label_prompt=flags)
    tok = rec.tokenizer
    for row, task, prompt in zip(rows, sample["task"], sample["prompt"]):
        n = len(encode_prompt(tok, prompt))
        labelled = tok.convert_ids_to_tokens([t for t in row["labels"][:n] if t != IGNORE_INDEX])
        if task in ("seq", "seq2text"):
            assert labelled == [t for t in split_tokens(prompt) if t.startswith("<i")] and labelled
        else:
            assert labelled == [], (task, prompt)
    # null = the old behaviour: every prompt's item SCIDs
    assert history_label_flags(sample, {**DEFAULT_TRAINER, "history_loss_tasks": None}) is None


def _batches_tasks(cfg: dict, tmp_path: Path) -> list[set[str]]:
    """Tasks in each batch of the Trainer's own training dataloader under `cfg`."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer

    # two tasks whose examples differ in length, as SEQ (long prompts) and C1 (short ones) do
    rows = [{"input_ids": [1] * (60 + k % 5), "labels": [1] * (60 + k % 5), "task": "seq"} for k in range(128)]
    rows += [{"input_ids": [1] * (8 + k % 5), "labels": [1] * (8 + k % 5), "task": "c1"} for k in range(128)]
    model = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1))
    args = training_arguments({**tiny_train_params(tmp_path)["trainer"], **cfg, "batch_size": 16}, str(tmp_path / "w"), 0)
    collate = PadCollator(0)
    trainer = Trainer(model=model, args=args, train_dataset=ExampleDataset(rows), eval_dataset=ExampleDataset(rows[:2]),
                      data_collator=lambda b: {**collate([{k: r[k] for k in ("input_ids", "labels")} for r in b]),
                                               "tasks": [r["task"] for r in b]})
    return [set(batch["tasks"]) for batch in trainer.get_train_dataloader()]


def test_default_batches_mix_the_tasks(tmp_path):
    mixed = _batches_tasks({"group_by_length": DEFAULT_TRAINER["group_by_length"]}, tmp_path)
    assert len(mixed) == 16
    assert sum(len(t) == 2 for t in mixed) >= 15  # random batches of 16 from a 50/50 pool: both tasks
    by_length = _batches_tasks({"group_by_length": True}, tmp_path)
    assert sum(len(t) == 1 for t in by_length) >= 12  # what group_by_length did: single-task batches


def test_selection_by_valid_recall_when_loss_and_recall_disagree(tmp_path, toy, examples):
    """Synthetic case: the valid loss falls at every evaluation while the (scripted) valid recall peaks at
    the first. Selection by recall keeps the first checkpoint and stops early; by loss, the last."""
    vocab = scid_vocabulary(toy["item_scids"], toy["user_scids"])
    train, valid = examples[examples["split"] == "train"], examples[examples["split"] == "valid"].head(16)

    def run(metric: str, out: Path):
        params = tiny_train_params(out, max_steps=15, eval_steps=3, learning_rate=1e-2, keep_checkpoints=True,
                                   model_selection={"metric": metric}, early_stopping={"patience": 2, "threshold": 0.0})
        rec = build_backbone(params["backbone"], pd.concat([examples["prompt"], examples["response"]]).tolist(), vocab, 0, 3)
        tr, _ = encode_examples(rec.tokenizer, train["prompt"].tolist(), train["response"].tolist(), 160)
        ev, _ = encode_examples(rec.tokenizer, valid["prompt"].tolist(), valid["response"].tolist(), 160)
        script = iter([0.5, 0.3, 0.2, 0.1, 0.05])
        seen: list[dict] = []

        def scripted(model):
            seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            return next(script)

        cbs = [valid_recall_callback(scripted, "eval_recall@10")] if metric == "valid_recall" else []
        trainer, result = train_causal_lm(rec.model, rec.tokenizer, tr, ev, params["trainer"], str(out), 0, callbacks=cbs)
        return trainer, result, seen

    trainer, result, seen = run("valid_recall", tmp_path / "recall")
    losses = [h["eval_loss"] for h in result.log_history if "eval_loss" in h]
    recalls = [h["eval_recall@10"] for h in result.log_history if "eval_loss" in h]
    assert losses[-1] < losses[0]  # the loss keeps improving ...
    assert recalls == [0.5, 0.3, 0.2]  # ... while recall only falls: patience 2 stops after the third evaluation
    assert result.early_stopped and result.global_step == 9
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    for name, tensor in trainer.model.state_dict().items():  # the model handed back is the step-3 one
        torch.testing.assert_close(tensor, seen[0][name])

    by_loss, loss_result, _ = run("eval_loss", tmp_path / "loss")
    loss_curve = [h["eval_loss"] for h in loss_result.log_history if "eval_loss" in h]
    best = min(range(len(loss_curve)), key=loss_curve.__getitem__)
    assert best > 0 and by_loss.state.best_model_checkpoint.endswith(f"checkpoint-{3 * (best + 1)}")


def test_valid_recall_selection_needs_seq_eval_prompts(tmp_path, toy, examples):
    params = tiny_train_params(tmp_path / "w", model_selection={"metric": "valid_recall"})
    with pytest.raises(ValueError, match="seq_eval_prompts"):
        fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0)
    with pytest.raises(ValueError, match="model_selection.metric"):
        fit_sft(examples, toy["item_scids"], toy["user_scids"],
                tiny_train_params(tmp_path / "v", model_selection={"metric": "ndcg"}), seed=0)


def test_confirm_half_selects_on_the_select_half_and_reports_the_other(tmp_path, toy, examples):
    """The scorer returns (select-half, confirm-half) recall: the Trainer keeps the checkpoint best on the
    first, and the metrics report the second at that checkpoint, not the best of the confirm curve."""
    from align3gr_pipelines.lm.rec_lm import RecLM
    from align3gr_pipelines.sft.trainer import training_metrics

    vocab = scid_vocabulary(toy["item_scids"], toy["user_scids"])
    train, valid = examples[examples["split"] == "train"], examples[examples["split"] == "valid"].head(8)
    params = tiny_train_params(tmp_path, max_steps=9, eval_steps=3, model_selection={"metric": "valid_recall"})
    rec = build_backbone(params["backbone"], pd.concat([examples["prompt"], examples["response"]]).tolist(), vocab, 0, 3)
    tr, _ = encode_examples(rec.tokenizer, train["prompt"].tolist(), train["response"].tolist(), 160)
    ev, _ = encode_examples(rec.tokenizer, valid["prompt"].tolist(), valid["response"].tolist(), 160)
    script = iter([(0.2, 0.1), (0.5, 0.15), (0.3, 0.4)])
    trainer, result = train_causal_lm(rec.model, rec.tokenizer, tr, ev, params["trainer"], str(tmp_path), 0,
                                      callbacks=[valid_recall_callback(lambda m: next(script), "eval_recall@10")])
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-6")
    metrics = training_metrics(result, RecLM(model=trainer.model, tokenizer=rec.tokenizer, meta={}), tr, ev, 0, params["trainer"])
    s = metrics["scalars"]
    assert s["best_valid_recall@10"] == 0.5 and s["selected_valid_recall@10_confirm"] == 0.15
    assert "best_valid_recall@10_confirm" not in s
    assert [v for _, v in metrics["curves"]["valid_recall@10_confirm"]] == [0.1, 0.15, 0.4]
