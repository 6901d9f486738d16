"""Softmax-DPO (S-DPO): one chosen response against N rejected ones.

Align3GR's Eq. 3, from Chen et al. 2024 ("On Softmax Direct Preference Optimization for Recommendation"):

    L = -log σ( -log Σ_{j=1..N} exp( β·(r_j − r_c) ) ),        r = log π_θ(y | x) − log π_ref(y | x)

where r_c is the chosen response's log-ratio and r_j the rejected ones'. Every rejected item competes with
the chosen one inside a single softmax, so a hard negative the policy still likes dominates the sum and
gets most of the gradient. With N = 1 the sum has one term and L = -log σ(β·(r_c − r_1)): standard DPO
(Rafailov et al. 2023).

Since -log σ(-x) = softplus(x), the loss is softplus(logsumexp_j β·(r_j − r_c)), which is how it is
computed (stable for any magnitude of the rewards). Rejected lists of different lengths are padded and
masked out of the logsumexp.

Likelihood displacement guard (RPO, Pang et al. 2024 "Iterative Reasoning Preference Optimization"; the
same term in Liu et al. 2024 "Provably Mitigating Overoptimization"): DPO only asks the chosen response to
gain *relative to* the rejected ones, so both can fall together — the chosen item's log-probability drops
while the margin grows, and top-K recall falls with it. ``nll_weight`` = α adds α · NLL(chosen), the
chosen response's negative log-likelihood per token, to each example's loss. α = 0 is exactly Softmax-DPO
(the term is not even computed); the paper (Align3GR) has no such term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SoftmaxDPOOutput:
    loss: torch.Tensor  # scalar: mean over the batch
    losses: torch.Tensor  # [B]
    chosen_rewards: torch.Tensor  # [B]: β·(log π − log π_ref) of the chosen response, detached
    rejected_rewards: torch.Tensor  # [B, N], detached; padded slots hold NaN
    reward_margin: torch.Tensor  # [B]: chosen reward − mean reward of the valid rejected ones
    reward_accuracy: torch.Tensor  # [B]: 1.0 where the chosen reward beats every rejected reward
    chosen_nll: torch.Tensor  # [B]: per-token NLL of the chosen response under the policy, detached


def softmax_dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    rejected_mask: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
) -> SoftmaxDPOOutput:
    """S-DPO loss from sequence log-probabilities: chosen [B], rejected [B, N], mask [B, N] (True = real).

    ``nll_weight`` > 0 adds ``nll_weight · (−policy_chosen_logps / chosen_lengths)`` per example (RPO);
    ``chosen_lengths`` [B] = tokens in each chosen response (None = 1, i.e. the summed log-prob)."""
    if beta <= 0:
        raise ValueError(f"softmax_dpo_loss: beta must be > 0, got {beta}")
    if nll_weight < 0:
        raise ValueError(f"softmax_dpo_loss: nll_weight must be >= 0, got {nll_weight}")
    if policy_rejected_logps.ndim != 2 or policy_chosen_logps.shape != policy_rejected_logps.shape[:1]:
        raise ValueError(
            "softmax_dpo_loss: expected chosen log-probs [B] and rejected [B, N], got "
            f"{tuple(policy_chosen_logps.shape)} and {tuple(policy_rejected_logps.shape)}"
        )
    if rejected_mask is None:
        rejected_mask = torch.ones_like(policy_rejected_logps, dtype=torch.bool)
    rejected_mask = rejected_mask.bool()
    if not bool(rejected_mask.any(dim=1).all()):
        raise ValueError("softmax_dpo_loss: every example needs at least one rejected response")

    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    logits = beta * (rejected_logratio - chosen_logratio.unsqueeze(1))
    # Padded slots become -inf so they add exp(-inf) = 0 to the sum (masked_fill keeps their gradient 0).
    logits = logits.masked_fill(~rejected_mask, float("-inf"))
    losses = F.softplus(torch.logsumexp(logits, dim=1))
    lengths = torch.ones_like(policy_chosen_logps) if chosen_lengths is None else chosen_lengths.to(policy_chosen_logps)
    chosen_nll = -policy_chosen_logps / lengths.clamp(min=1)
    if nll_weight > 0:
        losses = losses + nll_weight * chosen_nll

    with torch.no_grad():
        chosen_rewards = beta * chosen_logratio.detach()
        rejected_rewards = (beta * rejected_logratio.detach()).masked_fill(~rejected_mask, float("nan"))
        n_valid = rejected_mask.sum(dim=1)
        mean_rejected = torch.nan_to_num(rejected_rewards, nan=0.0).sum(dim=1) / n_valid
        best_rejected = torch.nan_to_num(rejected_rewards, nan=float("-inf")).amax(dim=1)
        margin = chosen_rewards - mean_rejected
        accuracy = (chosen_rewards > best_rejected).float()
    return SoftmaxDPOOutput(
        loss=losses.mean(),
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        reward_margin=margin,
        reward_accuracy=accuracy,
        chosen_nll=chosen_nll.detach(),
    )
