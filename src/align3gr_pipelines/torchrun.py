"""Launching a job on N torchrun ranks from a stage's own process, shared by distributed SFT (`sft.launcher`),
distributed DPO (`preference.dpo_launcher`) and sharded decoding (`lm.sharded_decoding`).

The caller writes a job directory, runs ``python -m torch.distributed.run --standalone --nproc_per_node=N -m
<module> <job>`` and reads what rank 0 wrote back. torchrun runs in a session of its own, so that a timeout, an
error or an interrupt ends torchrun *and* its ranks: a hung gloo rank otherwise outlives a killed torchrun.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def run_torchrun(
    module: str, job: Path, nproc: int, timeout_s: float | None, what: str, timeout_param: str,
    env: dict[str, str] | None = None, expect: str | None = None,
) -> None:
    """Run `module` on `nproc` ranks with `job` as its one argument and wait. ``what`` names the work in errors
    ("sft_train: distributed training"); ``timeout_param`` is the setting that holds `timeout_s` (None: no
    limit); ``expect``: a file rank 0 writes into `job` last, whose absence after exit 0 is an error too."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module, str(job)]
    log.info("%s: launching %s (timeout %s s)", what, " ".join(cmd), timeout_s)
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)
    try:
        returncode = proc.wait(timeout=None if timeout_s is None else float(timeout_s))
    except subprocess.TimeoutExpired:
        end_process_group(proc)
        raise RuntimeError(
            f"{what} did not finish within {timeout_param}={float(timeout_s):g} s; its processes were ended "
            "(raise the limit for longer runs, or null for none)"
        ) from None
    except BaseException:
        end_process_group(proc)
        raise
    if returncode != 0:
        raise RuntimeError(f"{what} with {nproc} ranks failed (exit code {returncode}); see the log above")
    if expect is not None and not (job / expect).is_file():
        raise RuntimeError(f"{what}: torchrun exited 0 but rank 0 wrote no {expect}; see the log above")


def end_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM, a grace period, then SIGKILL to the process group `proc` leads (started in a new session):
    ranks that outlive torchrun are ended too."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
