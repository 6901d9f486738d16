"""The Softmax-DPO loss against hand-computed values and against standard DPO."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from align3gr_pipelines.preference.softmax_dpo import softmax_dpo_loss


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


def test_nll_guard_at_weight_zero_is_plain_softmax_dpo():
    g = torch.Generator().manual_seed(1)
    pc, rc = torch.randn(6, generator=g) * 2, torch.randn(6, generator=g) * 2
    pr, rr = torch.randn(6, 5, generator=g) * 2, torch.randn(6, 5, generator=g) * 2
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[:, 0] = True
    lengths = torch.tensor([4, 4, 3, 4, 2, 4])
    pc.requires_grad_(True)
    plain = softmax_dpo_loss(pc, pr, rc, rr, 0.7, mask)
    zero = softmax_dpo_loss(pc, pr, rc, rr, 0.7, mask, nll_weight=0.0, chosen_lengths=lengths)
    assert torch.equal(plain.losses, zero.losses) and torch.equal(plain.loss, zero.loss)
    assert torch.equal(torch.autograd.grad(plain.loss, pc)[0], torch.autograd.grad(zero.loss, pc)[0])


def test_nll_guard_adds_the_chosen_per_token_nll():
    pc, rc = torch.tensor([-3.0, -8.0]), torch.tensor([-3.5, -7.0])
    pr, rr = torch.tensor([[-4.0, -5.0], [-6.0, -9.0]]), torch.tensor([[-4.0, -4.5], [-6.5, -9.0]])
    lengths = torch.tensor([4, 2])
    plain = softmax_dpo_loss(pc, pr, rc, rr, 0.5)
    guarded = softmax_dpo_loss(pc, pr, rc, rr, 0.5, nll_weight=0.3, chosen_lengths=lengths)
    assert guarded.losses.tolist() == pytest.approx((plain.losses + 0.3 * torch.tensor([3.0 / 4, 8.0 / 2])).tolist())
    assert guarded.chosen_nll.tolist() == pytest.approx([0.75, 4.0])
    # the guard pushes the chosen log-prob up: its gradient is more negative than plain DPO's
    x = pc.clone().requires_grad_(True)
    g_plain = torch.autograd.grad(softmax_dpo_loss(x, pr, rc, rr, 0.5).loss, x)[0]
    g_guard = torch.autograd.grad(softmax_dpo_loss(x, pr, rc, rr, 0.5, nll_weight=0.3, chosen_lengths=lengths).loss, x)[0]
    assert (g_guard < g_plain).all()
    with pytest.raises(ValueError, match="nll_weight"):
        softmax_dpo_loss(pc, pr, rc, rr, 0.5, nll_weight=-1.0)
