"""sft_data: prompts, SCID tokens, leakage, switches, determinism and the pipeline through a DataCatalog."""
from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner

from align3gr_pipelines.pipelines.sft_data import create_pipeline
from align3gr_pipelines.pipelines.sft_data.nodes import build_seq_eval_prompts, build_sft_examples
from align3gr_pipelines.sft import tasks as sft_tasks
from align3gr_pipelines.sft.prompts import NO_USER, TEMPLATES
from align3gr_pipelines.tokenizer.scid import split_tokens

from .toy_data import make_tables

ROOT = Path(__file__).resolve().parents[3]
INPUTS = ["items", "users", "interactions", "train_sequences", "valid", "test", "feedback", "item_scids", "user_scids"]


def base_params() -> dict:
    params = yaml.safe_load((ROOT / "conf/base/parameters_sft_data.yml").read_text())["sft_data"]
    params["max_train_examples"] = None  # every example of every task
    params["targets_per_user"] = None
    params["target_stride"] = 1
    return params


def build(tables: dict, params: dict, seed: int = 7) -> tuple[pd.DataFrame, dict]:
    return build_sft_examples(*(tables[k] for k in INPUTS), params, seed)


@pytest.fixture(scope="module")
def tables() -> dict:
    return make_tables(n_users=25, n_items=40, seed=3)


@pytest.fixture(scope="module")
def built(tables) -> tuple[pd.DataFrame, dict]:
    return build(tables, base_params())


def test_every_task_has_examples_and_several_phrasings(built):
    examples, stats = built
    train = examples[examples["split"] == "train"]
    assert set(train["task"]) == set(TEMPLATES)
    for task, group in train.groupby("task"):
        assert group["template_id"].nunique() > 1, task
        assert group["template_id"].between(0, len(TEMPLATES[task]) - 1).all()
    assert stats["info"]["leakage"] == {"target_is_heldout": 0, "heldout_scid_in_text": 0}
    assert list(examples.columns) == sft_tasks.EXAMPLE_COLUMNS


def test_prompts_carry_exactly_the_right_scid_tokens(tables, built):
    examples, _ = built
    params = base_params()
    items = dict(zip(tables["item_scids"]["id"], tables["item_scids"]["tokens"]))
    users = dict(zip(tables["user_scids"]["id"], tables["user_scids"]["tokens"]))
    history_of = {(r.user_id, r.target): list(r.history) for r in tables["train_sequences"].itertuples()}
    by_title = {_title(tables, i): i for i in items}  # toy titles are unique
    checked = 0
    for ex in examples[examples["split"] == "train"].itertuples():
        found = split_tokens(ex.prompt)
        user = split_tokens(users[ex.user_id]) if pd.notna(ex.user_id) else []
        if ex.task in ("seq", "seq2text"):
            target = ex.target_item_id if ex.task == "seq" else by_title[ex.response]
            hist = history_of[(ex.user_id, target)][-params["max_history"]:]
            expected_items = [tok for i in hist for tok in split_tokens(items[i])]
            assert sorted(found) == sorted(user + expected_items), ex.prompt
            assert [t for t in found if t.startswith("<i")] == expected_items  # order kept, oldest first
            checked += 1
        elif ex.task in ("titles2scid", "intent_search"):
            assert found == user
            assert ex.response == items[ex.target_item_id]
        elif ex.task in ("item_text2scid",):
            assert found == [] and ex.response == items[ex.target_item_id]
        elif ex.task == "item_scid2text":
            assert len(found) == 3 and all(t.startswith("<i") for t in found)
        elif ex.task == "user_text2scid":
            assert found == [] and ex.response == users[ex.user_id]
        elif ex.task == "user_scid2text":
            assert found == user
        elif ex.task == "preference":
            assert found[:3] == user and all(t.startswith("<i") for t in found[3:])
    assert checked > 0
    # SCID responses are nothing but the SCID; valid SEQ examples use the evaluation phrasing
    valid = examples[examples["split"] == "valid"]
    assert (valid["template_id"] == params["eval_template_id"]).all()
    assert valid["response"].map(lambda r: "".join(split_tokens(r)) == r).all()


