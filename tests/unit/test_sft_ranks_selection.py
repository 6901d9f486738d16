"""SFT's valid-recall selection inside torchrun ranks (issue 27 item 3) and the FSDP / DeepSpeed passthrough.

Equalities tested:
- scorer: on one fixed model, the recall (and the select/confirm halves) that 2 gloo ranks compute, each
  decoding only its share of the users (one process's decode batches, dealt round-robin) and all-reducing
  the hits, equals the single-process scorer's value exactly, on both ranks, for an even split, an uneven
  one and one with an idle rank;
- end to end: a 2-process `fit_sft` (the real torchrun launcher) selecting by valid recall + confirm_half logs
  a recall curve whose every point equals the single-process score of that step's checkpoint, and keeps the
  checkpoint with the best select-half recall.
- and, in the same slow test, a 1-process fit with the same global batch logs the same recall curves (select
  and confirm halves) and keeps the same step: its training equals the 2-process one only up to float
  rounding (gradients are reduced in another order), so this equality holds while rounding flips no hit.
"""
from __future__ import annotations

import datetime
import json
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from align3gr_pipelines.lm.rec_lm import RecLM
from align3gr_pipelines.pipelines.sft_data.nodes import build_seq_eval_prompts, build_sft_examples
from align3gr_pipelines.sft.hf_trainer import training_arguments
from align3gr_pipelines.sft.trainer import fit_sft, recall_scorer, valid_recall_job
from align3gr_pipelines.sft.valid_recall_ranks import scorer_from_spec
from tests.pipelines.sft_data.toy_data import make_tables
from tests.pipelines.sft_train.conftest import INPUTS, ROOT, tiny_train_params

SEED = 0
# (n_users, batch_size, confirm_half) the scorer test runs: 7 users in batches of 4 + 3 (one a rank), all
# 20 users in batches of 8 + 8 + 4 (rank 0 decodes two), 1 user (rank 1 idle).
CASES = [(7, 4, True), (None, 8, False), (1, 64, False)]


@pytest.fixture(scope="module")
def toy() -> dict:
    import yaml

    tables = make_tables(n_users=20, n_items=30, min_len=5, max_len=9, seed=11)
    params = yaml.safe_load((ROOT / "conf/base/parameters_sft_data.yml").read_text())["sft_data"]
    params.update(max_train_examples=160, targets_per_user=2, target_stride=1, max_history=5)
    examples, _ = build_sft_examples(*(tables[k] for k in INPUTS), params, SEED)
    seq = build_seq_eval_prompts(tables["valid"], tables["test"], tables["item_scids"], tables["user_scids"], params)
    return {**tables, "examples": examples, "seq_eval_prompts": seq}


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> Path:
    """A tiny RecLM after a few steps (a fresh one scores every item nearly alike), saved for the ranks."""
    work = tmp_path_factory.mktemp("fixed")
    rec, _ = fit_sft(toy["examples"], toy["item_scids"], toy["user_scids"], tiny_train_params(work / "w"), seed=SEED)
    rec.save_pretrained(str(work / "model"))
    return work / "model"


def selection(n_users, batch_size, confirm) -> dict:
    return {"metric": "valid_recall", "k": 10, "n_users": n_users, "beam_width": 20, "batch_size": batch_size,
            "confirm_half": confirm}


def one_process_scores(model_dir: Path, toy: dict) -> list:
    rec = RecLM.from_pretrained(str(model_dir), device="cpu")
    rec.model.eval()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as a torchrun rank
    try:
        return [recall_scorer(rec, toy["item_scids"], toy["seq_eval_prompts"], selection(*case), SEED)(rec.model)
                for case in CASES]
    finally:
        torch.set_num_threads(previous)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, model_dir: str, specs: list, out_dir: str) -> None:
    """One gloo rank: score the fixed model with each spec, recording how many users this rank decoded.
    Rank 0 runs in the test process itself (one interpreter start fewer), so it leaves no state behind."""
    import torch.distributed as dist

    from align3gr_pipelines.evaluation import valid_recall

    real, threads, decoded = valid_recall.hits_at_k, torch.get_num_threads(), []

    def counting(rec_lm, sample, *args):
        decoded.append(len(sample))
        return real(rec_lm, sample, *args)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=90))
    valid_recall.hits_at_k = counting
    torch.set_num_threads(1)  # as a torchrun rank
    try:
        rec = RecLM.from_pretrained(model_dir, device="cpu")
        rec.model.eval()
        scores, per_case = [], []
        for spec in specs:
            decoded.clear()
            value = scorer_from_spec(spec, rec.tokenizer)(rec.model)
            scores.append(list(value) if isinstance(value, tuple) else value)
            per_case.append(sum(decoded))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"scores": scores, "decoded": per_case}))
    finally:
        valid_recall.hits_at_k = real
        torch.set_num_threads(threads)
        dist.destroy_process_group()


