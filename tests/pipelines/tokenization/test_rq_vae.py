"""The residual quantiser and RQ-VAE."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align3gr_pipelines.tokenizer.rq_vae import RQVAE, ResidualQuantizer, effective_codebook_size, kmeans, usage_stats


def clustered(n: int = 400, d: int = 8, k: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    return centres[torch.randint(k, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)


def test_codes_in_range_and_shape():
    rq = RQVAE(in_dim=8, latent_dim=4, hidden_dim=16, levels=3, codebook_size=5)
    x = clustered()
    rq.init_codebooks(x, iters=5, generator=torch.Generator().manual_seed(0))
    out = rq(x)
    assert out.codes.shape == (len(x), 3)
    assert out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < 5
    codes, residuals = rq.encode(x)
    assert torch.equal(codes, out.codes) and residuals.shape == (len(x), 3, 4)


def test_residual_norm_falls_level_by_level():
    z = clustered(d=6)
    rq = ResidualQuantizer(levels=3, codebook_size=8, dim=6)
    rq.init_kmeans(z, iters=20, generator=torch.Generator().manual_seed(0))
    q = rq(z)
    norms = [q.residuals[:, level].pow(2).sum(-1).mean().item() for level in range(3)]
    final = (z - rq.codebooks[torch.arange(3), q.codes].sum(1)).pow(2).sum(-1).mean().item()
    assert norms[0] > norms[1] > norms[2] > final, norms + [final]
    # and the quantised latent in the forward pass is exactly the sum of the chosen codewords
    assert torch.allclose(q.z_q, rq.codebooks[torch.arange(3), q.codes].sum(1), atol=1e-5)


def test_straight_through_gradients_reach_the_encoder():
    torch.manual_seed(0)
    rq = RQVAE(in_dim=8, latent_dim=4, hidden_dim=16, levels=2, codebook_size=4)
    x = clustered()
    rq.init_codebooks(x, iters=5, generator=torch.Generator().manual_seed(0))
    torch.nn.init.normal_(rq.decoder[-1].weight)  # it starts at zero on purpose; any trained decoder is not
    rq.zero_grad()
    rq(x).recon_loss.backward()  # the reconstruction alone: only the straight-through path reaches the encoder
    grads = [p.grad for p in rq.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0
    assert rq.quantizer.codebooks.grad is None or rq.quantizer.codebooks.grad.abs().sum() == 0


def test_codebook_and_commitment_losses_move_codebooks_and_encoder():
    rq = RQVAE(in_dim=8, latent_dim=4, hidden_dim=16, levels=2, codebook_size=4)
    x = clustered()
    rq.init_codebooks(x, iters=5, generator=torch.Generator().manual_seed(0))
    rq(x).vq_loss.backward()
    assert rq.quantizer.codebooks.grad.abs().sum() > 0
    assert rq.encoder[1].weight.grad.abs().sum() > 0


def test_kmeans_is_deterministic_and_separates_clusters():
    x = clustered(k=4)
    a = kmeans(x, 4, iters=20, generator=torch.Generator().manual_seed(3))
    b = kmeans(x, 4, iters=20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assign = torch.cdist(x, a).argmin(1)
    assert len(torch.unique(assign)) == 4


def test_kmeans_with_fewer_points_than_codes():
    x = torch.randn(3, 2)
    c = kmeans(x, 8, iters=5, generator=torch.Generator().manual_seed(0))
    assert c.shape == (8, 2) and torch.isfinite(c).all()


def test_dead_codes_are_restarted_from_residuals():
    z = clustered(d=4)
    rq = ResidualQuantizer(levels=2, codebook_size=6, dim=4)
    rq.init_kmeans(z, iters=5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        rq.codebooks[0, 5] = 1e6  # a codeword nothing will ever pick
    rq.train()
    q = rq(z)
    assert rq.usage[0, 5] == 0
    restarted = rq.restart_dead_codes(q.residuals, torch.Generator().manual_seed(0))
    assert restarted >= 1
    assert rq.codebooks[0, 5].abs().max() < 1e3  # now a real residual
    assert int(rq.usage.sum()) == 0  # the window starts over
    rq(z)
    assert rq.usage[0].sum() == len(z)


@pytest.mark.parametrize(
    ("n", "size", "m", "expected"),
    [(500, 256, 16, 16), (1000, 256, 16, 32), (10_000, 256, 16, 256), (25_000, 256, 16, 256), (10, 256, 16, 4), (500, 256, None, 256)],
)
def test_effective_codebook_size(n, size, m, expected):
    assert effective_codebook_size(n, size, m) == expected


def test_usage_stats_hand_computed():
    codes = np.array([[0, 1], [0, 1], [1, 1], [2, 1]])
    level0, level1 = usage_stats(codes, 4)
    assert level0["utilisation"] == 0.75 and level1["utilisation"] == 0.25
    p = np.array([0.5, 0.25, 0.25])
    assert math.isclose(level0["perplexity"], float(np.exp(-(p * np.log(p)).sum())))
    assert math.isclose(level1["perplexity"], 1.0)
    assert level0["counts"] == [2, 1, 1, 0]
