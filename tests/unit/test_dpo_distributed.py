"""Softmax-DPO on several processes (issue 27, `preference/dpo_launcher.py`): 2 gloo ranks at the same global
batch train as 1 process does.

Tolerances. The ranks' gradients are summed by an all-reduce, and the reference pass and the valid decoding
run the examples / users in other batches than one process does, so float32 sums are taken in another order:
results agree to float32 rounding (eps 1.2e-7 relative per operation), not bit for bit. Losses and curves
are compared at 1e-6 absolute + 1e-6 relative (log-probs are ~16 in size, where one float32 step is 1.9e-6);
weights at 1e-5 after 4 AdamW steps of lr 1e-3 (they move by ~1e-3; Adam's update is ~lr x sign(grad), so
rounding flips nothing measurable here; measured max difference 1e-6). Adam's update would hide a gradient
off by a constant factor; the SGD test (update proportional to the gradient, no clipping) checks the summed
gradient is the global batch's mean at 1e-6, against moves of > 1e-2. Ranks talk over loopback only
(GLOO_SOCKET_IFNAME=lo), every launch under a timeout."""
from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from align3gr_pipelines import torchrun
from align3gr_pipelines.preference.dpo_stage import train_stage
from align3gr_pipelines.preference.dpo_trainer import (
    DPOConfig,
    Ranks,
    Selection,
    examples_from_pairs,
    train_dpo,
    valid_recall_evaluator,
    weights_fingerprint,
)
from align3gr_pipelines.preference.self_play import build_pairs, item_code_table, sample_prompts
from tests.pipelines.sp_dpo_curriculum.tiny_world import make_world

ROOT = Path(__file__).resolve().parents[2]
# 4 prompts a micro-batch (2 a rank), 2 micro-batches a step, 2 epochs: 13 pairs give steps of 8 and 5
# examples, the last micro-batch holding 1 (rank 1 gets none of it).
CFG = DPOConfig(beta=0.5, learning_rate=1e-3, batch_size=4, grad_accum_steps=2, epochs=2, nll_weight=0.5, show_progress=False)
SELECTION = {"enabled": True, "eval_every": 1, "n_users": 7, "beam_width": 8, "batch_size": 8, "metric": "ndcg",
             "confirm_half": True}


def tiny(n_pairs: int):
    world = make_world(n_users=8, seed=1)
    ids, codes, tokens = item_code_table(world.item_scids)
    prompts, _ = sample_prompts(world.sft_examples, ids, 0)
    pairs = build_pairs(prompts.head(n_pairs), ids, codes, tokens, None, None, 4, np.random.default_rng(0))[0]
    return world, pairs


@pytest.fixture(autouse=True)
def one_thread_on_loopback(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank runs
    yield
    torch.set_num_threads(before)


def values(curve):
    return np.array([v for _, v in curve], dtype=np.float64)


# ---- settings ----


def test_the_settings_default_to_one_process_and_bad_ones_are_named():
    assert (DPOConfig().nproc_per_node, DPOConfig().launch_timeout_s) == (1, None)
    for stage in ("sp_dpo_curriculum", "rf_dpo"):
        training = yaml.safe_load((ROOT / f"conf/base/parameters_{stage}.yml").read_text())[stage]["training"]
        assert (training["nproc_per_node"], training["launch_timeout_s"]) == (1, None)
        DPOConfig.from_params(training, stage)
    where = "parameters rf_dpo.training"
    with pytest.raises(ValueError, match=r"rf_dpo.training.batch_size=6 must be divisible by .*nproc_per_node=4"):
        DPOConfig.from_params({"batch_size": 6, "nproc_per_node": 4}, where)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="nproc_per_node must be an integer >= 1"):
            DPOConfig.from_params({"nproc_per_node": bad}, where)
    with pytest.raises(ValueError, match="launch_timeout_s must be > 0 or null"):
        DPOConfig.from_params({"launch_timeout_s": 0}, where)


def test_a_callable_the_ranks_cannot_rebuild_is_refused_before_any_launch(monkeypatch):
    world, pairs = tiny(4)
    monkeypatch.setattr(torchrun.subprocess, "Popen", lambda *a, **k: pytest.fail("must not launch"))
    sel = Selection.from_params({"enabled": True}, "x")
    with pytest.raises(ValueError, match="nproc_per_node=2: the ranks rebuild the selection's evaluator"):
        train_stage(world.policy, pairs, dataclasses.replace(CFG, nproc_per_node=2), 0, "s", "r",
                    evaluate=lambda model: 0.5, selection=sel)


# ---- one process ----


def test_one_process_is_todays_loop_without_a_launch(monkeypatch):
    world, pairs = tiny(9)
    monkeypatch.setattr(torchrun.subprocess, "Popen", lambda *a, **k: pytest.fail("nproc_per_node=1 must not launch"))
    today, m0 = train_stage(world.policy, pairs, CFG, 0, "s", "r")
    one, m1 = train_stage(world.policy, pairs, dataclasses.replace(CFG, nproc_per_node=1, launch_timeout_s=5.0), 0, "s", "r")
    assert weights_fingerprint(one.model) == weights_fingerprint(today.model) != weights_fingerprint(world.policy.model)
    assert m1["curves"] == m0["curves"]  # bit for bit
    # a one-process Ranks is the same loop too
    model = copy.deepcopy(world.policy.model)
    result = train_dpo(model, examples_from_pairs(pairs, world.policy.tokenizer), CFG, world.policy.tokenizer.pad_token_id, 0,
                       ranks=Ranks(0, 1))
    assert result.curves == m0["curves"] and weights_fingerprint(model) == weights_fingerprint(today.model)


