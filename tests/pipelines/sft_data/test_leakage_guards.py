"""The leakage guards catch planted leaks (not only return 0 on clean data), and the eval prompts match
hand-written strings."""
from __future__ import annotations

import pandas as pd
import pytest

from align3gr_pipelines.pipelines.sft_data import nodes
from align3gr_pipelines.pipelines.sft_data.nodes import build_seq_eval_prompts
from align3gr_pipelines.sft import tasks as sft_tasks

from .test_sft_data import INPUTS, base_params, build, make_tables


@pytest.fixture(scope="module")
def tables() -> dict:
    return make_tables(n_users=12, n_items=30, seed=5)


def _heldout(tables: dict, split: str) -> dict[str, str]:
    return dict(zip(tables[split]["user_id"], tables[split]["target"]))


def test_leakage_report_counts_each_planted_leak(tables):
    examples, _ = build(tables, base_params())
    tokens = dict(zip(tables["item_scids"]["id"], tables["item_scids"]["tokens"]))
    report = lambda df: sft_tasks.leakage_report(df, tables["valid"], tables["test"], tables["item_scids"])  # noqa: E731
    assert report(examples) == {"target_is_heldout": 0, "heldout_scid_in_text": 0}
    train = examples[(examples["split"] == "train") & examples["user_id"].notna()]
    a, b, c = train.index[:3]
    leaky = examples.copy()
    # 1. a training target that is the user's test item
    leaky.loc[a, "target_item_id"] = _heldout(tables, "test")[leaky.loc[a, "user_id"]]
    assert report(leaky) == {"target_is_heldout": 1, "heldout_scid_in_text": 0}
    # 2. the user's valid item's SCID inside a training prompt
    leaky.loc[b, "prompt"] += " " + tokens[_heldout(tables, "valid")[leaky.loc[b, "user_id"]]]
    assert report(leaky) == {"target_is_heldout": 1, "heldout_scid_in_text": 1}
    # 3. a training response that is the user's test item's SCID
    leaky.loc[c, "response"] = tokens[_heldout(tables, "test")[leaky.loc[c, "user_id"]]]
    assert report(leaky) == {"target_is_heldout": 1, "heldout_scid_in_text": 2}


def test_the_sft_data_node_refuses_examples_that_target_a_heldout_item(tables, monkeypatch):
    real = sft_tasks.build_sft_examples

    def planted(ctx, valid, seed):
        df, stats = real(ctx, valid, seed)
        row = df.index[(df["split"] == "train") & df["user_id"].notna() & df["target_item_id"].notna()][0]
        df.loc[row, "target_item_id"] = _heldout(tables, "valid")[df.loc[row, "user_id"]]
        return df, stats

    monkeypatch.setattr(nodes.sft_tasks, "build_sft_examples", planted)
    with pytest.raises(RuntimeError, match="sft_data: 1 training examples target a valid/test item"):
        nodes.build_sft_examples(*(tables[k] for k in INPUTS), base_params(), 7)


def test_seq_eval_prompts_by_hand():
    item_scids = pd.DataFrame({"id": ["a", "b", "c", "d"], "codes": [[0, 1], [1, 0], [1, 1], [2, 0]],
                               "tokens": ["<i0_0><i1_1>", "<i0_1><i1_0>", "<i0_1><i1_1>", "<i0_2><i1_0>"]})
    user_scids = pd.DataFrame({"id": ["u"], "codes": [[3, 2]], "tokens": ["<u0_3><u1_2>"]})
    valid = pd.DataFrame({"user_id": ["u"], "history": [["a", "b"]], "target": ["c"], "position": [2]})
    test = pd.DataFrame({"user_id": ["u"], "history": [["a", "b", "c"]], "target": ["d"], "position": [3]})
    params = {**base_params(), "eval_template_id": 0, "max_history": 2, "inject_user_scid": True}
    ev = build_seq_eval_prompts(valid, test, item_scids, user_scids, params).set_index("split")
    assert ev.loc["valid", "prompt"] == (
        "User <u0_3><u1_2> has interacted with items <i0_0><i1_1>, <i0_1><i1_0> in order. "
        "Predict the next item the user will interact with:")
    # max_history 2 keeps the last two items; the test target's SCID is the label, never in the prompt
    assert ev.loc["test", "prompt"] == (
        "User <u0_3><u1_2> has interacted with items <i0_1><i1_0>, <i0_1><i1_1> in order. "
        "Predict the next item the user will interact with:")
    assert ev.loc["test", "target_tokens"] == "<i0_2><i1_0>"
    no_user = build_seq_eval_prompts(valid, test, item_scids, user_scids, {**params, "inject_user_scid": False, "eval_template_id": 1})
    assert no_user.set_index("split").loc["valid", "prompt"] == (
        "Here is the interaction history of user this user: <i0_0><i1_1>, <i0_1><i1_0>. What item comes next?")
