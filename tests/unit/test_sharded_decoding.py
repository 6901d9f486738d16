"""lm/sharded_decoding: decoding across processes returns exactly one process's tensors.

Scores are compared with torch.equal, not allclose: every rank decodes whole batches of the single process
(same prompts, padding and shapes, one torch thread on both sides), so the arithmetic is the same and so are
the bits; a tie between two items is therefore broken the same way too, and the item lists must be equal as
they are. (Splitting rows instead of batches fails this here: other padding, other last bits of the scores.)
Processes talk over loopback only (GLOO_SOCKET_IFNAME=lo), each launch under a timeout."""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from align3gr_pipelines import torchrun
from align3gr_pipelines.lm import sharded_decoding as sd
from align3gr_pipelines.lm.constrained_decoding import SCIDCatalog, decode_prompts
from align3gr_pipelines.lm.rec_lm import RecLM

N_PROMPTS = 7  # odd, with batch_size 2: four batches, ranks of 4 and 3 rows
DECODE = {"beam_width": 6, "top_k": 5, "batch_size": 2}


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs by default
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_world():
    """A tiny random Llama (seeded), its item catalogue and N_PROMPTS SEQ prompts of different lengths."""
    from tests.pipelines.evaluation.conftest import make_dataset, make_rec_lm  # not in the spawned ranks: slow to import

    data = make_dataset(n_users=8, n_items=30)
    rec = make_rec_lm(data["tokenizer"], seed=0, stage="sft")
    catalog = SCIDCatalog.from_scids(data["item_scids"], rec.tokenizer)
    return rec, catalog, data["seq_eval_prompts"]["prompt"].tolist()[:N_PROMPTS]


@pytest.fixture(scope="module")
def world():
    rec, catalog, prompts = tiny_world()
    with one_thread():
        reference = decode_prompts(rec, prompts, catalog, **DECODE)
    return rec, catalog, prompts, reference


