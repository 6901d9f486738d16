"""Residual-quantised VAE (RQ-VAE, as in TIGER): encoder -> L levels of residual vector quantisation -> decoder.

Level l picks the codeword nearest to the residual that levels < l left over, so the code tuple is a
coarse-to-fine address of the input. Codebooks start from k-means on the residuals of real data, are trained
with the codebook + commitment losses, and codewords that no input picked for a while are re-seeded from
current residuals (dead-code restart), so no codebook entry stays unused unnoticed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn


def kmeans(x: torch.Tensor, k: int, iters: int = 25, generator: torch.Generator | None = None) -> torch.Tensor:
    """k-means++ seeding then Lloyd iterations -> centres [k, d]; deterministic for a given generator.

    With fewer distinct points than k, the surplus centres are copies of data points: they are then dead
    codes that the training-time restart re-seeds.
    """
    n = len(x)
    if n == 0:
        raise ValueError("kmeans: no points")
    x = x.float()
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(-1)
    for _ in range(1, k):
        total = d2.sum()
        probs = d2 / total if total > 0 else torch.full_like(d2, 1.0 / n)
        nxt = int(torch.multinomial(probs, 1, generator=generator))
        centres.append(x[nxt])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(-1))
    c = torch.stack(centres)
    for _ in range(iters):
        dist = torch.cdist(x, c)
        assign = dist.argmin(1)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], c)
        empty = (counts == 0).nonzero().flatten()
        if len(empty) and n > k:
            # an empty cluster takes over the points worst served by the current centres
            far = dist.gather(1, assign[:, None]).squeeze(1).argsort(descending=True)[: len(empty)]
            new[empty] = x[far]
        if torch.equal(new, c):
            break
        c = new
    return c


@dataclass
class Quantized:
    z_q: torch.Tensor  # [B, d] straight-through quantised latent: forward = sum of codewords, backward = identity
    codes: torch.Tensor  # [B, L]
    residuals: torch.Tensor  # [B, L, d]: what level l quantised
    vq_loss: torch.Tensor


class ResidualQuantizer(nn.Module):
    def __init__(self, levels: int, codebook_size: int, dim: int, beta: float = 0.25) -> None:
        super().__init__()
        self.levels, self.codebook_size, self.dim, self.beta = levels, codebook_size, dim, beta
        self.codebooks = nn.Parameter(torch.randn(levels, codebook_size, dim) * dim**-0.5)
        # how often each code was picked since the last dead-code check (training only)
        self.register_buffer("usage", torch.zeros(levels, codebook_size, dtype=torch.long))

    def forward(self, z: torch.Tensor) -> Quantized:
        r = z
        codes, residuals, loss = [], [], z.new_zeros(())
        quantised = torch.zeros_like(z)
        for level in range(self.levels):
            book = self.codebooks[level]
            code = torch.cdist(r.detach(), book.detach()).argmin(1)
            e = book[code]
            # codebook term moves codewords to residuals; commitment term (beta) keeps the encoder near them
            loss = loss + ((r.detach() - e) ** 2).sum(-1).mean() + self.beta * ((r - e.detach()) ** 2).sum(-1).mean()
            codes.append(code)
            residuals.append(r)
            quantised = quantised + e.detach()
            r = r - e.detach()
            if self.training:
                self.usage[level] += torch.bincount(code, minlength=self.codebook_size)
        z_q = z + (quantised - z).detach()
        return Quantized(z_q, torch.stack(codes, 1), torch.stack(residuals, 1), loss)

    @torch.no_grad()
    def init_kmeans(self, z: torch.Tensor, iters: int = 25, generator: torch.Generator | None = None) -> None:
        """Fit level l's codebook by k-means on the residuals left by levels < l."""
        # Once per training run, on the CPU: its k-means++ draws come from a CPU generator, and this way a GPU
        # run starts from exactly the codebooks a CPU run would.
        r = z.detach().float().cpu()
        for level in range(self.levels):
            book = kmeans(r, self.codebook_size, iters, generator)
            self.codebooks[level].copy_(book)
            r = r - book[torch.cdist(r, book).argmin(1)]
        self.usage.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, residuals: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Re-seed codes unused since the last call with random residuals of the current batch [B, L, d]."""
        restarted = 0
        for level in range(self.levels):
            dead = (self.usage[level] == 0).nonzero().flatten()
            if len(dead):
                pick = torch.randint(len(residuals), (len(dead),), generator=generator)
                self.codebooks[level, dead] = residuals[pick, level].detach().to(self.codebooks.dtype)
                restarted += len(dead)
        self.usage.zero_()
        return restarted


@dataclass
class RQOutput:
    x_hat: torch.Tensor
    codes: torch.Tensor
    residuals: torch.Tensor
    loss: torch.Tensor  # recon + vq
    recon_loss: torch.Tensor
    vq_loss: torch.Tensor


class RQVAE(nn.Module):
    def __init__(
        self,
        in_dim: int,
        latent_dim: int = 32,
        hidden_dim: int = 128,
        levels: int = 3,
        codebook_size: int = 256,
        beta: float = 0.25,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        # The input LayerNorm (no affine) puts unit-norm SC embeddings (coordinates ~1/sqrt(d)) on a unit
        # per-coordinate scale; without it the latents of all inputs sit within ~0.01 of each other and a
        # few Adam steps scramble the k-means codebooks.
        self.encoder = nn.Sequential(
            nn.LayerNorm(in_dim, elementwise_affine=False),
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, latent_dim),
        )
        self.quantizer = ResidualQuantizer(levels, codebook_size, latent_dim, beta)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim or in_dim))
        # A decoder that starts at zero output starts at recon = |x|^2 instead of ~10x that, so the first
        # steps do not yank the encoder away from the latents the codebooks were k-means-fitted to.
        nn.init.zeros_(self.decoder[-1].weight)
        nn.init.zeros_(self.decoder[-1].bias)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> RQOutput:
        """Quantise x; the decoder reconstructs ``target`` (default: x itself)."""
        q = self.quantizer(self.encoder(x))
        x_hat = self.decoder(q.z_q)
        recon = ((x_hat - (x if target is None else target)) ** 2).sum(-1).mean()
        return RQOutput(x_hat, q.codes, q.residuals, recon + q.vq_loss, recon, q.vq_loss)

    @torch.no_grad()
    def init_codebooks(self, x: torch.Tensor, iters: int = 25, generator: torch.Generator | None = None) -> None:
        self.quantizer.init_kmeans(self.encoder(x), iters, generator)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """codes [B, L] and the residuals [B, L, d] each level quantised (eval mode, no usage counting)."""
        was_training = self.training
        self.eval()
        q = self.quantizer(self.encoder(x))
        self.train(was_training)
        return q.codes, q.residuals


def effective_codebook_size(n_entities: int, codebook_size: int, min_items_per_code: int | None) -> int:
    """Shrink the codebook for small catalogues so the first level still groups entities.

    With ``min_items_per_code`` m, the size is the largest power of two <= n / m, never above
    ``codebook_size`` and never below 4; ``None`` or 0 keeps ``codebook_size``. The paper's 256 is kept from
    256·m entities up (m=16: 4,096).
    """
    if not min_items_per_code:
        return codebook_size
    target = max(n_entities / min_items_per_code, 4)
    return int(min(codebook_size, 2 ** int(np.floor(np.log2(target)))))


def usage_stats(codes: np.ndarray | torch.Tensor, codebook_size: int) -> list[dict[str, float]]:
    """Per level: share of codes used, perplexity exp(H) of the code distribution, and the raw counts."""
    codes = np.asarray(codes)
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / counts.sum()
        out.append({
            "level": level,
            "utilisation": float((counts > 0).mean()),
            "perplexity": float(np.exp(-(p * np.log(p)).sum())),
            "counts": counts.tolist(),
        })
    return out
