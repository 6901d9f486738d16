"""Nodes of the `tokenization` stage: thin orchestration over modules in align3gr_pipelines.

semantic embeddings ─┐
SASRec (CF) ─► CF embeddings ─┴► SC tokenizer (phase 1 U2I, phase 2 + RQ-VAEs) ─► SCIDs ─► quality report

Two switches serve data without item text (LC-Rec's Instruments release): ``semantic_encoder.item_features:
lcrec_codes`` makes the semantic features come from LC-Rec's released item codes instead of a sentence
encoder (users: the mean over their training-period items), and ``item_scids_from: lcrec_index`` makes the
item SCIDs LC-Rec's codes themselves (the paper's TIGER / LC-Rec baselines); both read
``semantic_encoder.lcrec_index``.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from align3gr_pipelines.cf.sasrec import SASRec, cf_item_table, fit_sasrec, recall_ndcg, training_sequences  # noqa: E402
from align3gr_pipelines.devices import resolve_device  # noqa: E402
from align3gr_pipelines.tokenizer.lcrec_codes import (  # noqa: E402
    code_feature_matrices,
    feature_info,
    index_item_codes,
    item_features_mode,
    item_scids_source,
)
from align3gr_pipelines.tokenizer.quality_report import quality_table, usage_figure  # noqa: E402
from align3gr_pipelines.tokenizer.rq_vae import effective_codebook_size, usage_stats  # noqa: E402
from align3gr_pipelines.tokenizer.sc_tokenizer import SCTokenizer, U2IData, fit_sc_tokenizer, sample_eval_negatives  # noqa: E402
from align3gr_pipelines.tokenizer.scid import codes_to_tokens  # noqa: E402
from align3gr_pipelines.tokenizer.scid_collisions import collision_stats, resolve_collisions  # noqa: E402
from align3gr_pipelines.tokenizer.semantic_encoder import clean_texts, encode_texts, load_encoder, resolve_model_path  # noqa: E402

logger = logging.getLogger(__name__)


# --- helpers -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Our models are small: one intra-op thread is faster than two, and far faster on a busy machine."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _require(df: pd.DataFrame, columns: list[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"tokenization: dataset '{name}' lacks column(s) {missing}; expected at least {columns}")


def _param(params: dict[str, Any], path: str) -> Any:
    node: Any = params
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"parameters_tokenization.yml: missing 'tokenization.{path}'")
        node = node[key]
    return node


def _embedding_frame(ids: list[str], matrix: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"id": [str(i) for i in ids], "embedding": list(np.asarray(matrix, dtype=np.float32))})


def _embedding_matrix(df: pd.DataFrame, ids: list[str], name: str) -> np.ndarray:
    """Rows of an (id, embedding) table in the order of ``ids``; every id must be present."""
    _require(df, ["id", "embedding"], name)
    index = {str(i): r for r, i in enumerate(df["id"])}
    missing = [i for i in ids if i not in index]
    if missing:
        raise ValueError(f"tokenization: '{name}' has no embedding for {len(missing)} id(s), e.g. {missing[:3]}; rerun the stage")
    return np.stack([np.asarray(df["embedding"].iloc[index[i]], dtype=np.float32) for i in ids]) if ids else np.zeros((0, 0), np.float32)


def _user_histories(train_sequences: pd.DataFrame, valid: pd.DataFrame) -> dict[str, list[str]]:
    """Each user's training-period items, oldest first.

    From train_sequences when the user has rows there; otherwise (a user with 3 interactions has none) from
    their valid row's history, which holds only training-period items — the valid target is never read.
    """
    histories = training_sequences(train_sequences)
    _require(valid, ["user_id", "history"], "valid")
    for user, history in zip(valid["user_id"], valid["history"]):
        histories.setdefault(str(user), [str(i) for i in history])
    return histories


def _ids(df: pd.DataFrame, column: str, name: str) -> list[str]:
    _require(df, [column], name)
    ids = [str(i) for i in df[column]]
    if len(set(ids)) != len(ids):
        raise ValueError(f"tokenization: '{name}.{column}' has duplicate ids")
    return ids


def _code_features(
    items: pd.DataFrame, users: pd.DataFrame, train_sequences: pd.DataFrame | None, valid: pd.DataFrame | None,
    params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """item_features: lcrec_codes (`tokenizer.lcrec_codes`); user histories from the training period only."""
    if train_sequences is None or valid is None:
        raise ValueError("tokenization: semantic_encoder.item_features=lcrec_codes builds user features from their "
                         "training-period items and needs the 'train_sequences' and 'valid' datasets")
    item_ids, user_ids = _ids(items, "item_id", "items"), _ids(users, "user_id", "users")
    item_emb, user_emb = code_feature_matrices(_param(params, "semantic_encoder"), item_ids, user_ids,
                                               _user_histories(train_sequences, valid))
    return _embedding_frame(item_ids, item_emb), _embedding_frame(user_ids, user_emb)


# --- nodes ---------------------------------------------------------------------------------------------------
def embed_semantics(
    items: pd.DataFrame, users: pd.DataFrame, params: dict[str, Any],
    train_sequences: pd.DataFrame | None = None, valid: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Frozen sentence encoder over items.text and users.profile (item_features: text, the default), or
    features from LC-Rec's item codes (item_features: lcrec_codes, for data without item text)."""
    _require(items, ["item_id", "text"], "items")
    _require(users, ["user_id", "profile"], "users")
    if item_features_mode(_param(params, "semantic_encoder")) == "lcrec_codes":
        return _code_features(items, users, train_sequences, valid, params)
    p = _param(params, "semantic_encoder")
    model = load_encoder(p["model"], str(resolve_device(p.get("device", params.get("device", "cpu")))))
    logger.info("semantic encoder: %s (%s)", p["model"], resolve_model_path(p["model"]))
    kwargs = dict(batch_size=int(p["batch_size"]), normalize=bool(p["normalize"]), model=model)
    with _torch_threads(params.get("num_threads")):
        item_emb = encode_texts(clean_texts(items["text"].tolist(), "item texts"), **kwargs)
        user_emb = encode_texts(clean_texts(users["profile"].tolist(), "user profiles"), **kwargs)
    return _embedding_frame(_ids(items, "item_id", "items"), item_emb), _embedding_frame(_ids(users, "user_id", "users"), user_emb)


