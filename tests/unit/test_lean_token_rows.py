"""`lm.lean_token_rows`: PEFT's trainable-token layers without their merged [vocab, hidden] weight (issue 27).

The policy is a kind hf backbone (`lm.backbone`: LoRA + the SCID rows as trainable tokens on the embedding and
the untied LM head) over a tiny random Llama. Its LoRA B matrices start at 0 and its trainable rows equal the
frozen ones, which would hide a wrong gradient or a row taken from the wrong table, so the fixture moves every
trainable tensor off its start. Tolerances: the embedding is a lookup, so equal bit for bit; the head's
logits come from another matmul (the frozen columns, then the trainable ones) whose float32 sums may be
blocked differently, so logits, losses and gradients agree to 1e-5 relative (measured: at most 6e-7)."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

from align3gr_pipelines.lm.lean_token_rows import lean_token_rows
from align3gr_pipelines.preference.dpo_stage import train_stage
from align3gr_pipelines.preference.dpo_trainer import (
    DPOConfig,
    collate,
    examples_from_pairs,
    sequence_logps,
    trainable_parameters,
)
from align3gr_pipelines.preference.self_play import build_pairs, item_code_table, sample_prompts
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_lora_rec_lm, make_world

REL = 1e-5


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """(world, the SFT RecLM with every trainable tensor moved off its start, 6 preference pairs)."""
    world = make_world(n_users=8, seed=1)
    policy = make_lora_rec_lm(world, tmp_path_factory.mktemp("lean"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable_parameters(policy.model):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ids, codes, tokens = item_code_table(world.item_scids)
    prompts, _ = sample_prompts(world.sft_examples, ids, 0)
    pairs = build_pairs(prompts.head(6), ids, codes, tokens, None, None, 4, np.random.default_rng(0))[0]
    return world, policy, pairs


def _token_layers(model):
    return [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]


def _batch(lora):
    _, policy, pairs = lora
    return collate(examples_from_pairs(pairs, policy.tokenizer), policy.tokenizer.pad_token_id)


def _loss_and_grads(model, batch, lean: bool):
    """Logits of the prompts, a weighted sum of the response log-probs (both of `sequence_logps`'s forwards)
    and the gradient of every trainable tensor."""
    params = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    with lean_token_rows(model) if lean else contextlib.nullcontext():
        logits = model(input_ids=batch["prompt"], attention_mask=batch["prompt_mask"]).logits.detach()
        logps = sequence_logps(model, batch)
        weights = torch.linspace(-1.0, 1.0, logps.numel()).view_as(logps)
        loss = (logps * weights).sum()
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    return logits, loss.detach(), grads


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = REL) -> bool:
    return float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1e-30)


def test_both_layers_go_lean_and_come_back_after_the_block_and_after_an_exception(lora):
    model = lora[1].model
    layers = _token_layers(model)
    assert {type(m.base_layer) for m in layers} == {torch.nn.Embedding, torch.nn.Linear}  # embedding + untied head
    with lean_token_rows(model) as lean:
        assert sorted(lean) == sorted(n for n, m in model.named_modules() if isinstance(m, TrainableTokensLayer))
        assert all("forward" in m.__dict__ for m in layers)
    assert all("forward" not in m.__dict__ for m in layers)
    with pytest.raises(RuntimeError, match="inside"):
        with lean_token_rows(model):
            raise RuntimeError("inside")
    assert all("forward" not in m.__dict__ and m.forward.__func__ is TrainableTokensLayer.forward for m in layers)


def test_the_embedding_output_is_pefts_bit_for_bit_padding_and_scid_rows_included(lora):
    _, policy, _ = lora
    emb = policy.model.get_input_embeddings()
    layer = emb.token_adapter
    scid = list(layer.token_indices["default"])
    pad = policy.tokenizer.pad_token_id
    ids = torch.tensor([[pad, scid[0], 5, scid[-1], scid[3]], [7, pad, scid[1], 9, scid[0]]])
    peft = emb(ids)
    with lean_token_rows(policy.model):
        lean = emb(ids)
    assert torch.equal(lean, peft)
    assert not torch.equal(peft[0, 1], layer.base_layer.weight[scid[0]])  # the trainable row, not the frozen one


def test_the_head_values_and_the_gradients_of_its_input_and_rows_are_pefts(lora):
    head = lora[1].model.get_output_embeddings()
    layer = head.token_adapter
    delta = layer.trainable_tokens_delta["default"]
    x = torch.randn(2, 3, layer.base_layer.in_features, generator=torch.Generator().manual_seed(1))
    w = torch.randn(2, 3, layer.base_layer.out_features, generator=torch.Generator().manual_seed(2))
    results = []
    for lean in (False, True):
        xi = x.clone().requires_grad_(True)
        delta.grad = None
        with lean_token_rows(head) if lean else contextlib.nullcontext():
            out = head(xi)
        (out * w).sum().backward()
        results.append((out.detach(), xi.grad, delta.grad.clone()))
    delta.grad = None
    (o0, gx0, gd0), (o1, gx1, gd1) = results
    assert _close(o1, o0) and _close(gx1, gx0) and _close(gd1, gd0)
    assert float(gd0.abs().max()) > 0


def test_logits_loss_and_every_trainable_gradient_agree(lora):
    model = lora[1].model
    batch = _batch(lora)
    logits0, loss0, grads0 = _loss_and_grads(model, batch, lean=False)
    logits1, loss1, grads1 = _loss_and_grads(model, batch, lean=True)
    assert _close(logits1, logits0) and _close(loss1, loss0)
    assert set(grads1) == set(grads0)
    assert any("lora_A" in n for n in grads0) and sum("trainable_tokens_delta" in n for n in grads0) == 2
    for n, g in grads0.items():
        assert float(g.abs().max()) > 0, n  # a real gradient, so the comparison means something
        assert _close(grads1[n], g), n


def test_the_lean_forward_saves_no_vocab_by_hidden_tensor_for_the_backward(lora):
    model = lora[1].model
    head = model.get_output_embeddings().token_adapter.base_layer
    shape = tuple(head.weight.shape)  # [vocab, hidden]
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}  # the frozen weights themselves are no copy
    batch = _batch(lora)

    def copies_saved(lean: bool) -> list[tuple[int, ...]]:
        seen: list[tuple[int, ...]] = []

        def pack(t):
            if tuple(t.shape) in (shape, shape[::-1]) and t.untyped_storage().data_ptr() not in own:
                seen.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with lean_token_rows(model) if lean else contextlib.nullcontext():
                sequence_logps(model, batch)
        return seen

    assert copies_saved(lean=False)  # PEFT keeps its merged head weight: the check can fail
    assert copies_saved(lean=True) == []


class _Toy(torch.nn.Module):
    """An embedding whose padding row is one of the trainable rows, scaled as Gemma's is, and an LM head."""

    def __init__(self, bias: bool = False):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 4, padding_idx=3)
        self.emb.embed_scale = 2.0
        self.head = torch.nn.Linear(4, 20, bias=bias)

    def forward(self, x):
        return self.head(self.emb(x))


