"""On-policy, reachable SP-DPO pairs (issue 25): the rejected items of a hand-made beam, the prompts that
qualify, the latest-transition prompts, and the default (bucketed) path left as it was."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from align3gr_pipelines.pipelines.sp_dpo_curriculum.nodes import _prompts, build_self_play_pairs
from align3gr_pipelines.preference import self_play
from align3gr_pipelines.preference.self_play import (
    Mining,
    latest_transition_prompts,
    prepend_prompts,
    reachable_negatives,
    reachable_pairs,
)
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_world


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=10, seed=3, sft_stride=3)


def test_rejected_are_the_items_above_the_target_then_the_rest_of_the_beam():
    beam = [10, 11, 5, 12, 13, 14]  # the target 5 at rank 3 of 6
    assert reachable_negatives(5, beam, 20) == (3, [10, 11, 12, 13, 14], 0)
    assert reachable_negatives(5, beam, 3) == (3, [10, 11, 12], 0)  # above first, then the rest, up to n
    assert reachable_negatives(10, beam, 20) == (1, [11, 5, 12, 13, 14], 0)  # rank 1: nothing above
    assert reachable_negatives(14, beam, 2) == (6, [10, 11], 0)
    # the target outside the beam: the prompt does not qualify
    assert reachable_negatives(7, beam, 20) == (None, [], 0)
    # a known later positive is never rejected (and counted), nor is the -1 padding of a short beam
    assert reachable_negatives(5, [10, 11, 5, 12, -1, -1], 20, exclude=[11, 99]) == (3, [10, 12], 1)


def _table(n_items=8):
    ids = [f"i{i}" for i in range(n_items)]
    codes = torch.tensor([[i % 2, i % 3, i] for i in range(n_items)])
    return ids, codes, [f"<t{i}>" for i in ids]


def test_reachable_pairs_drop_unreachable_prompts_and_report_what_qualified():
    ids, codes, tokens = _table()
    prompts = pd.DataFrame({"prompt": ["p0", "p1", "p2", "p3"], "user_id": ["a", "b", "c", "d"],
                            "target_item_id": ["i2", "i7", "i0", "i5"]})
    beam = np.array([
        [1, 3, 2, 4, 5, 6],   # target i2 at rank 3
        [0, 1, 2, 3, 4, 5],   # target i7 absent: dropped
        [0, 6, 1, -1, -1, -1],  # target i0 at rank 1
        [4, 6, 3, 5, 1, 0],   # target i5 at rank 4; i6 is a later positive of user d
    ])
    later = [np.array([], dtype=np.int64), np.array([3]), np.array([], dtype=np.int64), np.array([6])]
    pairs, stats = reachable_pairs(prompts, ids, codes, tokens, beam, n_negatives=20, later=later, exclude_later_positives=True)
    assert pairs["prompt"].tolist() == ["p0", "p2", "p3"]
    assert pairs["rejected"].tolist() == [["i1", "i3", "i4", "i5", "i6"], ["i6", "i1"], ["i4", "i3", "i1", "i0"]]
    assert all(c not in r for c, r in zip(pairs["chosen"], pairs["rejected"]))
    assert (pairs["filled"] == 0).all() and pairs["n_generated"].tolist() == [5, 2, 4]
    assert pairs["rejected_tokens"].iloc[1] == ["<ti6>", "<ti1>"]
    assert pairs["overlap"].iloc[1] == [int(self_play.shared_prefix_length(codes[6], codes[0])), int(self_play.shared_prefix_length(codes[1], codes[0]))]
    assert stats["n_prompts_considered"] == 4 and stats["n_prompts_reachable"] == 3 and stats["reachable_share"] == 0.75
    assert stats["n_prompts_qualified"] == 3 and stats["n_pairs"] == 3
    assert stats["mean_target_rank"] == pytest.approx((3 + 1 + 4) / 3)
    assert stats["n_rejected_above_target"] == 2 + 0 + 2  # i1, i3 above i2; i4 (i6 excluded), i3 above i5
    assert stats["n_rejected_later_positive"] == 0 and stats["n_later_positive_candidates_excluded"] == 1
    # without the exclusion the later positive i6 is rejected, and counted
    kept, s2 = reachable_pairs(prompts, ids, codes, tokens, beam, 20, later, exclude_later_positives=False)
    assert kept["rejected"].iloc[2] == ["i4", "i6", "i3", "i1", "i0"] and s2["n_rejected_later_positive"] == 1
    # a curriculum stage's rank band, and its cap
    easy, s3 = reachable_pairs(prompts, ids, codes, tokens, beam, 20, later, True, rank_band=(1, 1))
    assert easy["prompt"].tolist() == ["p2"] and s3["n_prompts_reachable"] == 3 and s3["n_prompts_qualified"] == 1
    assert s3["mean_target_rank"] == 1.0 and s3["mean_target_rank_reachable"] == pytest.approx(8 / 3)
    capped, s4 = reachable_pairs(prompts, ids, codes, tokens, beam, 20, later, True, rank_band=(2, 6), max_pairs=1)
    assert capped["prompt"].tolist() == ["p0"] and s4["n_prompts_over_cap"] == 1
    with pytest.raises(ValueError, match="decoded beams"):
        reachable_pairs(prompts, ids, codes, tokens, beam[:2], 20)


def test_mining_parameters():
    m = Mining.from_params(None, 3)
    assert m.pairs == "bucketed" and m.reachable_beam_width == 20 and m.reachable_rank_bands == ((1, 1), (2, 5), (6, 20))
    r = Mining.from_params({"pairs": "reachable", "reachable_beam_width": 8, "reachable_rank_bands": [[1, 2], [3, 4], [5, 8]]}, 3)
    assert r.reachable_rank_bands == ((1, 2), (3, 4), (5, 8))
    with pytest.raises(ValueError, match="mining.pairs"):
        Mining.from_params({"pairs": "on_policy"}, 3)
    with pytest.raises(ValueError, match="reachable_beam_width"):
        Mining.from_params({"reachable_beam_width": 0}, 3)
    with pytest.raises(ValueError, match="reachable_rank_bands"):
        Mining.from_params({"reachable_rank_bands": [[1, 1], [3, 2], [4, 5]]}, 3)
    with pytest.raises(ValueError, match="reachable_rank_bands"):
        Mining.from_params({"reachable_rank_bands": [[1, 1], [2, 5]]}, 3)


def test_latest_transition_prompts_take_each_users_last_training_transition(world):
    ids, _, tokens = self_play.item_code_table(world.item_scids)
    latest = latest_transition_prompts(world.train_sequences, ids, tokens, None, 20, 0, seed=7)
    ts = world.train_sequences
    last = ts.loc[ts.groupby("user_id")["position"].idxmax()]
    assert sorted(latest["user_id"]) == sorted(last["user_id"])
    assert dict(zip(latest["user_id"], latest["target_item_id"])) == dict(zip(last["user_id"], last["target"]))
    assert latest.equals(latest_transition_prompts(world.train_sequences, ids, tokens, None, 20, 0, seed=7))
    rest = pd.DataFrame({"prompt": ["x", "y"], "user_id": [latest["user_id"][0], "zz"],
                         "target_item_id": [latest["target_item_id"][0], "it1"]})
    merged = prepend_prompts(latest, rest)
    assert merged["prompt"].tolist() == latest["prompt"].tolist() + ["y"]  # the duplicate transition once


def _params(**mining):
    return {
        "mode": "curriculum", "n_negatives": 4, "prompts_per_stage": 8,
        "prompts": {"source": "non_sft_transitions", "max_history": 20},
        "mining": {"candidates": "beam", "bucket_by": "prefix", **mining},
        "decoding": {"beam_width": 8, "top_k": 8, "batch_size": 8, "show_progress": False},
    }


def _build(world, params, stage="easy"):
    return build_self_play_pairs(world.policy, world.sft_examples, world.train_sequences, world.item_scids, world.user_scids,
                                 params, 7, stage)


def test_reachable_stage_pairs_come_from_the_policys_own_beam(world):
    params = _params(pairs="reachable", reachable_beam_width=10, exclude_later_positives=True,
                     reachable_rank_bands=[[1, 3], [4, 6], [7, 10]])
    params["prompts"]["include_latest_transition"] = True
    ids, _, tokens = self_play.item_code_table(world.item_scids)
    users = self_play.user_tokens_like_sft(world.sft_examples, world.user_scids)
    latest = latest_transition_prompts(world.train_sequences, ids, tokens, users, 20, 0, 7)
    seen = []
    for i, stage in enumerate(("easy", "medium", "hard")):
        pairs, mining = _build(world, params, stage)
        s = mining["scalars"]
        assert s["n_prompts_considered"] == 24 and s["n_pairs"] == len(pairs) > 0
        assert s["n_prompts_reachable"] >= s["n_prompts_qualified"] >= len(pairs)
        assert s["reachable_share"] == s["n_prompts_reachable"] / 24 and s["n_rejected_later_positive"] == 0
        lo, hi = params["mining"]["reachable_rank_bands"][i]
        assert lo <= s["mean_target_rank"] <= hi and mining["info"]["pairs"] == "reachable"
        # each pair: the target is in the policy's beam at a rank of the stage's band, the rejected items are
        # the beam without it, in rank order, minus the user's later positives
        beam = self_play.decode_candidates(world.policy, pairs["prompt"].tolist(), world.item_scids, ids, 10, 10, 8, False)
        later = self_play.later_positives(world.train_sequences, pairs.rename(columns={"chosen": "target_item_id"}), ids)
        for r, row in enumerate(pairs.itertuples()):
            ranked = [ids[j] for j in beam[r] if j >= 0]
            assert lo <= ranked.index(row.chosen) + 1 <= hi
            expected = [x for x in ranked if x != row.chosen and ids.index(x) not in set(later[r].tolist())][:4]
            assert list(row.rejected) == expected
        seen.append(pairs)
    # the latest transitions lead the candidate pool, ahead of the source's prompts
    pool = _prompts(world.sft_examples, world.train_sequences, world.user_scids, ids, tokens, params, 7, "easy")
    assert pool.head(len(latest)).equals(latest) and len(latest) == 10
    assert not _prompts(world.sft_examples, world.train_sequences, world.user_scids, ids, tokens, _params(), 7, "easy").head(10).equals(latest)
    assert {(u, c) for p in seen for u, c in zip(p["user_id"], p["chosen"])} & set(zip(latest["user_id"], latest["target_item_id"]))
    with pytest.raises(ValueError, match="mode random"):
        _build(world, {**_params(pairs="reachable"), "mode": "random"}, "hard")
    with pytest.raises(ValueError, match="include_latest_transition"):
        _prompts(world.sft_examples, world.train_sequences, world.user_scids, ids, tokens,
                 {"prompts": {"include_latest_transition": "yes"}}, 7, "easy")


def test_the_default_path_is_unchanged(world):
    """No `pairs` key and `pairs: bucketed` with the prompts flag off build the same pairs and stats as the
    bucketed mining called directly (the code path before issue 25)."""
    implicit, m1 = _build(world, _params(), "medium")
    explicit, m2 = _build(world, {**_params(pairs="bucketed"), "prompts": {**_params()["prompts"], "include_latest_transition": False}},
                          "medium")
    assert implicit.equals(explicit) and m1["scalars"] == m2["scalars"]
    ids, codes, tokens = self_play.item_code_table(world.item_scids)
    users = self_play.user_tokens_like_sft(world.sft_examples, world.user_scids)
    prompts, _ = self_play.transition_prompts(world.train_sequences, world.sft_examples, ids, tokens, users, 20, 0, 7)
    prompts = prompts.iloc[np.unique(np.arange(8, 16) % len(prompts))].reset_index(drop=True)
    mining = Mining.from_params(_params()["mining"], 3)
    buckets = self_play.stage_buckets(self_play.curriculum_quotas(1, 3, 3, 4), 1, 3, 4, mining)
    beam = self_play.decode_candidates(world.policy, prompts["prompt"].tolist(), world.item_scids, ids, 8, 8, 8, False)
    later = self_play.later_positives(world.train_sequences, prompts, ids)
    direct, stats = self_play.mine_pairs(world.policy, prompts, world.item_scids, ids, codes, tokens, beam, buckets, mining,
                                         np.random.default_rng([7, 1]), False, later)
    assert implicit.equals(direct) and m1["scalars"] == stats
