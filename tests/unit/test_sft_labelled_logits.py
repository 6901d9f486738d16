"""`sft_train.trainer.logits: labelled` (issue 27 item 5): the CE objective's output layer runs on the labelled
positions only, and the loss and gradients equal the HF model's own loss (`logits: all`) to float32 rounding.

Equalities tested, on a tiny Llama (tied and untied output layer, as the scratch and pretrained backbones) and a
hand-made batch with right padding, unlabelled prompt positions, labelled history positions and responses:
- the Trainer's loss (mean, and sum / num_items_in_batch as under gradient accumulation) and every parameter's
  gradient, against the plain Trainer's `compute_loss` on the same model;
- the same for a LoRA (peft) model with trainable SCID rows, its LoRA matrices made non-zero so that a forward
  that skipped them would show;
- a toy `fit_sft` run with gradient accumulation: the same logged losses and gradient norms (to float rounding),
  weights, and the same step kept; in one process, and (slow) under torchrun with 2 gloo ranks, where the
  Trainer's cross-rank loss factor matters;
- a work dir killed before the key existed resumes under `logits: labelled` (the key is resume-neutral).
"""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from align3gr_pipelines.sft.hf_trainer import (
    IGNORE_INDEX,
    _labelled_logits_head,
    _labelled_logits_trainer_class,
    head_on_rows,
    logits_setting,
    output_head,
    shifted_targets,
)
from align3gr_pipelines.sft.trainer import fit_sft

PAD, VOCAB = 0, 61
X = IGNORE_INDEX


def tiny_llama(tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tied, pad_token_id=PAD, bos_token_id=1, eos_token_id=2))


