"""sft_train: vocabulary extension, example layout, checkpoint round trip, resume, LoRA, the pipeline."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.matplotlib import MatplotlibDataset

from align3gr_pipelines.datasets import CheckpointDataset
from align3gr_pipelines.lm.backbone import build_backbone, scid_vocabulary, train_bpe_tokenizer
from align3gr_pipelines.lm.rec_lm import RecLM, encode_prompt, encode_response
from align3gr_pipelines.pipelines.sft_data import create_pipeline as sft_data_pipeline
from align3gr_pipelines.pipelines.sft_train import create_pipeline as sft_train_pipeline
from align3gr_pipelines.sft.hf_trainer import IGNORE_INDEX, encode_examples, train_causal_lm
from align3gr_pipelines.sft.trainer import FINGERPRINT_FILE, _prepare_output_dir, fit_sft
from align3gr_pipelines.tokenizer.scid import split_tokens

from .conftest import INPUTS, tiny_train_params

LOAD_CLASS = "align3gr_pipelines.lm.rec_lm.RecLM"


def texts_of(examples: pd.DataFrame) -> list[str]:
    return pd.concat([examples["prompt"], examples["response"]]).tolist()


def prompt_batch(rec: RecLM, prompts: list[str]) -> torch.Tensor:
    ids = [encode_prompt(rec.tokenizer, p) for p in prompts]
    width = max(map(len, ids))
    return torch.tensor([i + [rec.tokenizer.pad_token_id] * (width - len(i)) for i in ids])


def logits(rec: RecLM, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return rec.model(input_ids=batch.to(rec.device), attention_mask=(batch != rec.tokenizer.pad_token_id).long().to(rec.device)).logits.cpu()


def test_vocabulary_extension_every_scid_is_one_token(toy, examples, train_params):
    vocab = scid_vocabulary(toy["item_scids"], toy["user_scids"])
    for kind in ("item", "user"):
        used = {t for s in toy[f"{kind}_scids"]["tokens"] for t in split_tokens(s)}
        assert used <= set(vocab[kind])  # every code in use, and the codes below it at its level
        assert len(vocab[kind]) == sum(max(int(t.split("_")[1][:-1]) for t in used if t.startswith(f"<{kind[0]}{lv}_")) + 1 for lv in range(3))
    rec = build_backbone(train_params["backbone"], texts_of(examples), vocab, seed=0, item_scid_levels=3)
    tokens = vocab["item"] + vocab["user"]
    ids = rec.token_ids(tokens)
    assert len(set(ids)) == len(tokens)
    assert rec.model.get_input_embeddings().weight.shape[0] == len(rec.tokenizer)
    with pytest.raises(KeyError, match="missing from the tokenizer vocabulary"):
        rec.token_ids(["<i0_99>"])
    scid_ids = set(ids)
    for prompt in examples["prompt"]:
        enc = encode_prompt(rec.tokenizer, prompt)
        assert enc[0] == rec.tokenizer.bos_token_id and None not in enc
        found = [t for t, i in zip(rec.tokenizer.convert_ids_to_tokens(enc), enc) if i in scid_ids]
        assert found == split_tokens(prompt)  # each SCID token once, in order, never split
    assert rec.tokenizer.decode(encode_prompt(rec.tokenizer, "Bright Guitar"), skip_special_tokens=True) == "Bright Guitar"


def test_example_layout_is_prompt_then_response_with_masked_prompt(examples, train_params):
    vocab = {"item": [f"<i{lv}_{c}>" for lv in range(3) for c in range(8)], "user": [f"<u{lv}_{c}>" for lv in range(3) for c in range(8)]}
    rec = build_backbone(train_params["backbone"], texts_of(examples), vocab, seed=0, item_scid_levels=3)
    tok = rec.tokenizer
    sample = examples.groupby("task").head(2)
    rows, dropped = encode_examples(tok, sample["prompt"].tolist(), sample["response"].tolist(), max_length=512)
    assert dropped == 0
    for row, (prompt, response) in zip(rows, zip(sample["prompt"], sample["response"])):
        p, r = encode_prompt(tok, prompt), encode_response(tok, response)
        assert row["input_ids"] == p + r
        assert row["labels"] == [IGNORE_INDEX] * len(p) + r
        assert r[-1] == tok.eos_token_id
        if "".join(split_tokens(response)) == response:  # a SCID response: one token per level + EOS
            assert tok.convert_ids_to_tokens(r[:-1]) == split_tokens(response)
    _, dropped = encode_examples(tok, sample["prompt"].tolist(), sample["response"].tolist(), max_length=10)
    assert dropped == len(sample)
    # history_loss: the item SCID tokens of the prompt are labelled too, nothing else of the prompt
    item_ids = set(rec.token_ids(vocab["item"]))
    rows, _ = encode_examples(tok, sample["prompt"].tolist(), sample["response"].tolist(), 512, frozenset(item_ids))
    for row, prompt in zip(rows, sample["prompt"]):
        n = len(encode_prompt(tok, prompt))
        labelled = [t for t in row["labels"][:n] if t != IGNORE_INDEX]
        assert tok.convert_ids_to_tokens(labelled) == [t for t in split_tokens(prompt) if t.startswith("<i")]


def test_checkpoint_round_trip_and_metrics(tmp_path, toy, examples, train_params):
    rec, metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], train_params, seed=0)
    assert not Path(train_params["trainer"]["output_dir"]).exists()  # work dir cleaned after success
    m = rec.model  # the best checkpoint reloaded at the end of training keeps the output layer tied
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    curves = metrics["curves"]
    assert [s for s, _ in curves["eval_loss"]] == [3, 6] and len(curves["train_loss"]) == 6
    assert curves["eval_loss"][-1][1] < curves["eval_loss"][0][1] or curves["train_loss"][-1][1] < curves["train_loss"][0][1]
    assert metrics["scalars"]["tokens_per_s"] > 0 and metrics["scalars"]["global_step"] == 6
    for key in ("backbone", "peft", "base_model", "item_scid_levels", "stage", "trained_from"):
        assert key in rec.meta
    assert rec.meta["stage"] == "sft" and rec.meta["item_scid_levels"] == 3 and rec.meta["peft"] is False

    ds = CheckpointDataset(path=str(tmp_path / "sft_model"), load_class=LOAD_CLASS, optional=True)
    assert not ds.exists() and ds.load() is None
    ds.save(rec)
    assert ds.exists()
    loaded = ds.load()
    batch = prompt_batch(rec, examples["prompt"].head(6).tolist())
    assert torch.equal(logits(rec, batch), logits(loaded, batch))
    m = loaded.model
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()  # still tied after reload
    assert loaded.meta == json.loads(json.dumps(rec.meta, default=str))


class Killed(Exception):
    pass


def _kill_at(step: int):
    from transformers import TrainerCallback

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise Killed(f"simulated kill at step {step}")

    return KillAt()


def test_resume_after_an_interrupted_run_continues_from_the_saved_step(tmp_path, toy, examples):
    params = tiny_train_params(tmp_path / "work", max_steps=8, eval_steps=3)
    with pytest.raises(Killed):
        fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0, callbacks=[_kill_at(5)])
    work = Path(params["trainer"]["output_dir"])
    assert (work / "checkpoint-3").is_dir() and not (work / "checkpoint-6").exists()
    resumed, metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0)
    assert metrics["info"]["resumed_from_step"] == 3
    assert metrics["scalars"]["global_step"] == 8
    assert [s for s, _ in metrics["curves"]["train_loss"]] == list(range(1, 9))  # history kept across the kill

    straight, _ = fit_sft(examples, toy["item_scids"], toy["user_scids"], tiny_train_params(tmp_path / "w2", max_steps=8, eval_steps=3), seed=0)
    for (name, a), (_, b) in zip(resumed.model.state_dict().items(), straight.model.state_dict().items()):
        torch.testing.assert_close(a, b, msg=f"resumed run differs from an uninterrupted one at {name}")


def test_early_stopping_ends_a_run_whose_valid_loss_stops_improving(tmp_path, toy, examples):
    # lr 0: the valid loss never improves after the first evaluation, so patience 2 stops at step 6 of 12
    params = tiny_train_params(tmp_path / "work", max_steps=12, eval_steps=2, learning_rate=0.0)
    params["trainer"]["early_stopping"] = {"patience": 2, "threshold": 0.0}
    _, metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0)
    assert metrics["info"]["early_stopped"] and metrics["scalars"]["global_step"] == 6


def test_a_changed_run_does_not_resume_a_stale_checkpoint(tmp_path):
    work = tmp_path / "work"
    assert _prepare_output_dir(work, {"a": 1}) is False
    (work / "init").mkdir()
    (work / FINGERPRINT_FILE).write_text(json.dumps({"a": 1}))
    (work / "checkpoint-3").mkdir()
    assert _prepare_output_dir(work, {"a": 1}) is True
    assert _prepare_output_dir(work, {"a": 2}) is False
    assert not (work / "checkpoint-3").exists()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "model.bin").write_text("not ours")
    with pytest.raises(ValueError, match="not an sft_train work directory"):
        _prepare_output_dir(precious, {"a": 1})
    assert (precious / "model.bin").exists()


def _effective_rows(layer, n_rows: int, hidden: int, is_output: bool) -> torch.Tensor:
    with torch.no_grad():
        if is_output:  # the output layer's effective weight: its response to the identity
            return layer(torch.eye(hidden)).T.clone()
        return layer(torch.arange(n_rows)).clone()


def _tiny_base(base_dir: Path, examples: pd.DataFrame) -> int:
    """A "pretrained" model on disk (untied output layer) with its tokenizer; returns the vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe_tokenizer(texts_of(examples), 300)
    torch.manual_seed(1)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=160, tie_word_embeddings=False,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    base.save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    return len(tok)


