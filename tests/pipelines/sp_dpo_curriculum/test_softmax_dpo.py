"""The Softmax-DPO loss against hand-computed values and against standard DPO."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from align3gr_pipelines.softmax_dpo import softmax_dpo_loss


def test_hand_computed_value():
    # r_c = -1 - (-2) = 1; r = [-3 - (-2), -2 - (-2)] = [-1, 0]; beta = 0.5
    # L = -log sigmoid(-log(exp(0.5*(-1-1)) + exp(0.5*(0-1)))) = -log sigmoid(-log(e^-1 + e^-0.5))
    inner = math.log(math.exp(-1.0) + math.exp(-0.5))
    expected = -math.log(1.0 / (1.0 + math.exp(inner)))
    assert expected == pytest.approx(0.680270, abs=1e-6)
    out = softmax_dpo_loss(
        torch.tensor([-1.0]), torch.tensor([[-3.0, -2.0]]), torch.tensor([-2.0]), torch.tensor([[-2.0, -2.0]]), beta=0.5
    )
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5])
    assert out.rejected_rewards.tolist()[0] == pytest.approx([-0.5, 0.0])
    assert out.reward_margin.item() == pytest.approx(0.5 - (-0.25))
    assert out.reward_accuracy.item() == 1.0


def test_equals_standard_dpo_when_one_rejected():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(16, generator=g) * 3 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.3
    sdpo = softmax_dpo_loss(pc, pr[:, None], rc, rr[:, None], beta=beta).loss
    dpo = -F.logsigmoid(beta * ((pc - rc) - (pr - rr))).mean()
    assert sdpo.item() == pytest.approx(dpo.item(), rel=1e-6)
    g_sdpo = torch.autograd.grad(sdpo, [pc, pr], retain_graph=True)
    g_dpo = torch.autograd.grad(dpo, [pc, pr])
    for a, b in zip(g_sdpo, g_dpo):
        assert torch.allclose(a, b, atol=1e-7)


def test_padding_is_ignored_and_reference_policy_gives_log_1_plus_n():
    lp = torch.tensor([[-1.0, -2.0, -3.0, 99.0]])
    mask = torch.tensor([[True, True, True, False]])
    padded = softmax_dpo_loss(torch.tensor([-0.5]), lp, torch.tensor([-1.5]), torch.zeros(1, 4), 0.2, mask).loss
    short = softmax_dpo_loss(torch.tensor([-0.5]), lp[:, :3], torch.tensor([-1.5]), torch.zeros(1, 3), 0.2).loss
    assert padded.item() == pytest.approx(short.item())
    # policy == reference: every reward is 0 and the loss is log(1 + N)
    same = torch.randn(3, 5)
    out = softmax_dpo_loss(same[:, 0], same[:, 1:], same[:, 0], same[:, 1:], beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(1 + 4), rel=1e-6)


def test_gradient_concentrates_on_the_hardest_negative():
    pr = torch.tensor([[-5.0, -1.0]], requires_grad=True)
    softmax_dpo_loss(torch.tensor([-2.0]), pr, torch.tensor([-2.0]), torch.tensor([[-3.0, -3.0]]), beta=1.0).loss.backward()
    assert pr.grad[0, 1] > 10 * pr.grad[0, 0] > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one rejected"):
        softmax_dpo_loss(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, 2), 0.1, torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="beta"):
        softmax_dpo_loss(torch.zeros(1), torch.zeros(1, 2), torch.zeros(1), torch.zeros(1, 2), 0.0)
    with pytest.raises(ValueError, match="rejected"):
        softmax_dpo_loss(torch.zeros(2), torch.zeros(3, 2), torch.zeros(2), torch.zeros(3, 2), 0.1)
