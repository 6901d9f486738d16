"""The main job's log stays readable: a tiny run of the Makefile's `kedro run` command line in which a
deprecation warning raised on a call path through our code is an error, and none of the warnings that
used to fill the log (issue 14) is left in what it prints.

A deprecated call our code makes (the decoder's KV-cache argument, a renamed TrainingArguments field) raises
inside the call and fails the run; so does a deprecation that a new library release adds on a path we use,
which is how the bounds in pyproject.toml learn about the first incompatible release. Deprecations inside
third-party code that our code does not reach (e.g. one library's import of another) are left to the log:
they are not ours to fix, and they differ between the versions pyproject.toml allows. Known, harmless
third-party warnings are silenced by name in align3gr_pipelines.tracking.warning_filters (installed by settings.py).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# whole pipelines in a subprocess (which has its own 900 s limit) on 2 busy cores
pytestmark = pytest.mark.timeout(1200)

TINY = ",".join(
    [
        "data_prep.demo.n_users=60",
        "data_prep.demo.n_items=50",
        "tokenization.collaborative_encoder.epochs=1",
        "tokenization.phase1.epochs=1",
        "tokenization.phase2.epochs=1",
        "tokenization.rq_vae.kmeans_iters=3",
        "sft_data.max_train_examples=120",
        "sft_train.backbone.scratch.vocab_size=400",
        "sft_train.backbone.scratch.hidden_size=32",
        "sft_train.backbone.scratch.intermediate_size=64",
        "sft_train.backbone.scratch.num_hidden_layers=1",
        "sft_train.backbone.scratch.num_attention_heads=2",
        "sft_train.backbone.scratch.num_key_value_heads=2",
        "sft_train.trainer.max_steps=2",
        "sft_train.trainer.eval_steps=1",
        "sft_train.trainer.max_eval_examples=16",
        "sft_train.trainer.progress_bar=false",
        "sp_dpo_curriculum.prompts_per_stage=4",
        "sp_dpo_curriculum.n_negatives=3",
        "sp_dpo_curriculum.decoding.beam_width=4",
        "sp_dpo_curriculum.decoding.top_k=4",
        "rf_dpo.prompts.max_users=6",
        "rf_dpo.n_rejected=3",
        "rf_dpo.recommend.top_k=4",
        "rf_dpo.recommend.beam_width=4",
        "evaluation.beam_width=10",
        "evaluation.top_k=10",  # >= the largest of evaluation.ks
        "evaluation.max_users.valid=10",
        "evaluation.bootstrap.n_resamples=20",
        "evaluation.paired_test.n_permutations=50",
    ]
)

# Runs Kedro's CLI with every deprecation shown, and turns into an error each one whose call stack passes
# through our package (after warning_filters' known third-party entries, which settings.py puts first).
DRIVER = """
import os, sys, traceback, warnings
import kedro.framework.project  # sets up Kedro's logging, which captures warnings, before we wrap it
from kedro.framework.cli.cli import main
PKG = os.sep + "align3gr_pipelines" + os.sep
for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
    warnings.simplefilter("always", category)
shown = warnings.showwarning
def show(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
        files = [f.filename for f in traceback.extract_stack()[:-1]]
        ours = [i for i, f in enumerate(files) if PKG in f]
        # a library warning about itself while it is being imported is not a call of ours
        importing = ours and any(f.startswith("<frozen importlib") for f in files[ours[-1]:])
        if ours and not importing:
            raise message if isinstance(message, Warning) else category(message)
    shown(message, category, filename, lineno, file, line)
warnings.showwarning = show
sys.argv = ["kedro", *sys.argv[1:]]
main()
"""

# What issue 14 found in every `make run` log; none of it may come back.
GONE = ("past_key_values", "'--pipeline' is deprecated", "register_new_resolver", "Add type hints to the `predict`",
        "missing keys")


@pytest.fixture(scope="module")
def run_output(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("align3gr_clean_log")
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(REPO / ".telemetry", root / ".telemetry")
    (root / "src").mkdir()  # kedro wants the source folder; the code comes from the installed package
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # The Makefile's own command line, so a deprecated option there shows up here too.
    make_run = next(line.split("$(BIN)/kedro ", 1)[1] for line in (REPO / "Makefile").read_text().splitlines()
                    if line.startswith("\t$(BIN)/kedro run"))
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *make_run.split(), f"--params={TINY}"], cwd=root, env=env,
        capture_output=True, text=True, timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`kedro {make_run}` with our deprecations as errors failed:\n{out[-12000:]}"
    return out


def test_tiny_full_run_passes_with_our_deprecations_as_errors(run_output: str):
    done = re.findall(r"Completed (\d+) out of (\d+) tasks", " ".join(run_output.split()))
    assert done and done[-1][0] == done[-1][1], done[-1:]


def test_log_has_none_of_the_old_warnings(run_output: str):
    flat = " ".join(run_output.split())
    left = [text for text in GONE if text in flat]
    assert not left, f"{left} still in the log:\n{run_output[-12000:]}"