def _lora_params(tmp_path: Path, base_dir: Path, **trainer) -> dict:
    params = tiny_train_params(tmp_path / "work", **trainer)
    params["backbone"]["kind"] = "hf"
    params["backbone"]["hf"] = {"name_or_path": str(base_dir), "gguf_file": None,
                                "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}
    return params


def test_lora_trains_only_the_adapter_and_the_new_scid_rows(tmp_path, toy, examples):
    base_dir = tmp_path / "tiny-base"
    n_old = _tiny_base(base_dir, examples)
    params = _lora_params(tmp_path, base_dir, max_steps=4, eval_steps=2, learning_rate=5e-2, gradient_checkpointing=True)
    vocab = scid_vocabulary(toy["item_scids"], toy["user_scids"])
    rec = build_backbone(params["backbone"], texts_of(examples), vocab, seed=0, item_scid_levels=3)
    new_ids = set(rec.token_ids(vocab["item"] + vocab["user"]))
    assert new_ids == set(range(n_old, len(rec.tokenizer)))
    model = rec.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable)
    assert any("embed_tokens" in n for n in trainable) and any("lm_head" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    emb_before = _effective_rows(model.get_input_embeddings(), len(rec.tokenizer), 32, False)
    out_before = _effective_rows(model.get_output_embeddings(), len(rec.tokenizer), 32, True)

    rows, _ = encode_examples(rec.tokenizer, examples["prompt"].tolist(), examples["response"].tolist(), 160)
    trainer, _ = train_causal_lm(model, rec.tokenizer, rows, rows[:16], params["trainer"], str(tmp_path / "work"), 0)
    model = trainer.model
    for name, p in model.named_parameters():
        if name in trainable:
            continue
        assert torch.equal(p, before[name]), f"frozen parameter {name} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_B" in n)
    for layer, old, is_out in ((model.get_input_embeddings(), emb_before, False), (model.get_output_embeddings(), out_before, True)):
        changed = set((_effective_rows(layer, len(rec.tokenizer), 32, is_out) != old).any(dim=1).nonzero().flatten().tolist())
        assert changed and changed <= new_ids, "only SCID rows may change"

    rec.model = model
    rec.model.eval()
    ds = CheckpointDataset(path=str(tmp_path / "lora_model"), load_class=LOAD_CLASS, load_args={"device": "cpu"})
    ds.save(rec)
    saved = {p.name for p in (tmp_path / "lora_model" / "model").iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    loaded = ds.load()
    batch = prompt_batch(rec, examples["prompt"].head(4).tolist())
    assert torch.equal(logits(rec, batch), logits(loaded, batch))
    assert not any(p.requires_grad for p in loaded.model.parameters())
    again = RecLM.from_pretrained(str(tmp_path / "lora_model"), device="cpu", trainable=True)
    assert {n for n, p in again.model.named_parameters() if p.requires_grad} == trainable
    assert {n for n, p in loaded.set_trainable(True).model.named_parameters() if p.requires_grad} == trainable


def test_a_lora_run_resumes_after_a_kill_too(tmp_path, toy, examples):
    base_dir = tmp_path / "tiny-base"
    _tiny_base(base_dir, examples)
    params = _lora_params(tmp_path, base_dir, max_steps=5, eval_steps=2, learning_rate=5e-2)
    with pytest.raises(Killed):
        fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0, callbacks=[_kill_at(3)])
    resumed, metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0)
    assert metrics["info"]["resumed_from_step"] == 2 and metrics["scalars"]["global_step"] == 5
    assert resumed.meta["peft"] and resumed.meta["base_model"]["name_or_path"] == str(base_dir)
    straight, _ = fit_sft(examples, toy["item_scids"], toy["user_scids"], _lora_params(tmp_path / "b", base_dir, max_steps=5,
                                                                                         eval_steps=2, learning_rate=5e-2), seed=0)
    batch = prompt_batch(resumed, examples["prompt"].head(4).tolist())
    torch.testing.assert_close(logits(resumed, batch), logits(straight, batch))


