"""sft_data recipe switches: B1's category on flat genre lists, C1's frequency-tempered item sampling, and
the LM's prompt history in the ml_latest_small env (as long as the baselines')."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from align3gr_pipelines.pipelines.sft_data.nodes import build_seq_eval_prompts, build_sft_examples
from align3gr_pipelines.sft import tasks as sft_tasks
from align3gr_pipelines.tokenizer.scid import split_tokens

from .toy_data import make_tables

ROOT = Path(__file__).resolve().parents[3]
INPUTS = ["items", "users", "interactions", "train_sequences", "valid", "test", "feedback", "item_scids", "user_scids"]


def params(**changes) -> dict:
    p = yaml.safe_load((ROOT / "conf/base/parameters_sft_data.yml").read_text())["sft_data"]
    p.update({"max_train_examples": None, "targets_per_user": None, "target_stride": 1, **changes})
    return p


@pytest.fixture(scope="module")
def tables() -> dict:
    return make_tables(n_users=25, n_items=40, seed=3)


def genre_tables(tables: dict) -> tuple[dict, str, str]:
    """MovieLens-like flat genre lists: every item is 'Drama, Western' or 'Comedy, Drama' or 'Western'.
    One user liked only 'Comedy, Drama' items in training; the item asked about is 'Drama, Western'."""
    t = copy.deepcopy(tables)
    user = t["valid"]["user_id"].iloc[0]
    fb = t["feedback"]
    hist = fb[fb["user_id"].eq(user) & fb["split"].eq("train")]["item_id"].tolist()  # the training period
    query_item = hist[-1]
    items = t["items"].copy()
    items["categories"] = "Western"
    items.loc[items["item_id"].isin(hist[:-1]), "categories"] = "Comedy, Drama"
    items.loc[items["item_id"] == query_item, "categories"] = "Drama, Western"
    t["items"] = items
    fb = t["feedback"].copy()
    mine = fb["user_id"].eq(user) & fb["split"].eq("train")
    fb.loc[mine, "level"] = "liked"
    t["feedback"] = fb
    return t, user, query_item


def test_b1_names_the_users_dominant_genre_on_flat_lists(tables):
    t, user, item = genre_tables(tables)
    args = [t[k] for k in INPUTS]
    leaf = sft_tasks.build_context(*args, params(b1_category="leaf"))
    dominant = sft_tasks.build_context(*args, params(b1_category="user_dominant"))
    # the leaf is just the alphabetically last genre; the user's taste picks the genre they watch
    assert sft_tasks.intention_query(leaf, user, item).startswith("something in western")
    assert sft_tasks.intention_query(dominant, user, item).startswith("something in drama")
    # preferences count every genre of the liked items, not only the last one
    assert sft_tasks.preference_text(leaf, user).startswith("Enjoys Drama and Western")
    assert sft_tasks.preference_text(dominant, user).startswith("Enjoys Drama and Comedy")
    # Amazon-style paths keep the leaf (the default): the toy's "Musical Instruments, <leaf>"
    amazon = sft_tasks.build_context(*(tables[k] for k in INPUTS), params())
    some = tables["train_sequences"].iloc[0]
    leaf_name = tables["items"].set_index("item_id").loc[some["target"], "categories"].split(", ")[-1]
    assert sft_tasks.intention_query(amazon, some["user_id"], some["target"]).startswith(f"something in {leaf_name.lower()}")
    with pytest.raises(ValueError, match="b1_category"):
        sft_tasks.build_context(*args, params(b1_category="genre"))


def test_c1_samples_items_by_tempered_training_frequency(tables):
    """With a C1 quota below the catalogue, frequency sampling favours the items users met in training;
    uniform (the paper's) does not."""
    counts = sft_tasks.build_context(*(tables[k] for k in INPUTS), params()).item_counts
    only_c1 = {t: {"enabled": t == "item_text2scid", "share": 1.0} for t in sft_tasks.TASKS}

    def mean_count(weighting: str, temperature: float) -> float:
        means = []
        for seed in range(5):
            p = params(max_train_examples=8, tasks=only_c1, c1_item_sampling={"weighting": weighting, "temperature": temperature})
            df, _ = build_sft_examples(*(tables[k] for k in INPUTS), p, seed)
            items = df[df["split"] == "train"]["target_item_id"]
            means.append(np.mean([counts.get(i, 0) for i in items]))
        return float(np.mean(means))

    catalogue_mean = float(np.mean([counts.get(i, 0) for i in tables["items"]["item_id"]]))
    assert mean_count("frequency", 1.0) > mean_count("uniform", 0.0) + 0.5
    assert mean_count("frequency", 1.0) > catalogue_mean + 0.5
    with pytest.raises(ValueError, match="c1_item_sampling.weighting"):
        p = params(max_train_examples=8, tasks=only_c1, c1_item_sampling={"weighting": "zipf"})
        build_sft_examples(*(tables[k] for k in INPUTS), p, 0)


def merged(env: str, stage: str) -> dict:
    base = yaml.safe_load((ROOT / f"conf/base/parameters_{stage}.yml").read_text())[stage]
    path = ROOT / f"conf/{env}/parameters_{stage}.yml"
    if path.is_file():
        base.update(yaml.safe_load(path.read_text()).get(stage) or {})
    return base


def test_ml_latest_small_lm_sees_as_much_history_as_the_baselines():
    """Fairness: the LM's SEQ prompt shows the same 20 items the baselines score from (raised for the LM,
    never lowered for the baselines)."""
    lm = merged("ml_latest_small", "sft_data")["max_history"]
    baselines = merged("ml_latest_small", "evaluation")["max_history"]
    splits = merged("ml_latest_small", "data_prep")["max_history"]
    assert baselines == splits == 20
    assert lm == baselines


def test_seq_eval_prompts_show_max_history_items():
    t = make_tables(n_users=6, n_items=60, min_len=28, max_len=30, seed=5)
    prompts = build_seq_eval_prompts(t["valid"], t["test"], t["item_scids"], t["user_scids"], params(max_history=20))
    n_items = [sum(1 for tok in split_tokens(p) if tok.startswith("<i0_")) for p in prompts["prompt"]]
    assert n_items == [min(20, len(h)) for h in pd.concat([t["valid"], t["test"]])["history"]]
    assert max(n_items) == 20