def _toy(bias: bool = False):
    from peft import TrainableTokensConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_Toy(bias), TrainableTokensConfig(target_modules=["emb", "head"], token_indices=[1, 3, 7]))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    return model


def test_the_padding_row_gets_no_gradient_and_the_embed_scale_applies_as_in_peft():
    model = _toy()
    x = torch.tensor([[3, 1, 2, 7, 3, 0]])
    runs = []
    for lean in (False, True):
        with lean_token_rows(model) if lean else contextlib.nullcontext():
            emb = model.base_model.model.emb(x)
            out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((emb.detach(), out.detach(), grads))
        model.zero_grad(set_to_none=True)
    (e0, o0, g0), (e1, o1, g1) = runs
    assert torch.equal(e1, e0) and _close(o1, o0)
    for n, g in g0.items():
        assert _close(g1[n], g), n
    rows = g0["base_model.model.emb.trainable_tokens_delta.default"]
    assert torch.equal(rows[1], torch.zeros(4)) and float(rows.abs().max()) > 0  # row 1 = token 3 = padding_idx


def test_layers_it_cannot_handle_keep_pefts_forward_and_are_logged(lora, caplog):
    with caplog.at_level(logging.INFO, logger="align3gr_pipelines.lm.lean_token_rows"):
        with lean_token_rows(_toy(bias=True)) as lean:  # PEFT's merged forward leaves a head's bias out
            assert lean == ["base_model.model.emb"]
    assert "head (a linear layer with a bias)" in caplog.text
    caplog.clear()

    model = lora[1].model
    layers = _token_layers(model)
    ids = torch.tensor([[3, list(layers[0].token_indices["default"])[0]]])
    with caplog.at_level(logging.INFO, logger="align3gr_pipelines.lm.lean_token_rows"):
        with model.disable_adapter():
            base = model(input_ids=ids).logits
            with lean_token_rows(model) as lean:
                assert lean == [] and all("forward" not in m.__dict__ for m in layers)
                assert torch.equal(model(input_ids=ids).logits, base)
        assert "PEFT's own forward kept" in caplog.text and "adapters disabled" in caplog.text
        caplog.clear()
        # disabled inside the block: the lean layers hand the call back to PEFT (once logged each)
        with lean_token_rows(model) as lean:
            assert len(lean) == 2
            with model.disable_adapter():
                assert torch.equal(model(input_ids=ids).logits, base)
                model(input_ids=ids)
        assert caplog.text.count("falls back to PEFT's forward on calls with adapters disabled") == 2


def test_a_dpo_stage_with_lean_rows_trains_as_one_without(lora):
    _, policy, pairs = lora
    cfg = DPOConfig(beta=0.5, learning_rate=1e-2, batch_size=2, epochs=2, nll_weight=0.5, show_progress=False, device="cpu")
    assert DPOConfig().lean_token_rows is False
    plain, m0 = train_stage(policy, pairs, cfg, 0, "s", "r")
    lean, m1 = train_stage(policy, pairs, dataclasses.replace(cfg, lean_token_rows=True), 0, "s", "r")
    l0, l1 = (np.array([v for _, v in m["curves"]["loss"]]) for m in (m0, m1))
    assert len(l0) == 6 and np.ptp(l0) > 1e-3  # the loss moves: the steps trained something
    np.testing.assert_allclose(l1, l0, rtol=0, atol=1e-5)
    after0, after1 = dict(plain.model.named_parameters()), dict(lean.model.named_parameters())
    for n, p in after0.items():
        if p.requires_grad:
            assert _close(after1[n].detach(), p.detach(), 1e-4), n
    assert all("forward" not in m.__dict__ for m in _token_layers(lean.model))
    assert m1["info"]["config"]["lean_token_rows"] is True


def test_the_setting_is_off_in_base_and_a_non_bool_is_refused():
    root = Path(__file__).resolve().parents[2]
    for stage in ("sp_dpo_curriculum", "rf_dpo"):
        training = yaml.safe_load((root / f"conf/base/parameters_{stage}.yml").read_text())[stage]["training"]
        assert training["lean_token_rows"] is False
        assert DPOConfig.from_params(training, stage).lean_token_rows is False
    with pytest.raises(ValueError, match=r"rf_dpo\.training\.lean_token_rows must be true or false, got 'yes'"):
        DPOConfig.from_params({"lean_token_rows": "yes"}, "parameters rf_dpo.training")