def test_pipelines_through_a_data_catalog(tmp_path, toy, data_params):
    catalog = DataCatalog(datasets={
        **{name: MemoryDataset(toy[name]) for name in INPUTS},
        "params:sft_data": MemoryDataset(data_params),
        "params:sft_train": MemoryDataset(tiny_train_params(tmp_path / "work", model_selection={"metric": "valid_recall", "n_users": 8, "confirm_half": True})),
        "params:seed": MemoryDataset(42),
        "sft_examples": MemoryDataset(),
        "seq_eval_prompts": MemoryDataset(),
        "sft_data_stats": MemoryDataset(),
        "sft_model": CheckpointDataset(path=str(tmp_path / "06_models/sft_model"), load_class=LOAD_CLASS, optional=True),
        "sasrec_model": CheckpointDataset(path=str(tmp_path / "06_models/sasrec"), load_class="align3gr_pipelines.cf.sasrec.SASRec", optional=True),
        "sft_train_metrics": JSONDataset(filepath=str(tmp_path / "metrics.json")),
        "sft_training_curve": MatplotlibDataset(filepath=str(tmp_path / "curve.png")),
    })
    SequentialRunner().run(sft_data_pipeline() + sft_train_pipeline(), catalog)
    model = catalog.load("sft_model")
    assert isinstance(model, RecLM) and model.meta["stage"] == "sft"
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"scalars", "curves", "info"}
    assert metrics["curves"]["train_loss"] and metrics["curves"]["eval_loss"]
    # selection by valid recall: its curve sits beside the loss, one point per evaluation
    assert [s for s, _ in metrics["curves"]["valid_recall@10"]] == [s for s, _ in metrics["curves"]["eval_loss"]]
    assert metrics["info"]["model_selection"] == "eval_recall@10"
    # chosen on 4 of the 8 users, reported on the other 4
    assert len(metrics["curves"]["valid_recall@10_confirm"]) == len(metrics["curves"]["valid_recall@10"])
    assert metrics["scalars"]["selected_valid_recall@10_confirm"] in {0.0, 0.25, 0.5, 0.75, 1.0}
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_distributed_data_parallel_two_cpu_processes(tmp_path, toy, examples):
    """torchrun with 2 gloo ranks on CPU; the caller gets rank 0's model, ranks never touch the catalog."""
    params = tiny_train_params(tmp_path / "work", max_steps=4, eval_steps=2, nproc_per_node=2, keep_checkpoints=True,
                               launch_timeout_s=300)
    rec, metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0)
    assert metrics["info"]["world_size"] == 2
    assert metrics["scalars"]["global_step"] == 4
    assert (tmp_path / "work" / "job" / "final" / "rec_lm.json").is_file()
    batch = prompt_batch(rec, examples["prompt"].head(2).tolist())
    assert torch.isfinite(logits(rec, batch)).all()