# ---- two gloo ranks in a process group: the gradient of the global batch ----

_SGD = torch.optim.SGD


def _sgd(params, lr, weight_decay=0.0):
    """AdamW's stand-in: SGD's update is proportional to the gradient, so a gradient that is not the global
    batch's mean shows in the weights (Adam's ~lr x sign(grad) would hide a constant factor)."""
    return _SGD(params, lr=lr)


SGD_CFG = dataclasses.replace(CFG, learning_rate=0.2, max_grad_norm=1e9)  # no clipping: it too rescales


def _train_sgd(ranks: Ranks | None):
    world, pairs = tiny(9)  # steps of 8 and 1 example: rank 1 has no example in the second step
    model = world.policy.model
    result = train_dpo(model, examples_from_pairs(pairs, world.policy.tokenizer), SGD_CFG, world.policy.tokenizer.pad_token_id,
                       0, ranks=ranks)
    return result.curves, {n: p.detach().clone() for n, p in model.named_parameters()}


def _sgd_rank(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.optim.AdamW = _sgd
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        curves, weights = _train_sgd(Ranks(rank, 2))
        torch.save({"curves": curves, "weights": weights}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~30 s on a loaded 2-core box: two spawned processes import torch and transformers
def test_two_gloo_ranks_step_with_the_one_process_gradient(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.optim, "AdamW", _sgd)
    curves, weights = _train_sgd(None)
    before = make_world(n_users=8, seed=1).policy.model.state_dict()
    assert max((weights[n] - before[n]).abs().max().item() for n in weights) > 1e-2  # SGD moved the weights
    ctx = mp.start_processes(_sgd_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2 gloo ranks did not finish within 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert len(curves["loss"]) == 4
    for got in ranks:
        for name in ("loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp"):
            np.testing.assert_allclose(values(got["curves"][name]), values(curves[name]), rtol=1e-6, atol=1e-6, err_msg=name)
        for n, w in weights.items():
            torch.testing.assert_close(got["weights"][n], w, rtol=0, atol=1e-6, msg=f"weights differ at {n}")
    for n in weights:  # the ranks end with the very same weights: they applied the same summed gradient
        assert torch.equal(ranks[0]["weights"][n], ranks[1]["weights"][n]), n


# ---- through torchrun: the stage as the pipelines run it ----


def test_a_stage_on_two_torchrun_ranks_trains_and_selects_as_one_process(tmp_path, monkeypatch):
    world, pairs = tiny(13)
    sel = Selection.from_params(SELECTION, "x")
    evaluate = valid_recall_evaluator(world.seq_eval_prompts, world.item_scids, world.policy.tokenizer, sel, 0)
    one, m1 = train_stage(world.policy, pairs, CFG, 0, "sp_dpo_easy", "sft_model", evaluate=evaluate, selection=sel)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    two, m2 = train_stage(world.policy, pairs, dataclasses.replace(CFG, nproc_per_node=2, launch_timeout_s=240), 0,
                          "sp_dpo_easy", "sft_model", evaluate=evaluate, selection=sel)
    assert list(tmp_path.iterdir()) == []  # the job directory is gone
    assert m2["curves"].keys() == m1["curves"].keys() and len(m1["curves"]["loss"]) == 4
    for name, curve in m1["curves"].items():
        assert [at for at, _ in m2["curves"][name]] == [at for at, _ in curve], name
        np.testing.assert_allclose(values(m2["curves"][name]), values(curve), rtol=1e-6, atol=1e-6, err_msg=name)
    # the same selection: valid NDCG of every checkpoint on both halves, the step kept and its confirmation
    for name in ("valid_ndcg", "valid_ndcg_confirm"):
        assert m2["curves"][name] == m1["curves"][name]
    s1, s2 = m1["scalars"], m2["scalars"]
    assert (s2["selected_step"], s2["confirmed"]) == (s1["selected_step"], s1["confirmed"])
    assert two.meta["dpo"]["selected_step"] == one.meta["dpo"]["selected_step"]
    for (n, p), (_, q) in zip(one.model.named_parameters(), two.model.named_parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=f"trained weights differ at {n}")
    # the stage's record is made here as in one process: fingerprints of the input and of what came back
    assert two.meta["dpo"]["reference_fingerprint"] == one.meta["dpo"]["reference_fingerprint"] == weights_fingerprint(world.policy.model)
    assert two.meta["dpo"]["policy_fingerprint"] == weights_fingerprint(two.model)
    assert two.meta["dpo"]["config"]["nproc_per_node"] == 2 and m2["info"]["config"]["nproc_per_node"] == 2


def test_a_launch_past_its_timeout_ends_its_process_group(monkeypatch):
    world, pairs = tiny(4)
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def spy(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(torchrun.subprocess, "Popen", spy)
    # torchrun does not even import torch in 0.3 s, so the limit is always hit
    with pytest.raises(RuntimeError, match=r"sp_dpo_hard: distributed DPO did not finish within training.launch_timeout_s=0.3 s"):
        train_stage(world.policy, pairs, dataclasses.replace(CFG, nproc_per_node=2, launch_timeout_s=0.3), 0, "sp_dpo_hard", "r")
    assert started and started[0].returncode is not None
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left
        os.killpg(started[0].pid, 0)
