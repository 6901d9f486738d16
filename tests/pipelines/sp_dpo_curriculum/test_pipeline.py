"""The sp_dpo_curriculum pipeline end to end on a tiny world, through a DataCatalog and SequentialRunner."""
from __future__ import annotations

import pytest
from kedro.io import DataCatalog
from kedro.runner import SequentialRunner

from align3gr_pipelines.pipelines.sp_dpo_curriculum import create_pipeline
from align3gr_pipelines.preference.dpo_trainer import weights_fingerprint
from align3gr_pipelines.preference.self_play import item_code_table, overlap_range, shared_prefix_length

from .tiny_world import KeptMemoryDataset, make_world

STAGES = ("easy", "medium", "hard")


def _params(mode: str) -> dict:
    return {
        "mode": mode,
        "n_negatives": 4,
        "prompts_per_stage": 8,
        "decoding": {"beam_width": 8, "top_k": 8, "batch_size": 8, "show_progress": False},
        "training": {"beta": 0.5, "learning_rate": 2e-3, "batch_size": 4, "grad_accum_steps": 1, "show_progress": False},
    }


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=10, seed=3)


def run(world, mode: str, sft_model="from_world") -> DataCatalog:
    pipe = create_pipeline()
    inputs = {
        "sft_model": world.policy if sft_model == "from_world" else sft_model,
        "sft_examples": world.sft_examples,
        "train_sequences": world.train_sequences,
        "user_scids": world.user_scids,
        "seq_eval_prompts": world.seq_eval_prompts,
        "item_scids": world.item_scids,
        "params:sp_dpo_curriculum": _params(mode),
        "params:seed": 7,
    }
    catalog = DataCatalog({k: KeptMemoryDataset(v) for k, v in inputs.items()} | {k: KeptMemoryDataset() for k in pipe.all_outputs()})
    SequentialRunner().run(pipe, catalog)
    return catalog


@pytest.fixture(scope="module")
def curriculum(world):
    return run(world, "curriculum")


def test_curriculum_chains_stages(world, curriculum):
    models = {s: curriculum.load(f"sp_dpo_model_{s}") for s in STAGES}
    previous = world.policy
    for s in STAGES:
        m = models[s]
        assert m.meta["stage"] == f"sp_dpo_{s}" and m.meta["skipped"] is False
        # the reference of stage i+1 is the policy after stage i (the SFT model for the first stage)
        assert m.meta["dpo"]["reference_fingerprint"] == weights_fingerprint(previous.model)
        assert m.meta["dpo"]["policy_fingerprint"] == weights_fingerprint(m.model) != weights_fingerprint(previous.model)
        metrics = curriculum.load(f"sp_dpo_metrics_{s}")
        assert set(metrics) == {"scalars", "curves", "info"} and metrics["curves"]["loss"]
        assert curriculum.load(f"sp_dpo_plot_{s}").axes
        previous = m


def test_curriculum_pairs_follow_their_bucket(world, curriculum):
    ids, codes, _ = item_code_table(world.item_scids)
    pos = {iid: i for i, iid in enumerate(ids)}
    users = {}
    for i, s in enumerate(STAGES):
        lo, hi = overlap_range(i, 3, 3)
        pairs = curriculum.load(f"sp_dpo_pairs_{s}")
        assert len(pairs) > 0
        assert {"prompt", "chosen", "rejected", "overlap", "user_id", "filled"} <= set(pairs.columns)
        for row in pairs.itertuples():
            assert row.chosen not in row.rejected and 1 <= len(row.rejected) <= 4
            for r, o in zip(row.rejected, row.overlap):
                assert lo <= o <= hi and o == int(shared_prefix_length(codes[pos[r]], codes[pos[row.chosen]]))
        users[s] = set(pairs["prompt"])
    for a, b in (("easy", "medium"), ("easy", "hard"), ("medium", "hard")):
        assert not users[a] & users[b], f"{a} and {b} share prompts"  # disjoint prompt subsets per stage


@pytest.mark.parametrize("mode", ["no_curriculum", "random"])
def test_ablation_modes_train_one_stage(world, mode):
    catalog = run(world, mode)
    for s in ("easy", "medium"):
        m = catalog.load(f"sp_dpo_model_{s}")
        assert m.meta["skipped"] is True
        assert weights_fingerprint(m.model) == weights_fingerprint(world.policy.model)
        assert len(catalog.load(f"sp_dpo_pairs_{s}")) == 0
    hard = catalog.load("sp_dpo_model_hard")
    assert hard.meta["skipped"] is False and hard.meta["sp_dpo_mode"] == mode
    assert hard.meta["dpo"]["reference_fingerprint"] == weights_fingerprint(world.policy.model)
    pairs = catalog.load("sp_dpo_pairs_hard")
    assert len(pairs) == 24  # three stages' worth of prompts in the single stage
    overlaps = {o for ov in pairs["overlap"] for o in ov}
    assert max(overlaps) < 3 and len(overlaps) > 1  # several buckets in one stage
    if mode == "random":
        assert (pairs["filled"] == 0).all() and (pairs["rejected"].map(len) == 4).all()


def test_missing_sft_model_is_a_clear_error(world):
    with pytest.raises(Exception, match="sft_model.*sft_train"):
        run(world, "curriculum", sft_model=None)


def test_unknown_mode(world):
    from align3gr_pipelines.pipelines.sp_dpo_curriculum.nodes import build_self_play_pairs

    with pytest.raises(ValueError, match="sp_dpo_curriculum.mode"):
        build_self_play_pairs(
            world.policy, world.sft_examples, world.train_sequences, world.item_scids, world.user_scids, {"mode": "curricula"}, 0, "easy"
        )
