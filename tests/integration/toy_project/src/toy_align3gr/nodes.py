"""Toy stages that really compute: random items, residual k-means codes, a trained linear scorer."""
from __future__ import annotations

import hashlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from toy_align3gr.model import ToyScorer  # noqa: E402


def make_items(params: dict, seed: int) -> tuple[pd.DataFrame, dict]:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(params["n_items"], params["n_features"]))
    popularity = feats @ rng.normal(size=params["n_features"]) + 0.1 * rng.normal(size=params["n_items"])
    items = pd.DataFrame(
        {
            "item_id": [f"item{k}" for k in range(params["n_items"])],
            "features": [row.tolist() for row in feats],
            "popularity": popularity,
        }
    )
    fingerprint = {"n_items": int(params["n_items"]), "sha256": hashlib.sha256(feats.tobytes()).hexdigest()}
    return items, fingerprint


def embed_items(items: pd.DataFrame, params: dict) -> np.ndarray:
    x = np.stack(items["features"].to_numpy())
    return (x - x.mean(0)) / (x.std(0) + 1e-8)


def quantize_items(embeddings: np.ndarray, items: pd.DataFrame, params: dict, seed: int):
    rng = np.random.default_rng(seed)
    residual = embeddings.copy()
    codes = np.zeros((len(residual), params["levels"]), dtype=int)
    curves, scalars = {}, {}
    for level in range(params["levels"]):
        centroids = residual[rng.choice(len(residual), params["codebook_size"], replace=False)]
        curve = []
        for it in range(params["kmeans_iters"]):
            dist = ((residual[:, None, :] - centroids[None]) ** 2).sum(-1)
            assign = dist.argmin(1)
            curve.append([it, float(dist.min(1).mean())])
            for c in range(params["codebook_size"]):
                if (assign == c).any():
                    centroids[c] = residual[assign == c].mean(0)
        codes[:, level] = assign
        residual = residual - centroids[assign]
        curves[f"inertia_level{level}"] = curve
        scalars[f"usage_level{level}"] = float(len(np.unique(assign)) / params["codebook_size"])
    tokens = ["".join(f"<i{lvl}_{c}>" for lvl, c in enumerate(row)) for row in codes]
    scalars["collision_rate"] = float(1 - len(set(tokens)) / len(tokens))
    scids = pd.DataFrame({"id": items["item_id"], "codes": [row.tolist() for row in codes], "tokens": tokens})
    fig, ax = plt.subplots(figsize=(4, 3))
    for level in range(params["levels"]):
        ax.bar(np.arange(params["codebook_size"]) + 0.4 * level, np.bincount(codes[:, level], minlength=params["codebook_size"]), width=0.4, label=f"level {level}")
    ax.set_xlabel("code")
    ax.legend()
    return scids, {"scalars": scalars, "curves": curves, "info": {"levels": params["levels"]}}, fig


def train_scorer(item_scids: pd.DataFrame, items: pd.DataFrame, params: dict, seed: int):
    levels = len(item_scids["codes"].iloc[0])
    codebook_size = int(max(max(c) for c in item_scids["codes"])) + 1
    model = ToyScorer(np.zeros(levels * codebook_size + 1), levels, codebook_size)
    x = model.features(np.stack(item_scids["codes"].to_numpy()))
    y = items.set_index("item_id").loc[item_scids["id"], "popularity"].to_numpy()
    loss = []
    for step in range(params["steps"]):
        err = x @ model.weights - y
        loss.append([step, float((err**2).mean())])
        model.weights = model.weights - params["lr"] * 2 * x.T @ err / len(y)
    return model, {"scalars": {"final_loss": loss[-1][1]}, "curves": {"loss": loss}, "info": {"seed": seed}}


def evaluate_scorer(model: ToyScorer, item_scids: pd.DataFrame, items: pd.DataFrame):
    y = items.set_index("item_id").loc[item_scids["id"], "popularity"].to_numpy()
    pred = model.predict(np.stack(item_scids["codes"].to_numpy()))
    rows = []
    for name, p in (("toy_scorer", pred), ("mean_baseline", np.full_like(y, y.mean()))):
        rows.append({"model": name, "split": "test", "metric": "mae", "value": float(np.abs(p - y).mean())})
        rows.append({"model": name, "split": "test", "metric": "rmse", "value": float(np.sqrt(((p - y) ** 2).mean()))})
    table = pd.DataFrame(rows)
    md = "| model | metric | value |\n|---|---|---|\n" + "\n".join(
        f"| {r['model']} | {r['metric']} | {r['value']:.4f} |" for r in rows
    )
    return table, md + "\n"