def train_collaborative_encoder(
    items: pd.DataFrame, train_sequences: pd.DataFrame, valid: pd.DataFrame, params: dict[str, Any], seed: int
) -> tuple[SASRec, dict[str, Any]]:
    """SASRec on training sequences only; valid Recall/NDCG@10 is logged for the record, not for selection."""
    p = _param(params, "collaborative_encoder")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = SASRec(
        _ids(items, "item_id", "items"),
        hidden_dim=int(p["hidden_dim"]),
        n_layers=int(p["n_layers"]),
        n_heads=int(p["n_heads"]),
        max_len=int(p["max_len"]),
        dropout=float(p["dropout"]),
    )
    sequences = training_sequences(train_sequences)
    _require(valid, ["user_id", "history", "target"], "valid")
    valid_histories = [[str(i) for i in h] for h in valid["history"]]
    valid_targets = [str(t) for t in valid["target"]]

    def evaluate(m: SASRec) -> dict[str, float]:
        return recall_ndcg(m, valid_histories, valid_targets, k=10)

    with _torch_threads(params.get("num_threads")):
        log = fit_sasrec(
            model,
            list(sequences.values()),
            epochs=int(p["epochs"]),
            batch_size=int(p["batch_size"]),
            lr=float(p["lr"]),
            weight_decay=float(p.get("weight_decay", 0.0)),
            seed=seed,
            eval_every=int(p.get("eval_every", 0)),
            evaluate=evaluate,
            device=resolve_device(params.get("device", "cpu")),
        )
    model.cpu()
    log["scalars"]["sasrec_seconds"] = time.perf_counter() - started
    log["trained_items"] = sorted({i for s in sequences.values() for i in s})
    return model, log


