"""A kill while the Trainer writes `checkpoint-N` must not break the next run's resume, and the torchrun
launcher gives up (ending every rank) after `launch_timeout_s`."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from align3gr_pipelines import torchrun
from align3gr_pipelines.sft import launcher
from align3gr_pipelines.sft.hf_trainer import last_complete_checkpoint
from align3gr_pipelines.sft.trainer import fit_sft

from .conftest import tiny_train_params
from .test_sft_train import Killed, _kill_at


def test_last_complete_checkpoint_skips_and_removes_half_written_ones(tmp_path):
    assert last_complete_checkpoint(tmp_path / "absent") is None
    for step, complete in ((3, True), (10, True), (20, False), (30, False)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 8)
        if complete:
            (d / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()  # not a step number: ignored
    # by step number, not by name: checkpoint-10 is newer than checkpoint-3
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-3", "checkpoint-x"]


def test_resume_survives_a_kill_while_a_checkpoint_was_half_written(tmp_path, toy, examples):
    params = tiny_train_params(tmp_path / "work", max_steps=8, eval_steps=3)
    with pytest.raises(Killed):
        fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0, callbacks=[_kill_at(5)])
    work = Path(params["trainer"]["output_dir"])
    # the kill came while checkpoint-6 was being written: its weights are there, its trainer state is not
    half = work / "checkpoint-6"
    shutil.copytree(work / "checkpoint-3", half)
    (half / "trainer_state.json").unlink()
    resumed, metrics = fit_sft(examples, toy["item_scids"], toy["user_scids"], params, seed=0)
    assert metrics["info"]["resumed_from_step"] == 3
    assert metrics["scalars"]["global_step"] == 8


def test_the_torchrun_launcher_times_out_and_ends_its_process_group(tmp_path, monkeypatch):
    started: list[subprocess.Popen] = []
    real_popen = subprocess.Popen

    def spy(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(torchrun.subprocess, "Popen", spy)
    # torchrun does not even import torch in 0.5 s, so the limit is always hit
    with pytest.raises(RuntimeError, match=r"launch_timeout_s=0.5 s"):
        launcher.fit_distributed(None, [], [], {"launch_timeout_s": 0.5}, 0, tmp_path, 2)
    assert len(started) == 1 and started[0].returncode is not None
    with pytest.raises(ProcessLookupError):  # nothing of its process group is left
        os.killpg(started[0].pid, 0)
    with pytest.raises(ValueError, match="launch_timeout_s must be > 0"):
        launcher.fit_distributed(None, [], [], {"launch_timeout_s": 0}, 0, tmp_path, 2)
