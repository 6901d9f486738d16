"""`devices.free_cores`: the threads a CPU stage takes are the cores other processes leave free."""
from __future__ import annotations

import sys

import pytest

from align3gr_pipelines import devices as cpu_threads
from align3gr_pipelines.sft.trainer import cpu_threads as sft_threads


@pytest.mark.parametrize("others, expected", [(0.02, 2), (0.19, 2), (0.21, 1), (1.0, 1), (1.9, 1), (0.0, 2)])
def test_free_cores_counts_a_core_free_only_when_others_leave_it_nearly_idle(monkeypatch, others, expected):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(cpu_threads, "busy_elsewhere", lambda window_s=0.3: others)
    assert cpu_threads.free_cores() == expected


def test_without_proc_it_leaves_one_core_free(monkeypatch):
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(cpu_threads, "busy_elsewhere", lambda window_s=0.3: None)
    assert cpu_threads.free_cores() == 3


def test_busy_elsewhere_subtracts_this_process_from_the_machine(monkeypatch):
    # 2 CPUs, a 100-tick window per CPU (200 in all): the machine was busy 150 ticks, this process 60 of them.
    machine = iter([(1000, 5000, 2), (1150, 5200, 2)])
    own = iter([300, 360])
    monkeypatch.setattr(cpu_threads, "_machine_ticks", lambda: next(machine))
    monkeypatch.setattr(cpu_threads, "_own_ticks", lambda: next(own))
    monkeypatch.setattr(cpu_threads.time, "sleep", lambda s: None)
    assert cpu_threads.busy_elsewhere() == pytest.approx(0.9)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_on_linux_it_reads_the_machine():
    others = cpu_threads.busy_elsewhere(0.05)
    assert others is not None and 0.0 <= others <= cpu_threads.usable_cores() + 1
    assert 1 <= cpu_threads.free_cores(0.05) <= cpu_threads.usable_cores()


def test_the_sft_setting(monkeypatch):
    monkeypatch.setattr("align3gr_pipelines.sft.trainer.torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("align3gr_pipelines.sft.trainer.free_cores", lambda: 7)
    assert sft_threads("auto") == 7 and sft_threads(3) == 3 and sft_threads("2") == 2 and sft_threads(None) is None
    for bad in (0, -1, "x", True, 1.5):
        with pytest.raises(ValueError, match="sft_train.trainer.torch_threads"):
            sft_threads(bad)