def extract_cf_embeddings(
    sasrec_model: SASRec | None,
    items: pd.DataFrame,
    users: pd.DataFrame,
    train_sequences: pd.DataFrame,
    valid: pd.DataFrame,
    sasrec_log: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Item CF = SASRec's item table (zeros for items never seen in training); user CF = its hidden state after
    the user's last training item (zeros for a user without training items)."""
    if sasrec_model is None:
        raise ValueError("tokenization: 'sasrec_model' checkpoint is missing; run the train_collaborative_encoder node first")
    item_ids = _ids(items, "item_id", "items")
    if sasrec_model.item_ids != item_ids:
        raise ValueError("tokenization: sasrec_model was trained on another item catalogue than 'items'; rerun tokenization")
    item_cf = cf_item_table(sasrec_model, set(sasrec_log["trained_items"]))
    user_ids = _ids(users, "user_id", "users")
    histories = _user_histories(train_sequences, valid)
    # One batched forward per 512 users of a small model: the CPU does it in well under a second, so this node
    # keeps the checkpoint where it was loaded (and its DAG inputs unchanged).
    with _torch_threads(1):
        user_cf = sasrec_model.encode([histories.get(u, []) for u in user_ids]).numpy()
    return _embedding_frame(item_ids, item_cf), _embedding_frame(user_ids, user_cf)


def train_sc_tokenizer(
    item_semantic_embeddings: pd.DataFrame,
    user_semantic_embeddings: pd.DataFrame,
    item_cf_embeddings: pd.DataFrame,
    user_cf_embeddings: pd.DataFrame,
    train_sequences: pd.DataFrame,
    valid: pd.DataFrame,
    params: dict[str, Any],
    seed: int,
) -> tuple[SCTokenizer, dict[str, Any]]:
    """Phase 1 (U2I alignment) and phase 2 (joint RQ-VAEs) per the ablation switches."""
    started = time.perf_counter()
    ablation, sc, rq = _param(params, "ablation"), _param(params, "sc_encoder"), _param(params, "rq_vae")
    item_ids = _ids(item_semantic_embeddings, "id", "item_semantic_embeddings")
    user_ids = _ids(user_semantic_embeddings, "id", "user_semantic_embeddings")
    _require(valid, ["user_id", "history", "target"], "valid")
    item_sem = _embedding_matrix(item_semantic_embeddings, item_ids, "item_semantic_embeddings")
    user_sem = _embedding_matrix(user_semantic_embeddings, user_ids, "user_semantic_embeddings")
    item_cf = _embedding_matrix(item_cf_embeddings, item_ids, "item_cf_embeddings")
    user_cf = _embedding_matrix(user_cf_embeddings, user_ids, "user_cf_embeddings")
    use_cf = bool(ablation["cf_features"])
    config = {
        "semantic_dim": int(item_sem.shape[1]),
        "cf_dim": int(item_cf.shape[1]),
        "use_cf": use_cf,
        "u2i_alignment": bool(ablation["u2i_alignment"]),
        "user_scids": bool(ablation["user_scids"]),
        "sc_hidden_dim": int(sc["hidden_dim"]),
        "sc_dim": int(sc["sc_dim"]),
        "dropout": float(sc["dropout"]),
        "temperature": float(sc["temperature"]),
        "latent_dim": int(rq["latent_dim"]),
        "rq_hidden_dim": int(rq["hidden_dim"]),
        "levels": int(rq["levels"]),
        "beta": float(rq["beta"]),
        "item_codebook_size": effective_codebook_size(len(item_ids), int(rq["codebook_size"]), rq.get("min_items_per_code")),
        "user_codebook_size": effective_codebook_size(len(user_ids), int(rq["codebook_size"]), rq.get("min_items_per_code")),
        "semantic_model": (str(_param(params, "semantic_encoder.model")) if item_features_mode(_param(params, "semantic_encoder")) == "text"
                           else "lcrec_codes"),
    }
    torch.manual_seed(seed)
    tok = SCTokenizer(config)

    # U2I pairs: every (user, training-period item); held-out pairs: (user, valid target) + sampled negatives.
    item_pos = {i: r for r, i in enumerate(item_ids)}
    user_pos = {u: r for r, u in enumerate(user_ids)}
    histories = _user_histories(train_sequences, valid)
    pairs = sorted({(user_pos[u], item_pos[i]) for u, h in histories.items() if u in user_pos for i in h if i in item_pos})
    if not pairs:
        raise ValueError("tokenization: no (user, item) training pair whose ids are in 'users' and 'items'")
    eval_rows = [
        (user_pos[str(u)], item_pos[str(t)])
        for u, t in zip(valid["user_id"], valid["target"])
        if str(u) in user_pos and str(t) in item_pos
    ]
    rng = np.random.default_rng(seed)
    seen = {}
    for u, i in pairs:
        seen.setdefault(u, set()).add(i)
    eval_users = np.array([u for u, _ in eval_rows], dtype=np.int64)
    eval_pos = np.array([i for _, i in eval_rows], dtype=np.int64)
    n_neg = int(_param(params, "auc.n_negatives"))
    exclude = [seen.get(int(u), set()) for u in eval_users]  # a user's training items are not negatives
    eval_neg = sample_eval_negatives(eval_pos, len(item_ids), n_neg, rng, exclude) if len(eval_rows) else np.zeros((0, n_neg), np.int64)
    data = U2IData(
        item_x=tok.features(item_sem, item_cf),
        user_x=tok.features(user_sem, user_cf),
        pairs=torch.tensor(pairs, dtype=torch.long),
        eval_users=torch.from_numpy(eval_users),
        eval_pos=torch.from_numpy(eval_pos),
        eval_neg=torch.from_numpy(eval_neg),
    )
    with _torch_threads(params.get("num_threads")):
        log = fit_sc_tokenizer(
            tok,
            data,
            phase1=_param(params, "phase1"),
            phase2=_param(params, "phase2"),
            n_random_negatives=int(sc["n_random_negatives"]),
            kmeans_iters=int(rq["kmeans_iters"]),
            dead_code_window=int(rq["dead_code_window"]),
            log_every=int(params.get("log_every", 10)),
            seed=seed,
            device=resolve_device(params.get("device", "cpu")),
        )
    tok.cpu()
    log["scalars"]["sc_tokenizer_seconds"] = time.perf_counter() - started
    log["info"] = {"u2i_training_pairs": len(pairs), "auc_eval_pairs": len(eval_rows), "auc_negatives_per_pair": n_neg, **config}
    return tok, log


def assign_scids(
    sc_tokenizer: SCTokenizer,
    item_semantic_embeddings: pd.DataFrame,
    user_semantic_embeddings: pd.DataFrame,
    item_cf_embeddings: pd.DataFrame,
    user_cf_embeddings: pd.DataFrame,
    params: dict[str, Any],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """Codes for every item (made unique) and user (may collide), and the SC embeddings behind them. With
    item_scids_from: lcrec_index the item codes are LC-Rec's released ones (made unique the same way)."""
    from_index = item_scids_source(params) == "lcrec_index"
    tok = sc_tokenizer.to(resolve_device(params.get("device", "cpu")))
    device = next(tok.parameters()).device
    tables, report = {}, {}
    sides = {"item": (item_semantic_embeddings, item_cf_embeddings), "user": (user_semantic_embeddings, user_cf_embeddings)}
    sc_frames = {}
    for side, (sem_df, cf_df) in sides.items():
        ids = _ids(sem_df, "id", f"{side}_semantic_embeddings")
        x = tok.features(
            _embedding_matrix(sem_df, ids, f"{side}_semantic_embeddings"),
            _embedding_matrix(cf_df, ids, f"{side}_cf_embeddings") if tok.config["use_cf"] else None,
        ).to(device)
        sc_frames[side] = _embedding_frame(ids, tok.sc_embeddings(side, x).cpu().numpy())
        if tok.rq(side) is None:
            tables[side] = pd.DataFrame({"id": pd.Series([], dtype=object), "codes": pd.Series([], dtype=object), "tokens": pd.Series([], dtype=object)})
            continue
        if side == "item" and from_index:
            # LC-Rec's released codes are the item SCIDs (the paper's TIGER / LC-Rec baselines); the item RQ-VAE
            # is trained all the same (its reconstruction loss is not the SCIDs', so it is not reported).
            final, entry = index_item_codes(_param(params, "semantic_encoder").get("lcrec_index"), ids)
            report[side] = entry
            tables[side] = pd.DataFrame({
                "id": ids,
                "codes": [[int(c) for c in row] for row in final],
                "tokens": [codes_to_tokens(row, side) for row in final],
            })
            continue
        codes, residuals = tok.codes(side, x)
        raw = codes.cpu().numpy()
        size = tok.config[f"{side}_codebook_size"]
        entry: dict[str, Any] = {
            "codebook_size": size,
            "usage": usage_stats(raw, size),
            "before": collision_stats(raw),
            "reconstruction_loss": tok.reconstruction_loss(side, x),
        }
        final = raw
        if side == "item":
            final, entry["resolution"] = resolve_collisions(
                raw, residuals.cpu().numpy(), tok.item_rq.quantizer.codebooks.detach().cpu().numpy(),
                max_tail=int(_param(params, "collisions.max_tail_levels")),
            )
            if entry["resolution"]["colliding_items_after"]:
                raise RuntimeError("tokenization: item SCIDs are still not unique after collision resolution")
            logger.info("item SCIDs: %s", entry["resolution"])
        entry["after"] = collision_stats(final)
        report[side] = entry
        tables[side] = pd.DataFrame({
            "id": ids,
            "codes": [[int(c) for c in row] for row in final],
            "tokens": [codes_to_tokens(row, side) for row in final],
        })
    tok.cpu()  # the loaded checkpoint object goes back as it came
    return tables["item"], tables["user"], sc_frames["item"], sc_frames["user"], report


def _semantic_model_path(params: dict[str, Any]) -> str | None:
    if item_features_mode(_param(params, "semantic_encoder")) != "text":
        return None
    return resolve_model_path(str(_param(params, "semantic_encoder.model")))


def report_quality(
    scid_report: dict[str, Any], sasrec_log: dict[str, Any], sc_log: dict[str, Any], params: dict[str, Any]
) -> tuple[pd.DataFrame, dict[str, Any], plt.Figure]:
    """Quality table (long: side, level, metric, value), metrics JSON and the codebook-usage figure."""
    quality, scalars = quality_table(scid_report, sc_log)
    metrics = {
        "scalars": {k: float(v) for k, v in {**sasrec_log["scalars"], **sc_log["scalars"], **scalars}.items()},
        "curves": {**sasrec_log["curves"], **sc_log["curves"]},
        "info": {
            **sc_log.get("info", {}),
            "ablation": dict(_param(params, "ablation")),
            "collision_resolution": scid_report.get("item", {}).get("resolution"),
            **feature_info(_param(params, "semantic_encoder"), params, _semantic_model_path(params)),
        },
    }
    return quality, metrics, usage_figure(scid_report)
