"""`torchrun.run_torchrun`, the one launcher of distributed SFT, DPO and sharded decoding: a run that exits 0
without the file rank 0 must write is an error that names it. (Timeouts and failed ranks: the callers' tests.)"""
from __future__ import annotations

import pytest

from align3gr_pipelines import torchrun


def test_exit_0_without_rank_0s_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    # `python -m this` ignores its argument, prints and exits 0: a rank that writes nothing
    with pytest.raises(RuntimeError, match=r"sp_dpo_easy: distributed DPO: torchrun exited 0 but rank 0 wrote no result.json"):
        torchrun.run_torchrun("this", tmp_path, 1, 120, "sp_dpo_easy: distributed DPO", "training.launch_timeout_s",
                              expect="result.json")
    (tmp_path / "result.json").write_text("{}")
    torchrun.run_torchrun("this", tmp_path, 1, 120, "sp_dpo_easy: distributed DPO", "training.launch_timeout_s",
                          expect="result.json")
