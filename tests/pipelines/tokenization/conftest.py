"""Fixtures of the tokenization tests: a tiny leave-one-out dataset in the data_prep schema, tiny parameters
(the real parameter file with small sizes), and the stage's feature tables computed once per session."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from align3gr_pipelines.pipelines.tokenization import nodes

REPO = Path(__file__).resolve().parents[3]
SEED = 7

TOPICS = {
    "guitars": ["guitar", "strings", "fretboard", "acoustic", "electric"],
    "cameras": ["camera", "lens", "shutter", "sensor", "tripod"],
    "tents": ["tent", "camping", "shelter", "waterproof", "hiking"],
    "coffee": ["coffee", "espresso", "grinder", "roast", "brew"],
}


def make_dataset(n_users: int = 80, n_items: int = 60, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Users prefer one topic; their sequences walk through that topic's items (with a little noise)."""
    rng = np.random.default_rng(seed)
    topics = list(TOPICS)
    item_topic = [topics[i % len(topics)] for i in range(n_items)]
    items = pd.DataFrame({
        "item_id": [f"i{i:03d}" for i in range(n_items)],
        "title": [f"{t.title()} item {i}" for i, t in enumerate(item_topic)],
        "description": [" ".join(rng.choice(TOPICS[t], 3)) for t in item_topic],
        "brand": [f"brand{i % 5}" for i in range(n_items)],
        "categories": [f"Shop, {t}" for t in item_topic],
    })
    items["text"] = items["title"] + ". " + items["description"]
    user_topic = [topics[u % len(topics)] for u in range(n_users)]
    users = pd.DataFrame({"user_id": [f"u{u:03d}" for u in range(n_users)], "profile": [f"Likes {t}." for t in user_topic]})
    train, valid, test = [], [], []
    for u, t in enumerate(user_topic):
        own = [i for i in range(n_items) if item_topic[i] == t]
        n = int(rng.integers(3, 10))
        seq = [f"i{(i if rng.random() > 0.1 else int(rng.integers(n_items))):03d}" for i in rng.choice(own, n, replace=False)]
        uid = f"u{u:03d}"
        for p in range(1, n - 2):
            train.append({"user_id": uid, "history": seq[max(0, p - 5):p], "target": seq[p], "position": p})
        valid.append({"user_id": uid, "history": seq[max(0, n - 7):n - 2], "target": seq[n - 2], "position": n - 2})
        test.append({"user_id": uid, "history": seq[max(0, n - 6):n - 1], "target": seq[n - 1], "position": n - 1})
    return {"items": items, "users": users, "train_sequences": pd.DataFrame(train), "valid": pd.DataFrame(valid),
            "test": pd.DataFrame(test)}


def tiny_params(**switches: bool) -> dict:
    params = yaml.safe_load((REPO / "conf/base/parameters_tokenization.yml").read_text())["tokenization"]
    params = copy.deepcopy(params)
    params["collaborative_encoder"].update(hidden_dim=16, epochs=3, batch_size=32, eval_every=0)
    params["sc_encoder"].update(hidden_dim=32, sc_dim=16, n_random_negatives=8)
    params["rq_vae"].update(latent_dim=8, hidden_dim=16, min_items_per_code=4, kmeans_iters=10, dead_code_window=5)
    params["phase1"].update(epochs=2, batch_size=64)
    params["phase2"].update(epochs=3, batch_size=64, rq_batch_size=32)
    params["auc"]["n_negatives"] = 5
    params["semantic_encoder"]["batch_size"] = 32
    params["ablation"].update(switches)
    return params


@pytest.fixture(scope="session")
def dataset() -> dict[str, pd.DataFrame]:
    return make_dataset()


@pytest.fixture(scope="session")
def features(dataset) -> dict[str, pd.DataFrame]:
    """Semantic (real MiniLM) and CF (tiny SASRec) tables, computed once."""
    params = tiny_params()
    item_sem, user_sem = nodes.embed_semantics(dataset["items"], dataset["users"], params)
    model, log = nodes.train_collaborative_encoder(dataset["items"], dataset["train_sequences"], dataset["valid"], params, SEED)
    item_cf, user_cf = nodes.extract_cf_embeddings(model, dataset["items"], dataset["users"], dataset["train_sequences"], dataset["valid"], log)
    return {"item_semantic_embeddings": item_sem, "user_semantic_embeddings": user_sem,
            "item_cf_embeddings": item_cf, "user_cf_embeddings": user_cf, "sasrec_log": log}


def tokenize(dataset, features, params, seed: int = SEED):
    """train_sc_tokenizer + assign_scids on the cached features."""
    emb = [features[k] for k in ("item_semantic_embeddings", "user_semantic_embeddings", "item_cf_embeddings", "user_cf_embeddings")]
    tok, log = nodes.train_sc_tokenizer(*emb, dataset["train_sequences"], dataset["valid"], params, seed)
    item_scids, user_scids, item_sc, user_sc, report = nodes.assign_scids(tok, *emb, params)
    return {"tok": tok, "log": log, "item_scids": item_scids, "user_scids": user_scids, "item_sc": item_sc,
            "user_sc": user_sc, "report": report}


@pytest.fixture(scope="session")
def default_run(dataset, features):
    return tokenize(dataset, features, tiny_params())


@pytest.fixture(autouse=True)
def _seeded_single_thread():
    """Tiny models: one intra-op thread is faster, and much faster while other suites share the cores."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