def _title(tables: dict, item_id: str) -> str:
    title = tables["items"].set_index("item_id").loc[item_id, "title"]
    return " ".join(str(title).split()[: base_params()["title_max_words"]])


def test_no_valid_or_test_target_in_any_training_example(tables, built):
    examples, _ = built
    items = dict(zip(tables["item_scids"]["id"], tables["item_scids"]["tokens"]))
    heldout = {}
    for split in ("valid", "test"):
        for u, t in zip(tables[split]["user_id"], tables[split]["target"]):
            heldout.setdefault(u, set()).add(t)
    titles = {i: _title(tables, i) for i in items}
    train = examples[(examples["split"] == "train") & examples["user_id"].notna()]
    assert len(train) > 0
    for ex in train.itertuples():
        for item in heldout[ex.user_id]:
            assert ex.target_item_id != item
            assert items[item] not in ex.prompt and items[item] != ex.response
            assert ex.response != titles[item]  # seq2text answers with a title
    assert sft_tasks.leakage_report(examples, tables["valid"], tables["test"], tables["item_scids"]) == {
        "target_is_heldout": 0, "heldout_scid_in_text": 0}


def test_derived_texts_use_only_the_training_period(tables):
    """Give one user's valid/test items a category, brand and review found nowhere else: no query or
    preference text of that user may mention them."""
    t = copy.deepcopy(tables)
    user = t["valid"]["user_id"].iloc[0]
    secret = {t["valid"]["target"].iloc[0], t["test"]["target"].iloc[0]}
    items = t["items"].copy()
    mask = items["item_id"].isin(secret)
    items.loc[mask, "categories"] = "Musical Instruments, Theremins"
    items.loc[mask, "brand"] = "Moogish"
    t["items"] = items
    inter = t["interactions"].copy()
    inter.loc[inter["user_id"].eq(user) & inter["item_id"].isin(secret), "review"] = "Zyzzyva marvellous"
    t["interactions"] = inter
    fb = t["feedback"].copy()
    fb.loc[fb["user_id"].eq(user) & fb["item_id"].isin(secret), "level"] = "liked"
    t["feedback"] = fb
    examples, _ = build(t, base_params())
    mine = examples[(examples["user_id"] == user) & (examples["split"] == "train")]
    assert {"intent_search", "preference"} <= set(mine["task"])
    for text in pd.concat([mine["prompt"], mine["response"]]):
        for word in ("Theremin", "Moogish", "zyzzyva"):
            assert word.lower() not in text.lower(), text


def test_user_scid_injection_switch_and_item_only_ablation(tables):
    params = base_params()
    params["inject_user_scid"] = False
    examples, _ = build(tables, params)
    train = examples[examples["split"] == "train"]
    for ex in train.itertuples():
        if ex.task != "user_scid2text":  # its input *is* the user SCID
            assert "<u" not in ex.prompt, ex.prompt
    assert train[train["task"] == "seq"]["prompt"].str.contains(NO_USER).all()

    no_users = dict(tables, user_scids=tables["user_scids"].iloc[0:0])
    examples, stats = build(no_users, base_params())
    assert not examples["task"].isin(["user_text2scid", "user_scid2text"]).any()
    assert not examples["prompt"].str.contains("<u").any()
    assert stats["info"]["pool_sizes"]["user_text2scid"] == 0


def test_deterministic_and_switching_a_task_leaves_the_others_alone(tables, built):
    examples, _ = built
    again, _ = build(tables, base_params())
    pd.testing.assert_frame_equal(examples, again)
    other_seed, _ = build(tables, base_params(), seed=8)
    assert not examples["template_id"].equals(other_seed["template_id"])

    params = base_params()
    params["tasks"]["titles2scid"]["enabled"] = False
    fewer, _ = build(tables, params)
    assert "titles2scid" not in set(fewer["task"])
    keep = examples[examples["task"] != "titles2scid"].reset_index(drop=True)
    pd.testing.assert_frame_equal(keep, fewer.reset_index(drop=True))