def batch() -> dict[str, torch.Tensor]:
    """Three rows, right-padded to 12: prompt text unlabelled (X), history SCIDs (40-59) labelled inside the
    prompt, the response labelled up to EOS (2), padding unlabelled; row 2 labels its last position only."""
    rows = [
        ([1, 7, 8, 41, 52, 9, 43, 55, 10, 44, 57, 2], [X, X, X, 41, 52, X, 43, 55, X, 44, 57, 2]),
        ([1, 11, 12, 13, 45, 50, 2], [X, X, X, X, 45, 50, 2]),
        ([1, 14, 15, 16, 17, 2], [X, X, X, X, X, 2]),
    ]
    width = max(len(i) for i, _ in rows)
    ids = torch.tensor([i + [PAD] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [X] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trainers(model, tmp_path) -> tuple[Trainer, Trainer]:
    """(the plain HF Trainer, the labelled-logits one) on the same model, one CPU process."""
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False)
    plain = Trainer(model=model, args=args)
    labelled = _labelled_logits_trainer_class()(model=model, args=args, head=output_head(model))
    return plain, labelled


def loss_and_grads(trainer: Trainer, model, num_items) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch(), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def assert_same(model, tmp_path, num_items) -> None:
    plain, labelled = trainers(model, tmp_path)
    assert plain.model_accepts_loss_kwargs and labelled.model_accepts_loss_kwargs
    loss_all, grads_all = loss_and_grads(plain, model, num_items)
    loss_lab, grads_lab = loss_and_grads(labelled, model, num_items)
    torch.testing.assert_close(loss_lab, loss_all, rtol=1e-6, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads_all) == set(grads_lab) == trainable  # every trainable parameter takes part, in both
    for name in grads_all:
        torch.testing.assert_close(grads_lab[name], grads_all[name], msg=lambda m, n=name: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for g in grads_lab.values())


def test_shifted_targets_follow_the_hf_shift():
    b = batch()
    keep, targets = shifted_targets(b["labels"])
    assert keep.shape == b["labels"].shape and not keep[:, -1].any()
    assert targets.tolist() == [41, 52, 43, 55, 44, 57, 2, 45, 50, 2, 2]  # position t predicts label t+1
    assert int(keep.sum()) == int((b["labels"][:, 1:] != X).sum())  # the Trainer's num_items_in_batch count


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("num_items", [None, 25])  # 25: the labelled count of a larger accumulated batch
def test_loss_and_gradients_equal_the_models_own(tmp_path, tied, num_items):
    model = tiny_llama(tied)
    assert_same(model, tmp_path, None if num_items is None else torch.tensor(num_items))


def test_lora_model_keeps_its_adapters_and_equals_the_models_own(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(tied=False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                            trainable_token_indices={"embed_tokens": [41, 43, 45], "lm_head": [41, 43, 45]},
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():  # lora_B starts at zero; a forward that skipped the adapters would now differ
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.normal_(0, 0.5)
    head = output_head(model)
    assert head is model.get_base_model().lm_head  # the token-adapter wrapper the forward calls, not its inner layer
    b = batch()
    keep, _ = shifted_targets(b["labels"])
    model.eval()
    with torch.no_grad():
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        with head_on_rows(head, keep) as calls:
            rows = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        with model.disable_adapter():
            bare = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert calls == [1] and rows.shape == (int(keep.sum()), VOCAB)
    torch.testing.assert_close(rows, full[keep])
    assert not torch.allclose(full[keep], bare[keep], atol=1e-3)  # the adapters matter on these rows
    model.train()
    assert_same(model, tmp_path, torch.tensor(25))


def test_no_labelled_position_gives_what_hf_gives(tmp_path):
    model = tiny_llama(tied=True)
    plain, labelled = trainers(model, tmp_path)
    b = batch()
    b["labels"] = torch.full_like(b["labels"], X)
    for num_items in (None, torch.tensor(5)):
        with torch.no_grad():
            ours = labelled.compute_loss(model, dict(b), num_items_in_batch=num_items)
            hf = plain.compute_loss(model, dict(b), num_items_in_batch=num_items)
        torch.testing.assert_close(ours, hf, equal_nan=True)  # NaN with the mean, 0 with the sum


def test_setting_validation_and_fallback(caplog):
    assert logits_setting({}) == "all" and logits_setting({"logits": "labelled"}) == "labelled"
    with pytest.raises(ValueError, match="sft_train.trainer.logits must be one of"):
        logits_setting({"logits": "some"})
    model = tiny_llama(tied=True)
    assert _labelled_logits_head(model, "labelled", tca4rec=False, custom_loss=False) is model.lm_head
    assert _labelled_logits_head(model, "all", tca4rec=False, custom_loss=False) is None
    assert _labelled_logits_head(model, "labelled", tca4rec=True, custom_loss=False) is None
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()  # not HF's causal-LM loss
    with caplog.at_level(logging.WARNING, logger="align3gr_pipelines.sft.hf_trainer"):
        assert _labelled_logits_head(model, "labelled", tca4rec=False, custom_loss=False) is None
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "as logits: all" in caplog.text


def test_a_head_fed_other_shapes_is_refused():
    model = tiny_llama(tied=True)
    keep = torch.ones(3, 5, dtype=torch.bool)
    with head_on_rows(model.lm_head, keep), pytest.raises(RuntimeError, match="set sft_train.trainer.logits: all"):
        model(input_ids=torch.ones(3, 4, dtype=torch.long))


@pytest.fixture(scope="module")
def toy() -> dict:
    """The sft_train tests' toy tables and SFT examples (20 users, 30 items)."""
    import yaml

    from align3gr_pipelines.pipelines.sft_data.nodes import build_sft_examples
    from tests.pipelines.sft_data.toy_data import make_tables
    from tests.pipelines.sft_train.conftest import INPUTS, ROOT

    tables = make_tables(n_users=20, n_items=30, min_len=5, max_len=9, seed=11)
    data = yaml.safe_load((ROOT / "conf/base/parameters_sft_data.yml").read_text())["sft_data"]
    data.update(max_train_examples=160, targets_per_user=2, target_stride=1, max_history=5)
    examples, _ = build_sft_examples(*(tables[k] for k in INPUTS), data, 0)
    return {**tables, "examples": examples}


def fit(toy: dict, params: dict, **kwargs) -> tuple:
    return fit_sft(toy["examples"], toy["item_scids"], toy["user_scids"], params, seed=0, **kwargs)


def fit_both(toy: dict, tmp_path, nproc: int) -> dict[str, tuple]:
    """A toy fit_sft per setting: gradient accumulation 2 (so the Trainer hands num_items_in_batch to the
    loss), 6 steps, evaluations at 3 and 6, no early stop."""
    from tests.pipelines.sft_train.conftest import tiny_train_params

    return {setting: fit(toy, tiny_train_params(tmp_path / setting, logits=setting, batch_size=8,
                                                gradient_accumulation_steps=2, early_stopping={"patience": None},
                                                nproc_per_node=nproc, launch_timeout_s=300))
            for setting in ("all", "labelled")}


def assert_same_run(runs: dict[str, tuple], world_size: int) -> None:
    (rec_all, m_all), (rec_lab, m_lab) = runs["all"], runs["labelled"]
    assert m_all["info"]["logits"] == "all" and m_lab["info"]["logits"] == "labelled"
    assert m_all["info"]["world_size"] == m_lab["info"]["world_size"] == world_size
    # grad_norm: a loss scaled otherwise (GA, the cross-rank factor) would change it, not only the loss
    for curve in ("train_loss", "eval_loss", "grad_norm"):
        steps_all, values_all = zip(*m_all["curves"][curve])
        steps_lab, values_lab = zip(*m_lab["curves"][curve])
        assert steps_all == steps_lab and len(steps_all) >= 2
        torch.testing.assert_close(torch.tensor(values_lab), torch.tensor(values_all), rtol=1e-5, atol=0)
    best = lambda m: min(m["curves"]["eval_loss"], key=lambda sv: sv[1])[0]  # noqa: E731
    assert best(m_all) == best(m_lab)
    for (name, p_all), p_lab in zip(rec_all.model.state_dict().items(), rec_lab.model.state_dict().values()):
        torch.testing.assert_close(p_lab, p_all, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_fit_sft_selects_the_same_step_with_either_setting(toy, tmp_path):
    assert_same_run(fit_both(toy, tmp_path, nproc=1), world_size=1)


@pytest.mark.slow  # two torchrun launches of 2 gloo ranks: ~30 s on 2 busy cores
@pytest.mark.timeout(300)
def test_fit_sft_under_torchrun_is_the_same_with_either_setting(toy, tmp_path):
    assert_same_run(fit_both(toy, tmp_path, nproc=2), world_size=2)


class Killed(Exception):
    pass


def test_a_work_dir_from_before_the_key_resumes_under_labelled(toy, tmp_path):
    """A run killed before `logits` existed (no key: the full logits) resumes from its checkpoint."""
    from transformers import TrainerCallback

    from tests.pipelines.sft_train.conftest import tiny_train_params

    class KillAt5(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise Killed("simulated kill at step 5")

    old = tiny_train_params(tmp_path / "work", max_steps=6, eval_steps=3)
    del old["trainer"]["logits"]
    with pytest.raises(Killed):
        fit(toy, old, callbacks=[KillAt5()])
    _, metrics = fit(toy, tiny_train_params(tmp_path / "work", max_steps=6, eval_steps=3, logits="labelled"))
    assert metrics["info"]["resumed_from_step"] == 3 and metrics["info"]["logits"] == "labelled"
    assert metrics["scalars"]["global_step"] == 6