def run_two_ranks(*args, timeout_s: float = 120) -> None:
    """Rank 1 in a spawned process, rank 0 here; a stuck peer ends in the group's 90 s timeout."""
    peer = mp.get_context("spawn").Process(target=_rank_main, args=(1, 2, *args), daemon=True)
    peer.start()
    try:
        _rank_main(0, 2, *args)
        peer.join(timeout_s)
        assert peer.exitcode == 0, f"rank 1 exited with {peer.exitcode}"
    finally:
        if peer.is_alive():
            peer.kill()
            peer.join()


def test_two_ranks_score_their_shares_and_agree_with_one_process_exactly(toy, trained, tmp_path):
    expected = one_process_scores(trained, toy)
    specs = [valid_recall_job(toy["item_scids"], toy["seq_eval_prompts"], selection(*case), SEED) for case in CASES]
    run_two_ranks(_free_port(), str(trained), specs, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = [list(v) if isinstance(v, tuple) else v for v in expected]
    assert ranks[0]["scores"] == ranks[1]["scores"] == expected  # exact: sums of integer hits
    n_all = len(toy["seq_eval_prompts"].query("split == 'valid'")["user_id"].unique())
    assert n_all == 20
    # each rank decoded only its own share: whole batches of one process, round-robin
    assert [ranks[0]["decoded"], ranks[1]["decoded"]] == [[4, 12, 1], [3, 8, 0]]
    select, confirm = expected[0]
    assert 0 < select < 1 or 0 < confirm < 1  # a model that separates users, not all hits or all misses
    assert expected[2] in (0.0, 1.0)


def test_the_job_spec_survives_a_weights_only_load_and_scores_as_the_caller(toy, trained, tmp_path):
    """The ranks read data.pt with torch.load's weights_only default: the spec is plain lists."""
    spec = valid_recall_job(toy["item_scids"], toy["seq_eval_prompts"], selection(*CASES[0]), SEED)
    torch.save({"valid_recall": spec}, tmp_path / "data.pt")
    loaded = torch.load(tmp_path / "data.pt")["valid_recall"]
    rec = RecLM.from_pretrained(str(trained), device="cpu")
    rec.model.eval()
    caller = recall_scorer(rec, toy["item_scids"], toy["seq_eval_prompts"], selection(*CASES[0]), SEED)(rec.model)
    assert scorer_from_spec(loaded, rec.tokenizer)(rec.model) == caller
    assert isinstance(caller, tuple) and len(caller) == 2


@pytest.mark.slow  # two torchrun ranks each import the Trainer stack, then a 1-process fit: ~30-45 s on 2 loaded cores
def test_two_process_fit_selects_by_valid_recall_scored_in_the_ranks(toy, tmp_path, caplog):
    run = {"max_steps": 4, "eval_steps": 2, "launch_timeout_s": 300, "model_selection": selection(8, 4, True)}
    params = tiny_train_params(tmp_path / "work", batch_size=8, nproc_per_node=2, keep_checkpoints=True, **run)
    rec, metrics = fit_sft(toy["examples"], toy["item_scids"], toy["user_scids"], params, seed=SEED,
                           seq_eval_prompts=toy["seq_eval_prompts"])
    assert "single-process only" not in caplog.text  # the old fallback to eval_loss
    info, curves, scalars = metrics["info"], metrics["curves"], metrics["scalars"]
    assert info["world_size"] == 2 and info["model_selection"] == "eval_recall@10"
    assert [s for s, _ in curves["valid_recall@10"]] == [s for s, _ in curves["valid_recall@10_confirm"]] == [2, 4]
    # every point of the curve is the single-process score of that step's checkpoint
    work = tmp_path / "work"
    tokenizer = RecLM.from_pretrained(str(work / "init"), device="cpu").tokenizer
    from transformers import AutoModelForCausalLM

    for (step, select), (_, confirm) in zip(curves["valid_recall@10"], curves["valid_recall@10_confirm"]):
        model = AutoModelForCausalLM.from_pretrained(str(work / f"checkpoint-{step}")).eval()
        one = one_process_scores_of(RecLM(model=model, tokenizer=tokenizer, meta={}), toy, selection(8, 4, True))
        assert one == (select, confirm), step
    # the model returned is the best checkpoint by the select half (first best), and reports its confirm half
    best_step = next(s for s, v in curves["valid_recall@10"] if v == max(v for _, v in curves["valid_recall@10"]))
    assert scalars["best_valid_recall@10"] == dict(curves["valid_recall@10"])[best_step]
    assert scalars["selected_valid_recall@10_confirm"] == dict(curves["valid_recall@10_confirm"])[best_step]
    rec.model.eval()
    assert one_process_scores_of(rec, toy, selection(8, 4, True)) == (scalars["best_valid_recall@10"],
                                                                     scalars["selected_valid_recall@10_confirm"])
    # One process with the same global batch (16 = 2 ranks x 8, the same examples per step) trains the same
    # model up to float rounding (gradients summed in another order: eval losses differ by ~1e-6 here), so at
    # this scale it logs the same recall curves and keeps the same step. A check of the setup, not of the
    # scorer: the equalities above are exact by construction, this one only while rounding flips no hit.
    _, single = fit_sft(toy["examples"], toy["item_scids"], toy["user_scids"],
                        tiny_train_params(tmp_path / "single", batch_size=16, **run), seed=SEED,
                        seq_eval_prompts=toy["seq_eval_prompts"])
    for name in ("valid_recall@10", "valid_recall@10_confirm"):
        assert single["curves"][name] == curves[name], name
    assert single["scalars"]["best_valid_recall@10"] == scalars["best_valid_recall@10"]
    assert single["scalars"]["selected_valid_recall@10_confirm"] == scalars["selected_valid_recall@10_confirm"]


def one_process_scores_of(rec: RecLM, toy: dict, sel: dict):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return recall_scorer(rec, toy["item_scids"], toy["seq_eval_prompts"], sel, SEED)(rec.model)
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------ FSDP / DeepSpeed passthrough


def _trainer_cfg(tmp_path: Path, **extra) -> dict:
    return tiny_train_params(tmp_path / "w", device="cpu", **extra)["trainer"]


def test_fsdp_settings_reach_training_arguments_only_when_set(tmp_path):
    plain = training_arguments(_trainer_cfg(tmp_path), str(tmp_path / "o"), 0)
    assert not plain.fsdp and plain.deepspeed is None and plain.fsdp_plugin_args is None
    cfg = _trainer_cfg(tmp_path, fsdp=True, fsdp_config={"fsdp_transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = training_arguments(cfg, str(tmp_path / "o"), 0)
    assert args.fsdp and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.fsdp_plugin_args is not None
    # TrainingArguments renames fsdp_config keys in place: the parameters themselves stay as written
    assert cfg["fsdp_config"] == {"fsdp_transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    with pytest.raises(ValueError, match="fsdp_config is set but sft_train.trainer.fsdp is not"):
        training_arguments(_trainer_cfg(tmp_path, fsdp_config={"min_num_params": 1}), str(tmp_path / "o"), 0)


def test_deepspeed_without_the_package_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    with pytest.raises(ImportError, match="sft_train.trainer.deepspeed is set but the deepspeed package"):
        training_arguments(_trainer_cfg(tmp_path, deepspeed={"train_batch_size": "auto"}), str(tmp_path / "o"), 0)


def test_sharded_weights_and_rank_decoded_selection_are_refused_before_any_work(toy, tmp_path):
    params = tiny_train_params(tmp_path / "w", nproc_per_node=2, fsdp=True, model_selection=selection(8, 4, False))
    with pytest.raises(ValueError, match="model_selection.metric: eval_loss"):
        fit_sft(toy["examples"], toy["item_scids"], toy["user_scids"], params, seed=SEED,
                seq_eval_prompts=toy["seq_eval_prompts"])
    assert not (tmp_path / "w").exists()