def test_shares_split_the_training_budget(tables):
    params = base_params()
    params["max_train_examples"] = 200
    params["tasks"] = {t: {"enabled": True, "share": 0.0} for t in TEMPLATES}
    params["tasks"]["seq"]["share"] = 3.0
    params["tasks"]["item_text2scid"]["share"] = 1.0
    examples, stats = build(tables, params)
    counts = examples[examples["split"] == "train"]["task"].value_counts().to_dict()
    pools = stats["info"]["pool_sizes"]
    assert counts == {"seq": min(150, pools["seq"]), "item_text2scid": min(50, pools["item_text2scid"])}


def test_seq_eval_prompts_are_the_training_prompts(tables, built):
    examples, _ = built
    params = base_params()
    ev = build_seq_eval_prompts(tables["valid"], tables["test"], tables["item_scids"], tables["user_scids"], params)
    assert list(ev.columns) == sft_tasks.EVAL_COLUMNS
    assert ev.groupby("split").size().to_dict() == {"test": len(tables["test"]), "valid": len(tables["valid"])}
    items = dict(zip(tables["item_scids"]["id"], tables["item_scids"]["tokens"]))
    users = dict(zip(tables["user_scids"]["id"], tables["user_scids"]["tokens"]))
    test_rows = tables["test"].set_index("user_id")
    for row in ev[ev["split"] == "test"].itertuples():
        hist = [items[i] for i in test_rows.loc[row.user_id, "history"]][-params["max_history"]:]
        assert params["eval_template_id"] == 0  # the phrasing written out here
        assert row.prompt == (f"User {users[row.user_id]} has interacted with items {', '.join(hist)} in order. "
                              "Predict the next item the user will interact with:")
        assert row.target_tokens == items[row.target]
    valid_ex = examples[examples["split"] == "valid"].set_index("user_id")
    for row in ev[ev["split"] == "valid"].itertuples():
        assert valid_ex.loc[row.user_id, "prompt"] == row.prompt
        assert valid_ex.loc[row.user_id, "response"] == row.target_tokens


def test_bad_inputs_fail_with_clear_errors(tables):
    broken = dict(tables, items=tables["items"].drop(columns=["brand"]))
    with pytest.raises(ValueError, match=r"'items' lacks column.*brand"):
        build(broken, base_params())
    missing = dict(tables, item_scids=tables["item_scids"].iloc[1:])
    with pytest.raises(ValueError, match=r"no SCID in 'item_scids'"):
        build(missing, base_params())
    params = base_params()
    params["tasks"] = {"nonsense": {"enabled": True}}
    with pytest.raises(ValueError, match="unknown task"):
        build(tables, params)


def test_pipeline_through_a_data_catalog(tables):
    params = base_params()
    params["max_train_examples"] = 120
    datasets = {name: MemoryDataset(tables[name]) for name in INPUTS}
    datasets["params:sft_data"] = MemoryDataset(params)
    datasets["params:seed"] = MemoryDataset(42)
    for out in ("sft_examples", "seq_eval_prompts", "sft_data_stats"):
        datasets[out] = MemoryDataset()
    catalog = DataCatalog(datasets=datasets)
    SequentialRunner().run(create_pipeline(), catalog)
    examples = catalog.load("sft_examples")
    assert (examples["split"] == "train").sum() <= 120
    assert set(examples["split"]) == {"train", "valid"}
    assert len(catalog.load("seq_eval_prompts")) == len(tables["valid"]) + len(tables["test"])
    assert catalog.load("sft_data_stats")["info"]["leakage"]["target_is_heldout"] == 0


def test_target_stride_tiles_each_users_sequence_from_the_end():
    rows = pd.DataFrame({"user_id": ["a"] * 7 + ["b"] * 3, "position": list(range(1, 8)) + [1, 2, 3],
                         "history": [[]] * 10, "target": [f"t{k}" for k in range(10)]})
    picked = sft_tasks.select_targets(rows, stride=3, per_user=None)
    assert picked.groupby("user_id")["position"].apply(list).to_dict() == {"a": [1, 4, 7], "b": [3]}
    capped = sft_tasks.select_targets(rows, stride=3, per_user=2)
    assert capped.groupby("user_id")["position"].apply(list).to_dict() == {"a": [4, 7], "b": [3]}
    assert len(sft_tasks.select_targets(rows, stride=1, per_user=None)) == 10
    with pytest.raises(ValueError, match="target_stride"):
        sft_tasks.select_targets(rows, stride=0, per_user=None)
