"""The shared-prefix log-probs, the training loop, stage metadata and the LoRA path."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from align3gr_pipelines.lm.rec_lm import encode_prompt, encode_response
from align3gr_pipelines.preference.dpo_stage import pass_through, train_stage
from align3gr_pipelines.preference.dpo_trainer import (
    DPOConfig,
    PreferenceExample,
    collate,
    examples_from_pairs,
    sequence_logps,
    weights_fingerprint,
)
from align3gr_pipelines.preference.self_play import build_pairs, item_code_table, sample_prompts

from .tiny_world import make_world

QUIET = {"show_progress": False}


@pytest.fixture(scope="module")
def world():
    return make_world(n_users=8, seed=1)


def _random_pairs(world, n=12, n_neg=4, seed=0):
    import numpy as np

    ids, codes, tokens = item_code_table(world.item_scids)
    prompts, _ = sample_prompts(world.sft_examples, ids, seed)
    return build_pairs(prompts.head(n), ids, codes, tokens, None, None, n_neg, np.random.default_rng(seed))[0]


def test_shared_prefix_logps_equal_full_forward(world):
    tok, model = world.policy.tokenizer, world.policy.model
    scids = world.item_scids["tokens"].tolist()
    prompts = world.sft_examples["prompt"].tolist()
    # prompts of different lengths (left padding) and rejected lists of different lengths (masked slots)
    examples = [
        PreferenceExample(encode_prompt(tok, prompts[i]), encode_response(tok, scids[i]),
                          [encode_response(tok, scids[i + j + 1]) for j in range(1 + i % 3)])
        for i in range(4)
    ]
    with torch.no_grad():
        fast = sequence_logps(model, collate(examples, tok.pad_token_id))
        for i, e in enumerate(examples):
            for j, resp in enumerate([e.chosen_ids, *e.rejected_ids]):
                logits = model(torch.tensor([e.prompt_ids + resp])).logits.log_softmax(-1)[0]
                p = len(e.prompt_ids)
                full = sum(logits[p - 1 + t, resp[t]].item() for t in range(len(resp)))
                assert fast[i, j].item() == pytest.approx(full, abs=1e-4)
            assert (fast[i, 1 + len(e.rejected_ids) :] == 0).all()


def test_training_moves_rewards_in_the_right_direction(world):
    pairs = _random_pairs(world, n=16)
    cfg = DPOConfig(beta=0.5, learning_rate=3e-3, batch_size=4, epochs=4, **QUIET)
    new, metrics = train_stage(world.policy, pairs, cfg, seed=0, stage="sp_dpo_easy", reference="sft_model")
    s = metrics["scalars"]
    assert s["initial_loss"] == pytest.approx(math.log(1 + 4), rel=1e-4)  # policy == reference at step 0
    assert s["final_loss"] < s["initial_loss"] - 0.05
    assert s["final_reward_margin"] > 0
    assert set(metrics["curves"]) >= {"loss", "reward_margin", "reward_accuracy", "chosen_logp", "rejected_logp"}
    assert len(metrics["curves"]["loss"]) == s["optimizer_steps"] == 16
    # the input policy is untouched; the output's meta records the chain
    assert weights_fingerprint(world.policy.model) == new.meta["dpo"]["reference_fingerprint"]
    assert weights_fingerprint(new.model) == new.meta["dpo"]["policy_fingerprint"] != new.meta["dpo"]["reference_fingerprint"]
    assert new.meta["stage"] == "sp_dpo_easy" and new.meta["skipped"] is False


def test_deterministic_under_seed(world):
    pairs = _random_pairs(world, n=8)
    cfg = DPOConfig(learning_rate=1e-3, batch_size=4, **QUIET)
    a, _ = train_stage(world.policy, pairs, cfg, seed=3, stage="s", reference="r")
    b, _ = train_stage(world.policy, pairs, cfg, seed=3, stage="s", reference="r")
    assert weights_fingerprint(a.model) == weights_fingerprint(b.model)


def test_grad_accumulation_matches_a_big_batch(world):
    pairs = _random_pairs(world, n=8)
    big, _ = train_stage(world.policy, pairs, DPOConfig(learning_rate=1e-3, batch_size=8, **QUIET), 0, "s", "r")
    acc, _ = train_stage(world.policy, pairs, DPOConfig(learning_rate=1e-3, batch_size=2, grad_accum_steps=4, **QUIET), 0, "s", "r")
    for p, q in zip(big.model.parameters(), acc.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_a_policy_saved_with_activation_checkpointing_still_trains(world):
    from align3gr_pipelines.lm.rec_lm import RecLM

    model = __import__("copy").deepcopy(world.policy.model)
    model.activation_checkpointing_enable()
    policy = RecLM(model=model, tokenizer=world.policy.tokenizer, meta=world.policy.meta)
    pairs = _random_pairs(world, n=4)
    new, metrics = train_stage(policy, pairs, DPOConfig(batch_size=4, **QUIET), 0, "s", "r")
    plain, plain_metrics = train_stage(world.policy, pairs, DPOConfig(batch_size=4, **QUIET), 0, "s", "r")
    assert metrics["scalars"]["optimizer_steps"] == 1
    # it trained (the weights moved), and exactly as the same step without checkpointing does
    assert weights_fingerprint(new.model) != weights_fingerprint(world.policy.model)
    assert metrics["scalars"]["initial_loss"] == pytest.approx(plain_metrics["scalars"]["initial_loss"], rel=1e-5)
    for (name, p), (_, q) in zip(new.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=f"checkpointed step differs at {name}")


def test_pass_through_marks_skipped(world):
    out, metrics = pass_through(world.policy, "sp_dpo_easy", "ablation")
    assert out.meta["skipped"] is True and out.model is world.policy.model
    assert metrics["info"]["skipped"] is True


def test_bad_parameters():
    with pytest.raises(ValueError, match="unknown training parameter.*lr"):
        DPOConfig.from_params({"lr": 1e-4}, "parameters sp_dpo_curriculum.training")
    with pytest.raises(ValueError, match="batch_size"):
        DPOConfig.from_params({"batch_size": 0}, "x")


def test_examples_from_pairs_layout(world):
    pairs = _random_pairs(world, n=2, n_neg=3)
    ex = examples_from_pairs(pairs, world.policy.tokenizer)
    assert len(ex) == 2 and len(ex[0].rejected_ids) == 3
    assert ex[0].chosen_ids[-1] == world.policy.tokenizer.eos_token_id and len(ex[0].chosen_ids) == 4


def test_lora_trains_only_the_adapter_and_the_reference_is_the_stage_input(world):
    from peft import LoraConfig, get_peft_model

    from align3gr_pipelines.lm.rec_lm import RecLM

    base = world.policy
    # As sft_train builds it: LoRA matrices plus PEFT "trainable tokens" for the SCID rows.
    scid_rows = base.tokenizer.convert_tokens_to_ids(["<i0_0>", "<i0_1>", "<i1_0>"])
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], trainable_token_indices={"embed_tokens": scid_rows})
    model = get_peft_model(__import__("copy").deepcopy(base.model), lora)
    for n, p in model.named_parameters():  # as a reloaded inference checkpoint comes back: all frozen
        p.requires_grad_(False)
    policy = RecLM(model=model, tokenizer=base.tokenizer, meta={**base.meta, "peft": True})
    pairs = _random_pairs(world, n=8)
    new, metrics = train_stage(policy, pairs, DPOConfig(learning_rate=1e-2, batch_size=4, **QUIET), 0, "s", "r")
    before = dict(policy.model.named_parameters())
    changed = {n for n, p in new.model.named_parameters() if not torch.equal(p, before[n])}
    assert any("lora_" in n for n in changed) and any("trainable_tokens" in n for n in changed)
    assert all("lora_" in n or "trainable_tokens" in n for n in changed)  # the base weights never move
    assert new.meta["dpo"]["reference_fingerprint"] == weights_fingerprint(policy.model)
    assert metrics["scalars"]["initial_loss"] == pytest.approx(math.log(5), rel=1e-4)


def _stage(world, selection, evaluate, lr=5e-3):
    from align3gr_pipelines.preference.dpo_trainer import Selection

    cfg = DPOConfig(beta=0.5, learning_rate=lr, batch_size=4, **QUIET)
    sel = Selection.from_params(selection, "test.selection")
    return train_stage(world.policy, _random_pairs(world), cfg, 0, "sp_dpo_easy", "sft_model", evaluate=evaluate, selection=sel)


def test_selection_keeps_the_input_policy_when_every_checkpoint_scores_lower(world):
    calls = []

    def evaluate(model):  # the input policy scores best, every trained checkpoint lower
        calls.append(weights_fingerprint(model))
        return 0.5 if len(calls) == 1 else 0.1

    model, metrics = _stage(world, {"enabled": True, "eval_every": 1}, evaluate)
    s = metrics["scalars"]
    assert calls[0] == weights_fingerprint(world.policy.model) and len(calls) == 1 + 3  # input + each of 3 steps
    assert s["selected_step"] == 0 and s["valid_recall_selected"] == 0.5 == s["valid_recall_input"]
    assert weights_fingerprint(model.model) == weights_fingerprint(world.policy.model)
    assert [v for _, v in metrics["curves"]["valid_recall"]] == [0.5, 0.1, 0.1, 0.1]
    # the log-prob drift is logged at every evaluation: 0 for the input policy, nonzero after training
    drift = metrics["curves"]["chosen_logp_drift"]
    assert drift[0] == [0, 0.0] and drift[-1][1] != 0.0 and "final_rejected_logp_drift" in s
    # allow_worse: the last checkpoint is kept, as the paper does
    worse, m2 = _stage(world, {"enabled": True, "eval_every": 1, "allow_worse": True}, lambda m, c=iter([0.5, 0.1, 0.1, 0.1]): next(c))
    assert m2["scalars"]["selected_step"] == 3 and weights_fingerprint(worse.model) != weights_fingerprint(world.policy.model)


def test_selection_picks_the_best_checkpoint(world):
    scores = iter([0.1, 0.2, 0.4, 0.3])  # input, step 1, 2, 3

    def evaluate(model):
        return next(scores)

    model, metrics = _stage(world, {"enabled": True, "eval_every": 1}, evaluate)
    assert metrics["scalars"]["selected_step"] == 2 and metrics["scalars"]["valid_recall_selected"] == 0.4
    assert model.meta["dpo"]["selected_step"] == 2
    assert weights_fingerprint(model.model) not in (weights_fingerprint(world.policy.model),)
    # the kept weights are step 2's, not the last step's: rerun without selection and compare
    last, _ = _stage(world, {"enabled": False}, None)
    assert weights_fingerprint(model.model) != weights_fingerprint(last.model)


def test_selection_uses_real_valid_recall(world):
    from align3gr_pipelines.preference.dpo_trainer import Selection, valid_recall_evaluator

    sel = Selection.from_params({"enabled": True, "n_users": 6, "beam_width": 8, "batch_size": 8}, "x")
    evaluate = valid_recall_evaluator(world.seq_eval_prompts, world.item_scids, world.policy.tokenizer, sel, 0)
    hits = evaluate(world.policy.model)
    assert hits.dtype == bool and len(hits) == 6
    assert np.array_equal(hits, evaluate(world.policy.model))  # deterministic: the same users
    with pytest.raises(ValueError, match="unknown selection parameter"):
        Selection.from_params({"every": 3}, "params x.selection")


def test_next_stage_reuses_the_selected_score_of_its_input_policy(world):
    from align3gr_pipelines.preference.dpo_trainer import Selection

    calls = []

    def evaluate(model):
        calls.append(weights_fingerprint(model))
        return 0.1 * len(calls)

    evaluate.key = "sample-1"
    cfg = DPOConfig(beta=0.5, learning_rate=5e-3, batch_size=4, **QUIET)
    sel = Selection.from_params({"enabled": True, "eval_every": 1}, "x")
    first, m1 = train_stage(world.policy, _random_pairs(world), cfg, 0, "sp_dpo_easy", "sft_model", evaluate=evaluate, selection=sel)
    assert len(calls) == 4 and first.meta["valid_recall"] == {"key": "sample-1", "score": m1["scalars"]["valid_recall_selected"]}
    second, m2 = train_stage(first, _random_pairs(world), cfg, 1, "sp_dpo_medium", "sp_dpo_model_easy", evaluate=evaluate, selection=sel)
    assert len(calls) == 4 + 3  # the input policy is not decoded again
    assert m2["scalars"]["valid_recall_input"] == m1["scalars"]["valid_recall_selected"]
    evaluate.key = "another-sample"
    train_stage(first, _random_pairs(world), cfg, 1, "sp_dpo_medium", "sp_dpo_model_easy", evaluate=evaluate, selection=sel)
    assert len(calls) == 7 + 4


def _hits(*users, n=40):
    h = np.zeros(n, dtype=bool)
    h[list(users)] = True
    return h


def test_with_max_p_value_only_a_significant_gain_replaces_the_input_policy(world):
    """Step 2 has the highest valid recall but differs from the input on 28 users (18 vs 10): not
    significant; step 1 gains 6 users and loses none (p = 1/64): it is kept."""
    from align3gr_pipelines.evaluation.valid_recall import sign_test_p

    base = _hits(*range(10))
    steps = [base, _hits(*range(10), *range(20, 26)), _hits(*range(10, 28)), base]
    assert sign_test_p(steps[1], base) == pytest.approx(1 / 64) and sign_test_p(steps[2], base) > 0.05
    assert steps[2].mean() > steps[1].mean()
    gated, m = _stage(world, {"enabled": True, "eval_every": 1, "max_p_value": 0.05}, lambda model, c=iter(steps): next(c))
    s = m["scalars"]
    assert s["selected_step"] == 1 and s["valid_recall_selected"] == 16 / 40 and s["valid_recall_best"] == 18 / 40
    assert s["selected_p_vs_input"] == pytest.approx(1 / 64)
    assert [at for at, _ in m["curves"]["valid_p_vs_input"]] == [1, 2, 3]
    # without the test the noisier, higher checkpoint wins
    plain, m2 = _stage(world, {"enabled": True, "eval_every": 1}, lambda model, c=iter(steps): next(c))
    assert m2["scalars"]["selected_step"] == 2 and "valid_p_vs_input" not in m2["curves"]


def test_with_max_p_value_no_significant_gain_keeps_the_input_policy(world):
    base = _hits(*range(10))
    steps = [base, _hits(*range(11)), _hits(*range(12)), _hits(*range(9), 30, 31)]  # +1, +2, +2 -1 users
    model, m = _stage(world, {"enabled": True, "eval_every": 1, "max_p_value": 0.05}, lambda model, c=iter(steps): next(c))
    assert m["scalars"]["selected_step"] == 0 and weights_fingerprint(model.model) == weights_fingerprint(world.policy.model)
    with pytest.raises(ValueError, match="max_p_value"):
        _stage(world, {"enabled": True, "max_p_value": 0.0}, None)
    with pytest.raises(ValueError, match="per-user hits"):  # a bare score cannot be tested
        _stage(world, {"enabled": True, "eval_every": 1, "max_p_value": 0.05}, lambda model: 0.5)


def test_sign_test_p():
    from align3gr_pipelines.evaluation.valid_recall import sign_test_p

    a = _hits(0, 1, n=4)
    assert sign_test_p(a, a) == 1.0
    assert sign_test_p(_hits(0, n=4), _hits(1, n=4)) == pytest.approx(3 / 4)  # b = c = 1: P(X >= 1 | n = 2)
    assert sign_test_p(_hits(0, 1, 2, n=4), _hits(n=4)) == pytest.approx(1 / 8)
    with pytest.raises(ValueError, match="shapes"):
        sign_test_p(_hits(n=3), _hits(n=4))


def test_confirm_half_selects_on_one_half_and_keeps_the_input_unless_the_other_half_agrees(world):
    """40 sampled users split into a select and a confirm half. Step 1 gains 8 users of the select half
    only; step 2 gains 4 of the select half and 8 of the confirm half. Selection sees the select half
    only, so it picks step 1; the confirm half shows no gain for it, so the input policy is kept."""
    from align3gr_pipelines.evaluation.valid_recall import confirm_half

    conf = confirm_half(40, 0)
    sel_users, conf_users = np.flatnonzero(~conf), np.flatnonzero(conf)
    base = _hits(*sel_users[:5], *conf_users[:5])
    step1 = base | _hits(*sel_users[5:13])
    step2 = base | _hits(*sel_users[5:9], *conf_users[5:13])
    outputs = iter([base, step1, step2, base])
    model, metrics = _stage(world, {"enabled": True, "eval_every": 1, "confirm_half": True}, lambda m: next(outputs))
    s = metrics["scalars"]
    assert [v for _, v in metrics["curves"]["valid_recall"]] == pytest.approx([5 / 20, 13 / 20, 9 / 20, 5 / 20])
    assert s["confirmed"] == 0.0 and s["selected_step"] == 0
    assert weights_fingerprint(model.model) == weights_fingerprint(world.policy.model)
    assert s["valid_recall_confirm_input"] == s["valid_recall_confirm_selected"] == 5 / 20
    # the same gains on both halves: step 1 is selected and confirmed
    step1 = base | _hits(*sel_users[5:13], *conf_users[5:13])
    outputs = iter([base, step1, step2, base])
    model, metrics = _stage(world, {"enabled": True, "eval_every": 1, "confirm_half": True, "max_p_value": 0.05},
                            lambda m: next(outputs))
    s = metrics["scalars"]
    assert s["selected_step"] == 1 and s["confirmed"] == 1.0 and s["confirm_p_vs_input"] == pytest.approx(1 / 256)
    assert s["train_seconds"] >= 0  # the input policy's evaluation runs before the training clock
    assert weights_fingerprint(model.model) != weights_fingerprint(world.policy.model)


def test_confirm_half_is_seeded_balanced_and_off_by_default():
    from align3gr_pipelines.evaluation.valid_recall import confirm_half
    from align3gr_pipelines.preference.dpo_trainer import Selection, confirmed_on_other_half

    assert confirm_half(41, 3).sum() == 20 and np.array_equal(confirm_half(41, 3), confirm_half(41, 3))
    assert not np.array_equal(confirm_half(41, 3), confirm_half(41, 4))
    assert Selection.from_params({}, "x").confirm_half is False
    assert confirmed_on_other_half(_hits(1, 2), _hits(1), None) == {"p": 0.5, "confirmed": True}
    assert confirmed_on_other_half(_hits(1, 2), _hits(1), 0.05)["confirmed"] is False
