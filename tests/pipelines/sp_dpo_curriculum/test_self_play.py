"""The overlap bucket rule and self-play pair construction with the policy's own beam search."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from align3gr_pipelines.preference.self_play import (
    Quota,
    build_pairs,
    curriculum_quotas,
    decode_candidates,
    item_code_table,
    mixed_quotas,
    overlap_range,
    sample_prompts,
    select_negatives,
    shared_prefix_length,
)

from .tiny_world import make_world


def test_shared_prefix_length():
    a = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]])
    b = torch.tensor([[4, 2, 3], [1, 5, 3], [1, 2, 6], [1, 2, 3]])
    assert shared_prefix_length(a, b).tolist() == [0, 1, 2, 3]  # a later match after a mismatch does not count


@pytest.mark.parametrize(
    "n_levels, expected",
    [
        (3, [(0, 0), (1, 1), (2, 2)]),
        (4, [(0, 0), (1, 2), (3, 3)]),
        (5, [(0, 0), (1, 2), (3, 4)]),
        (2, [(0, 0), (1, 1), (1, 1)]),
        (1, [(0, 0), (0, 0), (0, 0)]),
    ],
)
def test_overlap_ranges_for_three_stages(n_levels, expected):
    assert [overlap_range(s, 3, n_levels) for s in range(3)] == expected


@pytest.mark.parametrize("n_stages", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("n_levels", [2, 3, 4, 6, 8])
def test_bucket_rule_properties(n_stages, n_levels):
    ranges = [overlap_range(s, n_stages, n_levels) for s in range(n_stages)]
    assert ranges[0] == (0, 0)  # easy: a different first code
    for (lo, hi), (lo2, hi2) in zip(ranges, ranges[1:]):
        assert lo <= hi and lo2 >= lo and hi2 >= hi  # progressively longer shared prefixes
    assert all(hi <= n_levels - 1 for _, hi in ranges)  # never the identical item
    if 2 <= n_stages <= n_levels:  # then the stages partition every possible overlap
        covered = sorted(o for lo, hi in ranges for o in range(lo, hi + 1))
        assert covered == list(range(n_levels))


def test_mixed_quotas_split_n_over_buckets():
    q = mixed_quotas(3, 3, 20)
    assert [(x.lo, x.hi) for x in q] == [(0, 0), (1, 1), (2, 2)] and [x.n for x in q] == [7, 7, 6]


def test_select_negatives_prefers_generated_then_fills():
    codes = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 2], [1, 1, 1], [0, 1, 1]])
    rng = np.random.default_rng(0)
    # hard bucket (overlap 2) for chosen 0: items 1 and 4; the policy generated 4 (and the chosen item)
    rej, ov, filled = select_negatives(0, [0, 4, 3], codes, [Quota(2, 2, 3)], rng)
    assert rej[0] == 4 and set(rej) == {1, 4} and ov == [2, 2] and filled == 1
    rej, ov, filled = select_negatives(0, [5, 3, 2], codes, [Quota(0, 0, 2)], rng)
    assert rej == [5, 3] and ov == [0, 0] and filled == 0


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=10, seed=2)


@pytest.mark.parametrize("mode", ["easy", "medium", "hard", "mixed"])
def test_every_generated_pair_obeys_the_bucket_rule(world, mode):
    ids, codes, tokens = item_code_table(world.item_scids)
    prompts, _ = sample_prompts(world.sft_examples, ids, seed=0)
    prompts = prompts.head(12)
    cands = decode_candidates(world.policy, prompts["prompt"].tolist(), world.item_scids, ids, 10, 10, 8, show_progress=False)
    assert cands.shape == (12, 10) and (cands >= 0).all()
    stage = {"easy": 0, "medium": 1, "hard": 2}.get(mode)
    quotas = mixed_quotas(3, 3, 6) if mode == "mixed" else curriculum_quotas(stage, 3, 3, 6)
    pairs, stats = build_pairs(prompts, ids, codes, tokens, cands, quotas, 6, np.random.default_rng(0))
    assert len(pairs) == 12 and stats["n_dropped_no_negative"] == 0
    pos = {iid: i for i, iid in enumerate(ids)}
    for row, cand in zip(pairs.itertuples(), cands):
        c = pos[row.chosen]
        assert row.chosen == prompts.loc[row.Index, "target_item_id"]
        assert row.chosen not in row.rejected and len(set(row.rejected)) == len(row.rejected)
        recomputed = [int(shared_prefix_length(codes[pos[r]], codes[c])) for r in row.rejected]
        assert recomputed == list(row.overlap)
        for q in quotas:
            in_q = [o for o in row.overlap if q.lo <= o <= q.hi]
            assert len(in_q) <= q.n
        assert all(any(q.lo <= o <= q.hi for q in quotas) for o in row.overlap)
        assert all(o < codes.shape[1] for o in row.overlap)  # never identical
        assert row.n_generated + row.filled == len(row.rejected)  # which ones: test_build_pairs_by_hand
    assert stats["n_rejected_filled"] == pairs["filled"].sum()
    if mode == "easy":  # the untrained model's 10 beams hold plenty of items with another first code
        assert pairs["n_generated"].sum() > 0


def test_random_negatives(world):
    ids, codes, tokens = item_code_table(world.item_scids)
    prompts, _ = sample_prompts(world.sft_examples, ids, seed=0)
    pairs, _ = build_pairs(prompts.head(5), ids, codes, tokens, None, None, 7, np.random.default_rng(0))
    assert (pairs["rejected"].map(len) == 7).all() and (pairs["filled"] == 0).all()
    assert not any(r.chosen in r.rejected for r in pairs.itertuples())


def test_sample_prompts_rejects_bad_input(world):
    ids, _, _ = item_code_table(world.item_scids)
    with pytest.raises(ValueError, match="sft_examples: missing column 'target_item_id'"):
        sample_prompts(world.sft_examples.drop(columns="target_item_id"), ids, 0)
    with pytest.raises(ValueError, match="no SEQ training rows"):
        sample_prompts(world.sft_examples[world.sft_examples["task"] != "seq"], ids, 0)
    prompts, _ = sample_prompts(world.sft_examples, ids, 0)
    assert set(prompts.columns) == {"prompt", "user_id", "target_item_id"}
    seq_train = world.sft_examples.query("task == 'seq' and split == 'train'")
    assert len(prompts) == len(seq_train)


# A hand-made catalogue of 3-level codes; overlaps are with item a = (0, 0, 0).
HAND_IDS = list("abcdefgh")
HAND_CODES = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 2], [1, 1, 1], [0, 1, 1], [2, 0, 0]])
#                            a: self     b: 2       c: 1       d: 0       e: 2       f: 0       g: 1       h: 0


def _hand_pairs(quotas, targets=("a",), candidates=None):
    import pandas as pd

    prompts = pd.DataFrame({"prompt": [f"p{k}" for k in range(len(targets))], "user_id": "u", "target_item_id": list(targets)})
    pos = {iid: i for i, iid in enumerate(HAND_IDS)}
    cands = np.array([[pos[x] if x else -1 for x in row] for row in candidates])
    tokens = [f"<{i}>" for i in HAND_IDS]
    return build_pairs(prompts, HAND_IDS, HAND_CODES, tokens, cands, quotas, 0, np.random.default_rng(0))


def test_build_pairs_by_hand():
    beams = [["e", "a", "g", "d", "b", None]]  # the policy's ranked candidates for target a
    # hard (overlap 2): the generated e then b, in beam order; nothing to fill
    pairs, stats = _hand_pairs([Quota(2, 2, 2)], candidates=beams)
    row = pairs.iloc[0]
    assert list(row.rejected) == ["e", "b"] and list(row.overlap) == [2, 2]
    assert (row.n_generated, row.filled) == (2, 0) and list(row.rejected_tokens) == ["<e>", "<b>"]
    # medium (overlap 1), 3 wanted: the generated g, then c, the only other overlap-1 item, from the fill
    row = _hand_pairs([Quota(1, 1, 3)], candidates=beams)[0].iloc[0]
    assert list(row.rejected) == ["g", "c"] and (row.n_generated, row.filled) == (1, 1)
    # easy (overlap 0), 2 wanted: the generated d, then one of f, h (random fill)
    row = _hand_pairs([Quota(0, 0, 2)], candidates=beams)[0].iloc[0]
    assert row.rejected[0] == "d" and row.rejected[1] in {"f", "h"} and (row.n_generated, row.filled) == (1, 1)
    # mixed: one per bucket, each from the beams, in quota order
    row = _hand_pairs(mixed_quotas(3, 3, 3), candidates=beams)[0].iloc[0]
    assert list(row.rejected) == ["d", "g", "e"] and list(row.overlap) == [0, 1, 2] and row.filled == 0
    # another target: overlaps are taken against it (d = (1, 0, 0): f shares 1 level, h and a none)
    row = _hand_pairs([Quota(0, 0, 2)], targets=("d",), candidates=[["f", "h", "a", "d"]])[0].iloc[0]
    assert list(row.rejected) == ["h", "a"] and row.filled == 0
    assert stats["n_rejected_generated"] == 2 and stats["n_rejected_filled"] == 0


# ---------------------------------------------------------------- mining: filled share, exact scoring, similarity buckets


def _mining_setup(seed=2, n_prompts=6):
    world = make_world(n_users=6, seed=seed)
    ids, codes, tokens = item_code_table(world.item_scids)
    prompts, _ = sample_prompts(world.sft_examples, ids, seed)
    prompts = prompts.head(n_prompts).reset_index(drop=True)
    pos = {iid: i for i, iid in enumerate(ids)}
    chosen = [pos[t] for t in prompts["target_item_id"]]
    # A beam that never shares a first code with the chosen item: the paper's beam mining must then
    # fill the medium bucket (1 shared code) entirely from the catalogue.
    beam = np.full((len(prompts), 8), -1, dtype=np.int64)
    for r, c in enumerate(chosen):
        far = [i for i in range(len(ids)) if int(codes[i, 0]) != int(codes[c, 0])]
        beam[r, : len(far[:8])] = far[:8]
    return world, ids, codes, tokens, prompts, chosen, beam


def test_filled_share_is_high_for_beam_mining_and_zero_for_exact_scoring():
    from align3gr_pipelines.preference.self_play import Mining, mine_pairs, stage_buckets

    world, ids, codes, tokens, prompts, chosen, beam = _mining_setup()
    medium = stage_buckets(curriculum_quotas(1, 3, 3, 3), 1, 3, 3, Mining())
    pairs, stats = mine_pairs(world.policy, prompts, world.item_scids, ids, codes, tokens, beam, medium, Mining(), np.random.default_rng(0), False)
    assert stats["filled_fraction"] == 1.0 and stats["beam_fraction"] == 0.0 and len(pairs) == len(prompts)

    scored = Mining(candidates="scored", max_scored=64)
    pairs, stats = mine_pairs(world.policy, prompts, world.item_scids, ids, codes, tokens, beam, medium, scored, np.random.default_rng(0), False)
    assert stats["filled_fraction"] == 0.0 and (pairs["filled"] == 0).all()
    assert len(pairs) == len(prompts) and (pairs["rejected"].map(len) == 3).all()
    # every negative is in the bucket, and they are the bucket's best by the policy's exact score
    from align3gr_pipelines.preference.self_play import bucket_members, score_candidates

    for r, row in pairs.iterrows():
        assert set(row["overlap"]) == {1}
        members = np.flatnonzero(bucket_members((1, 1), chosen[r], codes, "prefix", None))
        cand = np.full((1, len(members)), -1, dtype=np.int64)
        cand[0] = members
        best = score_candidates(world.policy, [row["prompt"]], world.item_scids, ids, cand, 8, False)[0][:3]
        assert list(row["rejected"]) == [ids[i] for i in best]


def test_similarity_buckets_follow_the_scid_embeddings():
    from align3gr_pipelines.preference.self_play import Mining, mine_pairs, scid_embeddings, similarity_ranks, stage_buckets

    world, ids, codes, tokens, prompts, chosen, beam = _mining_setup(seed=3)
    mining = Mining(candidates="scored", bucket_by="similarity", similarity_bands=((0.0, 0.5), (0.5, 0.8), (0.8, 1.0)))
    emb = scid_embeddings(world.policy, tokens)
    assert emb.shape == (len(ids), 3 * world.policy.model.get_input_embeddings().weight.shape[1])
    for stage, (lo, hi) in enumerate(mining.similarity_bands):
        buckets = stage_buckets(None, stage, 3, 4, mining)
        pairs, stats = mine_pairs(world.policy, prompts, world.item_scids, ids, codes, tokens, beam, buckets, mining, np.random.default_rng(0), False)
        assert stats["filled_fraction"] == 0.0 and (pairs["rejected"].map(len) == 4).all()
        pos = {iid: i for i, iid in enumerate(ids)}
        for r, row in pairs.iterrows():
            q = similarity_ranks(emb, chosen[r])
            assert all(lo <= q[pos[i]] <= hi for i in row["rejected"])
    with pytest.raises(ValueError, match="similarity_bands"):
        Mining.from_params({"similarity_bands": [[0.0, 0.5], [0.5, 1.0]]}, 3)
    with pytest.raises(ValueError, match="mining.candidates"):
        Mining.from_params({"candidates": "sampled"}, 3)


def test_transition_prompts_skip_the_sft_seq_targets():
    from align3gr_pipelines.preference.self_play import transition_prompts, user_tokens_like_sft

    world = make_world(n_users=6, seed=5, sft_stride=3)
    ids, _, tokens = item_code_table(world.item_scids)
    users = user_tokens_like_sft(world.sft_examples, world.user_scids)
    assert users is not None  # the tiny world's SFT prompts carry user SCIDs
    prompts, info = transition_prompts(world.train_sequences, world.sft_examples, ids, tokens, users, 10, 0, 0)
    seq = world.sft_examples[(world.sft_examples["task"] == "seq") & (world.sft_examples["split"] == "train")]
    used = set(zip(seq["user_id"], seq["target_item_id"]))
    assert len(prompts) > 0 and info["transitions_that_were_sft_seq"] == len(used)
    assert not used & set(zip(prompts["user_id"], prompts["target_item_id"]))
    assert len(prompts) + len(used) == len(world.train_sequences)


# ---------------------------------------------------------------- de-noised negatives: no later-consumed item rejected


def test_later_positives_by_hand():
    from align3gr_pipelines.preference.self_play import later_positives

    ids = ["a", "b", "c", "d", "e"]
    train = pd.DataFrame({"user_id": ["u", "u", "u", "v"], "history": [["a"], ["a", "b"], ["a", "b", "c"], ["e"]],
                          "target": ["b", "c", "d", "a"], "position": [1, 2, 3, 1]})
    prompts = pd.DataFrame({"user_id": ["u", "u", "u", "v", "w"], "target_item_id": ["b", "c", "d", "a", "a"]})
    got = later_positives(train.sample(frac=1.0, random_state=0), prompts, ids)  # row order must not matter
    assert [list(x) for x in got] == [[2, 3], [3], [], [], []]  # after b: c, d; after c: d; last: none; unknown: none
    # without a position column the history's length orders the transitions
    assert [list(x) for x in later_positives(train.drop(columns="position"), prompts, ids)] == [[2, 3], [3], [], [], []]
    with pytest.raises(ValueError, match="'position' or a 'history'"):
        later_positives(train[["user_id", "target"]], prompts, ids)


@pytest.mark.parametrize("candidates", ["beam", "scored"])
def test_no_rejected_item_is_a_later_consumed_item_when_excluded(candidates):
    from align3gr_pipelines.preference.self_play import Mining, mine_pairs, stage_buckets

    world, ids, codes, tokens, prompts, chosen, beam = _mining_setup()
    easy = stage_buckets(curriculum_quotas(0, 3, 3, 3), 0, 3, 3, Mining())
    plain = Mining(candidates=candidates, max_scored=64)
    first, _ = mine_pairs(world.policy, prompts, world.item_scids, ids, codes, tokens, beam, easy, plain, np.random.default_rng(0), False)
    # pretend each user later consumes the first two items the paper's setting rejected for its prompt
    pos = {iid: i for i, iid in enumerate(ids)}
    later = [np.array(sorted(pos[i] for i in row.rejected[:2]), dtype=np.int64) for row in first.itertuples()]
    pairs, stats = mine_pairs(world.policy, prompts, world.item_scids, ids, codes, tokens, beam, easy, plain, np.random.default_rng(0), False, later)
    assert stats["n_rejected_later_positive"] == 2 * len(prompts)  # counted, not removed, in the paper's setting
    denoised = Mining(candidates=candidates, max_scored=64, exclude_later_positives=True)
    pairs, stats = mine_pairs(world.policy, prompts, world.item_scids, ids, codes, tokens, beam, easy, denoised, np.random.default_rng(0), False, later)
    for r, row in enumerate(pairs.itertuples()):
        assert not set(row.rejected) & {ids[i] for i in later[r]}
    assert stats["n_rejected_later_positive"] == 0 and stats["n_later_positive_candidates_excluded"] > 0
    with pytest.raises(ValueError, match="exclude_later_positives"):
        Mining.from_params({"exclude_later_positives": "yes"}, 3)


# ---------------------------------------------------------------- DPO memory: in-place training, trainable-only snapshots


def test_in_place_stage_equals_the_copying_stage_and_trains_the_input_model():
    from align3gr_pipelines.preference.dpo_stage import train_stage
    from align3gr_pipelines.preference.dpo_trainer import DPOConfig, weights_fingerprint
    from align3gr_pipelines.preference.self_play import Mining, mine_pairs, stage_buckets

    world, ids, codes, tokens, prompts, chosen, beam = _mining_setup()
    easy = stage_buckets(curriculum_quotas(0, 3, 3, 3), 0, 3, 3, Mining())
    pairs, _ = mine_pairs(world.policy, prompts, world.item_scids, ids, codes, tokens, beam, easy, Mining(), np.random.default_rng(0), False)
    cfg = dict(batch_size=2, epochs=1, learning_rate=1e-3, show_progress=False, device="cpu")
    before = weights_fingerprint(world.policy.model)
    copied, _ = train_stage(world.policy, pairs, DPOConfig(**cfg), 0, "sp_dpo_easy", "sft")
    assert weights_fingerprint(world.policy.model) == before  # the copying stage leaves its input alone
    in_place, _ = train_stage(world.policy, pairs, DPOConfig(**cfg, in_place=True), 0, "sp_dpo_easy", "sft")
    assert in_place.model is world.policy.model  # no second copy of the weights
    assert in_place.meta["dpo"] == copied.meta["dpo"] | {"config": in_place.meta["dpo"]["config"]}
    assert weights_fingerprint(in_place.model) == weights_fingerprint(copied.model) != before


def test_snapshot_holds_only_trainable_tensors_and_restores_them():
    from align3gr_pipelines.preference.dpo_trainer import restore_snapshot, trainable_snapshot

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)  # a frozen "base" tensor
    snap = trainable_snapshot(model)
    assert set(snap) == {"0.bias", "1.weight", "1.bias"}
    frozen = model[0].weight.data_ptr()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    restore_snapshot(model, snap)
    assert torch.equal(model[1].weight, snap["1.weight"]) and model[0].weight.data_ptr() == frozen