@pytest.fixture
def loopback(monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")


def assert_same(got, want):
    assert got[0].dtype == want[0].dtype == torch.long and got[1].dtype == want[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    assert torch.equal(got[1], want[1]), (got[1] - want[1]).abs().max()


# ---- (a) splitting ----


@pytest.mark.parametrize("n, world_size", [(0, 3), (2, 5), (7, 2), (10, 3), (9, 3), (1, 1)])
def test_shard_indices_cover_every_row_once_in_order(n, world_size):
    blocks = [sd.shard_indices(n, r, world_size) for r in range(world_size)]
    assert all(b.dtype == np.int64 for b in blocks)
    assert np.concatenate(blocks).tolist() == list(range(n))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


@pytest.mark.parametrize("rank, world_size", [(-1, 2), (2, 2), (0, 0)])
def test_shard_indices_refuse_a_bad_rank(rank, world_size):
    with pytest.raises(ValueError, match="need 0 <= rank < world_size"):
        sd.shard_indices(5, rank, world_size)
    with pytest.raises(ValueError, match="must be >= 0"):
        sd.shard_indices(-1, 0, 1)


def test_rank_rows_deal_whole_batches_of_one_process(world):
    rec, _, prompts, _ = world
    rows = [sd.rank_rows(rec.tokenizer, prompts, 2, r, 2) for r in range(2)]
    assert sorted(rows[0] + rows[1]) == list(range(N_PROMPTS)) and [len(r) for r in rows] == [4, 3]
    lengths = [len(rec.tokenizer(p)["input_ids"]) for p in prompts]
    for r in rows:  # sorted by length, so decode_prompts forms the same batches again
        assert [lengths[i] for i in r] == sorted(lengths[i] for i in r)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sd.rank_rows(rec.tokenizer, prompts, 0, 0, 2)
    items, scores = sd.merge([([2, 0], torch.tensor([[20], [0]]), torch.tensor([[2.0], [0.0]])), ([1], torch.tensor([[10]]), torch.tensor([[1.0]]))], 3)
    assert items.flatten().tolist() == [0, 10, 20] and scores.flatten().tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(RuntimeError, match="not each of 0..2 once"):
        sd.merge([([0, 0, 1], torch.zeros(3, 1), torch.zeros(3, 1))], 3)


# ---- (b) through torchrun ----


def test_two_torchrun_ranks_return_one_process_tensors(world, loopback, tmp_path):
    rec, catalog, prompts, reference = world
    got = sd.decode_prompts_sharded(rec, prompts, catalog, nproc=2, timeout_s=120, work_dir=tmp_path, **DECODE)
    assert_same(got, reference)
    assert list(tmp_path.iterdir()) == []  # the job directory is gone


def test_a_failed_rank_and_a_timeout_raise_clear_errors(tmp_path, loopback, monkeypatch):
    with pytest.raises(RuntimeError, match=r"evaluation.decoding: torchrun with 2 ranks failed \(exit code"):
        torchrun.run_torchrun("align3gr_pipelines.no_such_module", tmp_path, 2, 120, "evaluation.decoding: torchrun",
                              "evaluation.decoding.launch_timeout_s")
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def spy(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(torchrun.subprocess, "Popen", spy)
    # torchrun does not even import torch in 0.3 s, so the limit is always hit
    with pytest.raises(RuntimeError, match=r"inference.decoding: torchrun did not finish within inference.decoding.launch_timeout_s=0.3 s"):
        torchrun.run_torchrun(sd.MODULE, tmp_path, 2, 0.3, "inference.decoding: torchrun", "inference.decoding.launch_timeout_s")
    assert started[0].returncode is not None
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left
        os.killpg(started[0].pid, 0)


def test_bad_settings_are_named(world):
    rec, catalog, prompts, _ = world
    with pytest.raises(ValueError, match=r"evaluation.decoding.nproc_per_node must be an integer >= 1"):
        sd.decode_prompts_sharded(rec, prompts, catalog, nproc=0, where="evaluation.decoding", **DECODE)
    with pytest.raises(ValueError, match=r"evaluation.decoding.launch_timeout_s must be > 0 or null"):
        sd.decode_prompts_sharded(rec, prompts, catalog, nproc=2, timeout_s=0, where="evaluation.decoding", **DECODE)


def test_a_lora_model_travels_to_the_ranks_exactly(world, tmp_path):
    """What a rank loads (`write_job` → `read_job`: save_pretrained, from_pretrained in the weights' dtype)
    decodes the same tensors as the LoRA model in memory; without the meta that names its base it is refused."""
    peft = pytest.importorskip("peft")
    from tests.pipelines.evaluation.conftest import make_rec_lm

    rec, catalog, prompts, _ = world
    rec.model.save_pretrained(str(tmp_path / "base"))
    scid_rows = sorted(set(catalog.token_ids.flatten().tolist()))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                             trainable_token_indices={"embed_tokens": scid_rows})
    torch.manual_seed(1)
    lora = peft.get_peft_model(make_rec_lm(rec.tokenizer, seed=0, stage="sft").model, config).eval()
    with torch.no_grad():  # SCID rows away from the base's, so that a lost adapter would show
        for name, p in lora.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p))
    meta = {"peft": True, "base_model": {"name_or_path": str(tmp_path / "base")}, "stage": "sft"}
    policy = RecLM(model=lora, tokenizer=rec.tokenizer, meta=meta)
    with pytest.raises(ValueError, match=r"sp_dpo_curriculum.decoding: a PEFT .* only as a RecLM whose meta names its base"):
        sd.write_job(tmp_path, RecLM(model=lora, tokenizer=rec.tokenizer, meta={}), prompts, catalog, {}, "sp_dpo_curriculum.decoding")
    sd.write_job(tmp_path, policy, prompts, catalog, {}, "x")
    loaded, *_ = sd.read_job(tmp_path, "cpu")
    with one_thread():
        assert_same(decode_prompts(loaded, prompts, catalog, **DECODE), decode_prompts(policy, prompts, catalog, **DECODE))
        assert not torch.equal(decode_prompts(rec, prompts, catalog, **DECODE)[1], decode_prompts(policy, prompts, catalog, **DECODE)[1])


# ---- (c) one process ----


def test_one_process_is_decode_prompts_without_a_launch(world, monkeypatch):
    rec, catalog, prompts, reference = world
    monkeypatch.setattr(torchrun.subprocess, "Popen", lambda *a, **k: pytest.fail("nproc=1 must not launch torchrun"))
    with one_thread():
        assert_same(sd.decode_prompts_sharded(rec, prompts, catalog, nproc=1, **DECODE), reference)
        assert_same(sd.decode_in_group(rec, prompts, catalog, **DECODE), reference)  # no process group: one process


# ---- (d) inside a process group ----


def _group_rank(rank: int, job: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{job}/store", rank=rank, world_size=2)
    try:
        rec, prompts, catalog, _ = sd.read_job(Path(job), "cpu")
        torch.save(sd.decode_in_group(rec, prompts, catalog, **DECODE), f"{job}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_decode_in_group_gives_every_rank_the_whole_result(world, loopback, tmp_path):
    rec, catalog, prompts, reference = world
    sd.write_job(tmp_path, rec, prompts, catalog, {}, "test")
    ctx = mp.start_processes(_group_rank, args=(str(tmp_path),), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("decode_in_group: the 2 gloo ranks did not finish within 120 s")
    for rank in range(2):
        assert_same(torch.load(tmp_path / f"rank{rank}.pt"), reference)

