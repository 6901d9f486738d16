"""Items described by LC-Rec's released item codes (``{name}.index.json``), for data without item text:
as the semantic features (``tokenization.semantic_encoder.item_features: lcrec_codes``; the embedding itself
is `code_features`) and as the item SCIDs (``tokenization.item_scids_from: lcrec_index``, the paper's TIGER /
LC-Rec baselines, which used LC-Rec's codes as item IDs)."""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from align3gr_pipelines.data.lcrec_json import read_lcrec_index
from align3gr_pipelines.tokenizer.code_features import history_features, item_code_features
from align3gr_pipelines.tokenizer.rq_vae import usage_stats
from align3gr_pipelines.tokenizer.scid_collisions import collision_stats, resolve_fixed_collisions

log = logging.getLogger(__name__)

ITEM_FEATURES = ("text", "lcrec_codes")
ITEM_SCIDS_FROM = ("rq_vae", "lcrec_index")


def _choice(value: Any, allowed: tuple[str, ...], key: str) -> str:
    if value not in allowed:
        raise ValueError(f"parameters_tokenization.yml: tokenization.{key} must be one of {list(allowed)}, got {value!r}")
    return str(value)


def item_features_mode(semantic_params: dict[str, Any]) -> str:
    return _choice(semantic_params.get("item_features", "text"), ITEM_FEATURES, "semantic_encoder.item_features")


def item_scids_source(params: dict[str, Any]) -> str:
    return _choice(params.get("item_scids_from", "rq_vae"), ITEM_SCIDS_FROM, "item_scids_from")


def lcrec_codes(path: str | None, item_ids: list[str], why: str) -> np.ndarray:
    """LC-Rec's codes [n_items, L] for ``item_ids`` (in that order) from the index file at `path`
    (tokenization.semantic_encoder.lcrec_index)."""
    if not path:
        raise ValueError(f"tokenization: {why} needs tokenization.semantic_encoder.lcrec_index = the path of LC-Rec's "
                         f"{{name}}.index.json (e.g. ../shared/data/instruments-lcrec/Instruments.index.json), got {path!r}")
    index = read_lcrec_index(path)
    missing = [i for i in item_ids if i not in index]
    if missing:
        raise ValueError(f"tokenization: {path} (tokenization.semantic_encoder.lcrec_index) has no codes for "
                         f"{len(missing)} of the {len(item_ids)} item(s) of 'items', e.g. {missing[:3]}; expected every "
                         "item_id of the data to be a key of the index")
    return np.array([index[i] for i in item_ids], dtype=np.int64).reshape(len(item_ids), -1)


def code_feature_matrices(
    semantic_params: dict[str, Any], item_ids: list[str], user_ids: list[str], histories: dict[str, list[str]]
) -> tuple[np.ndarray, np.ndarray]:
    """Items: fixed embeddings of LC-Rec's codes; users: the mean over the items of their training-period
    `histories` (the caller never passes a valid target)."""
    cfg = dict(semantic_params.get("code_embedding") or {})
    codes = lcrec_codes(semantic_params.get("lcrec_index"), item_ids, "semantic_encoder.item_features=lcrec_codes")
    item_emb = item_code_features(codes, dim=int(cfg.get("dim", 128)), level_decay=float(cfg.get("level_decay", 0.5)),
                                  seed=int(cfg.get("seed", 0)))
    pos = {i: r for r, i in enumerate(item_ids)}
    rows = [[pos[i] for i in histories.get(u, []) if i in pos] for u in user_ids]
    user_emb = history_features(rows, item_emb)
    log.warning(
        "semantic features from LC-Rec's item codes, not text (tokenization.semantic_encoder.item_features=lcrec_codes, "
        "%s): %d items x %d code levels -> %d-dim fixed code embeddings (%d distinct code tuples); users: the mean "
        "over their training-period items (%d users, %d without any); the sentence encoder is not used",
        semantic_params.get("lcrec_index"), len(item_ids), codes.shape[1], item_emb.shape[1], len(np.unique(codes, axis=0)),
        len(user_ids), sum(1 for r in rows if not r),
    )
    return item_emb, user_emb


def index_item_codes(index_path: str | None, item_ids: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """Item SCID codes = LC-Rec's released codes, made unique (`resolve_fixed_collisions`), and the report entry
    (codebook usage, collisions before / after, the resolution) that RQ-VAE codes get too."""
    raw = lcrec_codes(index_path, item_ids, "item_scids_from=lcrec_index")
    size = int(raw.max()) + 1 if raw.size else 1
    entry = {"codebook_size": size, "usage": usage_stats(raw, size), "before": collision_stats(raw),
             "source": "lcrec_index", "lcrec_index": str(index_path)}
    final, entry["resolution"] = resolve_fixed_collisions(raw, size)
    if entry["resolution"]["colliding_items_after"]:
        raise RuntimeError("tokenization: item SCIDs from the LC-Rec index are still not unique after collision resolution")
    log.warning("item SCIDs = LC-Rec's item codes (tokenization.item_scids_from=lcrec_index, %s): %d levels x %d codes; %s",
                entry["lcrec_index"], raw.shape[1], size, entry["resolution"])
    entry["after"] = collision_stats(final)
    return final, entry


def feature_info(semantic_params: dict[str, Any], params: dict[str, Any], semantic_model_path: str | None) -> dict[str, Any]:
    """What the semantic features and the item SCIDs were made from, for the stage's metrics info."""
    if item_features_mode(semantic_params) == "text":
        info: dict[str, Any] = {"item_features": "text", "semantic_model_path": semantic_model_path}
    else:
        info = {
            "item_features": "lcrec_codes",
            "item_features_note": "no item text: item semantic features are fixed embeddings of LC-Rec's item codes "
                                  "(code_embedding), user ones the mean over their training-period items; no sentence encoder",
            "lcrec_index": str(semantic_params.get("lcrec_index")),
            "code_embedding": dict(semantic_params.get("code_embedding") or {}),
            "semantic_model_path": None,
        }
    info["item_scids_from"] = item_scids_source(params)
    if info["item_scids_from"] == "lcrec_index":
        info["lcrec_index"] = str(semantic_params.get("lcrec_index"))
    return info
