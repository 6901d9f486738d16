"""The dual SCID tokenizer (Align3GR, stage 1): SC encoders for users and items + a user and an item RQ-VAE.

Training (``fit_sc_tokenizer``) follows Eq. 2, L = alpha * L_U2I + gamma * (L_RQ_item + L_RQ_user):
phase 1 (alpha=1, gamma=0) aligns the SC encoders with the sampled-softmax U2I loss while the held-out AUC
is watched; phase 2 (alpha=0.1, gamma=1) initialises both codebooks by k-means on the aligned embeddings and
trains encoders and RQ-VAEs jointly, so the codes stay predictive of who interacts with what.

Each RQ-VAE quantises the SC embedding and its decoder reconstructs the encoder's fixed input features
(concat(semantic, CF)), not the SC embedding: with the SC embedding as its own, trainable target, gamma=1
against alpha=0.1 collapses every SC embedding onto one point (U2I AUC fell to ~0.55 when we tried), while a
fixed target makes the codes keep what the features say about each user and item.

Ablations (the paper's Table 3) are config switches: ``user_scids=False`` drops the user RQ-VAE (item-only
tokenization), ``use_cf=False`` feeds the encoders the semantic embedding alone, ``u2i_alignment=False``
skips phase 1 and the U2I term and quantises the normalised concatenated features directly.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from align3gr_pipelines.tokenizer.rq_vae import RQVAE
from align3gr_pipelines.tokenizer.sc_encoder import IdentitySC, SCEncoder, sampled_auc, sc_features, u2i_loss

CONFIG_FILE = "sc_tokenizer_config.json"
WEIGHTS_FILE = "model.safetensors"


class SCTokenizer(nn.Module):
    """Config keys: semantic_dim, cf_dim, use_cf, u2i_alignment, user_scids, sc_hidden_dim, sc_dim, dropout,
    temperature, latent_dim, rq_hidden_dim, levels, beta, item_codebook_size, user_codebook_size (+ free info)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        c = self.config
        in_dim = c["semantic_dim"] + (c["cf_dim"] if c["use_cf"] else 0)
        if c["u2i_alignment"]:
            self.item_encoder: nn.Module = SCEncoder(in_dim, c["sc_hidden_dim"], c["sc_dim"], c["dropout"])
            self.user_encoder: nn.Module = SCEncoder(in_dim, c["sc_hidden_dim"], c["sc_dim"], c["dropout"])
            sc_dim = c["sc_dim"]
        else:
            self.item_encoder, self.user_encoder, sc_dim = IdentitySC(), IdentitySC(), in_dim
        self.sc_dim = sc_dim

        def rq(size: int) -> RQVAE:
            return RQVAE(sc_dim, c["latent_dim"], c["rq_hidden_dim"], c["levels"], size, c["beta"], out_dim=in_dim)

        self.item_rq = rq(c["item_codebook_size"])
        self.user_rq = rq(c["user_codebook_size"]) if c["user_scids"] else None

    # --- features -> SC embeddings -> codes --------------------------------------------------------------
    def features(self, semantic: np.ndarray | torch.Tensor, cf: np.ndarray | torch.Tensor | None) -> torch.Tensor:
        if self.config["use_cf"] and cf is None:
            raise ValueError("SCTokenizer: this tokenizer uses CF features but none were given")
        return sc_features(semantic, cf if self.config["use_cf"] else None)

    def encoder(self, side: str) -> nn.Module:
        return {"item": self.item_encoder, "user": self.user_encoder}[side]

    def rq(self, side: str) -> RQVAE | None:
        return {"item": self.item_rq, "user": self.user_rq}[side]

    @torch.no_grad()
    def sc_embeddings(self, side: str, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        enc = self.encoder(side)
        was_training = enc.training
        enc.eval()
        out = torch.cat([enc(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else x.new_zeros(0, self.sc_dim)
        enc.train(was_training)
        return out

    @torch.no_grad()
    def codes(self, side: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw codes [n, L] (before collision resolution) and residuals [n, L, latent] from features x."""
        rq = self.rq(side)
        if rq is None:
            raise ValueError(f"SCTokenizer: no {side} RQ-VAE (item-only tokenization)")
        return rq.encode(self.sc_embeddings(side, x))

    @torch.no_grad()
    def reconstruction_loss(self, side: str, x: torch.Tensor) -> float:
        rq = self.rq(side)
        was_training = rq.training
        rq.eval()
        value = rq(self.sc_embeddings(side, x), target=x).recon_loss.item()
        rq.train(was_training)
        return value

    # --- persistence ---------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "SCTokenizer":
        path = Path(path)
        if not (path / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"SCTokenizer.from_pretrained: {path / CONFIG_FILE} not found")
        model = cls(json.loads((path / CONFIG_FILE).read_text()))
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE), device=device))
        return model.to(device).eval()


@dataclass
class U2IData:
    """Everything the tokenizer trains and is checked on, as index tensors into the feature tables."""

    item_x: torch.Tensor  # [n_items, in_dim]
    user_x: torch.Tensor  # [n_users, in_dim]
    pairs: torch.Tensor  # [P, 2] (user, item) training interactions
    eval_users: torch.Tensor  # [E] held-out pairs for AUC
    eval_pos: torch.Tensor  # [E]
    eval_neg: torch.Tensor  # [E, n_neg] sampled negatives


def sample_eval_negatives(
    pos: np.ndarray, n_items: int, n_neg: int, rng: np.random.Generator, exclude: list[set[int]] | None = None
) -> np.ndarray:
    """n_neg items per row, uniform, never the row's positive nor (where that leaves any item) its ``exclude`` set."""
    if n_items < 2:
        raise ValueError("AUC negatives: the catalogue needs at least two items")
    out = np.empty((len(pos), n_neg), dtype=np.int64)
    for r, p in enumerate(pos):
        banned = {int(p)} | (exclude[r] if exclude is not None else set())
        if n_items - len(banned) < 1:
            banned = {int(p)}
        row: list[int] = []
        while len(row) < n_neg:
            row.extend(int(c) for c in rng.integers(0, n_items, size=2 * n_neg) if int(c) not in banned)
        out[r] = row[:n_neg]
    return out


def _auc(tok: SCTokenizer, data: U2IData) -> float:
    if len(data.eval_users) == 0:
        return float("nan")
    users = tok.sc_embeddings("user", data.user_x)[data.eval_users]
    items = tok.sc_embeddings("item", data.item_x)
    return sampled_auc(users, items[data.eval_pos], items[data.eval_neg])


def fit_sc_tokenizer(
    tok: SCTokenizer,
    data: U2IData,
    *,
    phase1: dict[str, Any],
    phase2: dict[str, Any],
    n_random_negatives: int = 0,
    kmeans_iters: int = 25,
    dead_code_window: int = 50,
    log_every: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train in place on ``device`` (the tokenizer is left there); returns ``{"curves": {name: [[step, value]]},
    "scalars": {...}}``. Sampling uses a CPU generator, so every device draws the same batches; the encoders
    and RQ-VAEs stay in fp32 (nearest-codeword choices are what bf16 would perturb, and the MLPs are small)."""
    from align3gr_pipelines.devices import resolve_device

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    device = resolve_device(device)
    tok.to(device)
    data = U2IData(*(t.to(device) for t in (data.item_x, data.user_x, data.pairs, data.eval_users, data.eval_pos, data.eval_neg)))
    c = tok.config
    temperature = float(c["temperature"])
    curves: dict[str, list[list[float]]] = {}
    scalars: dict[str, float] = {"dead_codes_restarted_item": 0.0, "dead_codes_restarted_user": 0.0}
    sides = ["item"] + (["user"] if tok.user_rq is not None else [])
    feats = {"item": data.item_x, "user": data.user_x}
    step = 0
    initialised = False

    def init_codebooks() -> None:
        nonlocal initialised
        for side in sides:
            tok.rq(side).init_codebooks(tok.sc_embeddings(side, feats[side]), kmeans_iters, gen)
        initialised = True

    def log(name: str, value: float) -> None:
        curves.setdefault(name, []).append([step, float(value)])

    def run_phase(name: str, alpha: float, gamma: float, epochs: int, batch_size: int, rq_batch_size: int, lr: float) -> None:
        nonlocal step
        if not c["u2i_alignment"]:
            alpha = 0.0  # identity encoders: nothing for the U2I loss to move
        if gamma > 0 and not initialised:
            init_codebooks()
        params = [p for p in tok.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        steps_per_epoch = max(1, math.ceil(len(data.pairs) / batch_size))
        total_steps = epochs * steps_per_epoch
        running: dict[str, list[float]] = {}
        tok.train()
        bar = tqdm(total=total_steps, desc=f"SC tokenizer {name}", unit="step")
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(data.pairs), generator=gen).to(device)
            for b in range(steps_per_epoch):
                parts: dict[str, torch.Tensor] = {}
                residuals: dict[str, torch.Tensor] = {}
                loss = torch.zeros((), device=device)
                if alpha > 0:
                    batch = data.pairs[order[b * batch_size : (b + 1) * batch_size]]
                    neg_index = torch.randint(len(data.item_x), (n_random_negatives,), generator=gen).to(device)
                    parts["u2i_loss"] = u2i_loss(
                        tok.user_encoder(data.user_x[batch[:, 0]]),
                        tok.item_encoder(data.item_x[batch[:, 1]]),
                        batch[:, 1],
                        temperature,
                        tok.item_encoder(data.item_x[neg_index]) if n_random_negatives else None,
                        neg_index,
                    )
                    loss = loss + alpha * parts["u2i_loss"]
                if gamma > 0:
                    for side in sides:
                        idx = torch.randint(len(feats[side]), (rq_batch_size,), generator=gen).to(device)
                        x = feats[side][idx]
                        out = tok.rq(side)(tok.encoder(side)(x), target=x)
                        parts[f"{side}_recon_loss"], parts[f"{side}_vq_loss"] = out.recon_loss, out.vq_loss
                        loss = loss + gamma * out.loss
                        residuals[side] = out.residuals.detach()
                parts["loss"] = loss
                opt.zero_grad(set_to_none=True)
                if loss.requires_grad:
                    loss.backward()
                    opt.step()
                # restart codes nobody picked during the last window (never right before the end)
                if gamma > 0 and dead_code_window and (step + 1) % dead_code_window == 0 and step + 1 < total_steps:
                    for side in sides:
                        scalars[f"dead_codes_restarted_{side}"] += tok.rq(side).quantizer.restart_dead_codes(residuals[side], gen)
                step += 1
                bar.update(1)
                for k, v in parts.items():  # kept on the device: one sync per log point, not per step
                    running.setdefault(k, []).append(v.detach())
                if step % log_every == 0 or b == steps_per_epoch - 1:
                    for k, vals in running.items():
                        log(f"{name}_{k}", float(np.mean(torch.stack(vals).double().cpu().numpy())))
                    running.clear()
            auc = _auc(tok, data)
            log(f"{name}_auc", auc)
            bar.set_postfix(epoch=epoch, auc=f"{auc:.4f}")
            tok.train()
        bar.close()
        scalars[f"{name}_auc"] = curves[f"{name}_auc"][-1][1] if epochs else float("nan")
        for k in ("u2i_loss", "loss"):
            if f"{name}_{k}" in curves:
                scalars[f"{name}_final_{k}"] = curves[f"{name}_{k}"][-1][1]

    scalars["auc_before_training"] = _auc(tok, data)
    if c["u2i_alignment"] and phase1.get("epochs", 0) > 0:
        run_phase("phase1", float(phase1["alpha"]), float(phase1["gamma"]), int(phase1["epochs"]),
                  int(phase1["batch_size"]), int(phase1.get("rq_batch_size", phase1["batch_size"])), float(phase1["lr"]))
    run_phase("phase2", float(phase2["alpha"]), float(phase2["gamma"]), int(phase2["epochs"]),
              int(phase2["batch_size"]), int(phase2["rq_batch_size"]), float(phase2["lr"]))
    if not initialised:  # gamma = 0 throughout: codes still come from k-means on the final embeddings
        init_codebooks()
    tok.eval()
    return {"curves": curves, "scalars": scalars}
