"""The U2I sampled-softmax loss (Eq. 1), AUC and SC features against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align3gr_pipelines.tokenizer.sc_encoder import SCEncoder, sampled_auc, sc_features, u2i_loss


def test_u2i_loss_hand_computed():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    t = 0.5
    # row 0: positive s=0.6, other item s=1.0; row 1: positive s=0.0, other s=0.8
    row0 = -math.log(math.exp(0.6 / t) / (math.exp(0.6 / t) + math.exp(1.0 / t)))
    row1 = -math.log(math.exp(0.0 / t) / (math.exp(0.8 / t) + math.exp(0.0 / t)))
    got = u2i_loss(users, items, torch.tensor([10, 11]), t)
    assert got.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_u2i_loss_with_extra_negatives_hand_computed():
    users = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[0.0, 1.0]])
    negs = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    # the third extra negative is the positive item itself (index 5): it must not count
    expected = -math.log(math.exp(0.0) / (math.exp(0.0) + math.exp(1.0) + math.exp(0.0)))
    got = u2i_loss(users, items, torch.tensor([5]), 1.0, negs, torch.tensor([7, 8, 5]))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_u2i_loss_does_not_use_a_repeated_positive_as_negative():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[0.6, 0.8], [0.6, 0.8]])
    # both rows hold the same item: each row has a single candidate, so the loss is exactly zero
    assert u2i_loss(users, items, torch.tensor([3, 3]), 0.1).item() == pytest.approx(0.0, abs=1e-7)


def test_u2i_loss_decreases_when_trained():
    torch.manual_seed(0)
    enc_u, enc_i = SCEncoder(6, 16, 4, 0.0), SCEncoder(6, 16, 4, 0.0)
    x_u, x_i = torch.randn(32, 6), torch.randn(32, 6)
    opt = torch.optim.Adam([*enc_u.parameters(), *enc_i.parameters()], lr=1e-2)
    idx = torch.arange(32)
    first = None
    for _ in range(60):
        loss = u2i_loss(enc_u(x_u), enc_i(x_i), idx, 0.1)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_sampled_auc_hand_computed():
    u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    pos = torch.tensor([[0.5, 0.0], [0.5, 0.0]])
    neg = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[0.5, 3.0], [-1.0, 0.0]]])
    # user 0: pos 0.5 vs 0.0 (win), vs 1.0 (loss); user 1: vs 0.5 (tie), vs -1 (win) -> (1 + 0 + 0.5 + 1) / 4
    assert sampled_auc(u, pos, neg) == pytest.approx(2.5 / 4)
    assert math.isnan(sampled_auc(u[:0], pos[:0], neg[:0]))


def test_sc_features_normalise_each_part_and_keep_zero_cf():
    sem = np.array([[3.0, 4.0], [1.0, 0.0]])
    cf = np.array([[0.0, 10.0], [0.0, 0.0]])
    x = sc_features(sem, cf)
    assert torch.allclose(x[0], torch.tensor([0.6, 0.8, 0.0, 1.0]))
    assert torch.allclose(x[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert sc_features(sem, None).shape == (2, 2)


def test_sc_encoder_outputs_unit_vectors():
    out = SCEncoder(5, 8, 3)(torch.randn(10, 5))
    assert torch.allclose(out.norm(dim=-1), torch.ones(10), atol=1e-5)
