"""benchmarks/gpu_study.py runs the study's node functions in DAG order without Kedro or MLflow, on a CPU
at tiny scale, and writes a report; its config loader reads an env exactly as Kedro's does."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[2]
# whole pipelines in a subprocess (which has its own 900 s limit) on 2 busy cores
pytestmark = pytest.mark.timeout(1200)
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_study  # noqa: E402
import quality_study  # noqa: E402
import study_pooled  # noqa: E402

# Runs the script as a machine without Kedro would: `import kedro` fails, so the kedro.pipeline stand-in wires
# the stages.
NO_KEDRO = """
import runpy, sys
for m in ("kedro", "kedro_datasets", "kedro_mlflow", "kedro_viz"):
    sys.modules[m] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-c", NO_KEDRO, str(REPO / "benchmarks/gpu_study.py"), "--env", "base", "--tiny",
         "--out", str(out), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


def test_tiny_cpu_run_without_kedro_reports_every_stage(tmp_path):
    report = _run(tmp_path, "--rows", "tiger", "--deadline", "600", "--results-dir", str(tmp_path / "study"),
                  "--set", "sft_train.trainer.max_steps=1")
    assert report["device"] == "cpu" and report["imported"] == {"kedro": False, "mlflow": False}
    stages = report["rows"]["tiger"]["stages"]
    assert list(stages) == ["data_prep", "tokenization", "sft_data", "sft_train", "evaluation"]
    assert all(s["seconds"] > 0 and s["node_seconds"] for s in stages.values())
    assert "train_sft_model" in stages["sft_train"]["node_seconds"]
    metrics = pd.DataFrame(report["rows"]["tiger"]["metrics"])
    assert {"sasrec", "sft", "most_popular"} <= set(metrics["model"])
    assert set(metrics["metric"]) == {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
    assert metrics["value"].between(0, 1).all()
    # the hybrid's info (its weight chosen on valid) is kept beside the stage's scalars
    hybrid = report["rows"]["tiger"]["stages"]["evaluation"]["scalars"]["eval_info_align3gr_cf"]
    assert hybrid["model"] == "align3gr_cf" and hybrid["seconds"] > 0
    # --set reaches every row (the tiny setting is 2 steps)
    assert report["rows"]["tiger"]["stages"]["sft_train"]["scalars"]["sft_train_metrics"]["global_step"] == 1
    # --results-dir: the row as a quality-study job leaves it, which study_pooled reads
    folder = tmp_path / "study" / "results" / "tiger" / "seed42"
    assert report["rows"]["tiger"]["results"] == str(folder)
    table = pd.read_parquet(folder / "metrics.parquet")
    assert {"sasrec", "sft"} <= set(table["model"]) and set(metrics["model"]) <= set(table["model"])
    per_case = study_pooled.per_case_of(tmp_path / "study", "tiger", "sft")
    assert per_case["seed"].eq(42).all() and per_case["user_id"].is_unique and len(per_case) > 0
    recall = table[(table["model"] == "sft") & (table["split"] == "test") & (table["metric"] == "recall@10")]["value"]
    assert per_case["recall@10"].mean() == pytest.approx(float(recall.iloc[0]))


def test_deadline_skips_stages_but_still_reports(tmp_path):
    report = _run(tmp_path, "--rows", "tiger", "--deadline", "0")
    stages = report["rows"]["tiger"]["stages"]
    assert len(stages) == 5 and all("deadline" in s.get("skipped", "") for s in stages.values())


@pytest.mark.parametrize("env", ["base", "ml_latest_small", "ml_latest_small_gpu", "instruments"])
def test_config_loader_matches_kedros(env):
    ours, _, _ = gpu_study.load_conf(env)
    assert ours == quality_study.load_parameters(env)


def test_gpu_env_uses_the_papers_data_settings():
    params, _, root = gpu_study.load_conf("ml_latest_small_gpu")
    data = params["sft_data"]
    assert (data["max_history"], data["target_stride"], data["max_train_examples"]) == (20, 1, None)
    assert params["tokenization"]["device"] == "auto" and params["sft_train"]["trainer"]["device"] == "auto"
    assert params["data_prep"]["source"] == "movielens" and root == "data/ml_latest_small_gpu"


def test_cached_stage_outputs_are_read_through_the_catalog(tmp_path):
    _, catalog, root = gpu_study.load_conf("base")
    table = pd.DataFrame({"item_id": ["a", "b"]})
    path = tmp_path / Path(catalog["items"]["filepath"]).relative_to(root)
    path.parent.mkdir(parents=True)
    table.to_parquet(path)
    pd.testing.assert_frame_equal(gpu_study.load_cached("items", catalog["items"], str(tmp_path), root), table)
    # an optional checkpoint that was never written reads as None (as the catalog's `optional: true` says)
    assert gpu_study.load_cached("sasrec_model", catalog["sasrec_model"], str(tmp_path), root) is None
    # dataset factories ("sp_dpo_model_{stage}") resolve as Kedro resolves them
    entry = gpu_study.catalog_entry(catalog, "sp_dpo_model_easy")
    assert entry["path"].endswith("06_models/sp_dpo_easy") and entry["optional"]
    assert gpu_study.load_cached("sp_dpo_model_easy", entry, str(tmp_path), root) is None
    assert gpu_study.catalog_entry(catalog, "no_such_dataset") is None
    with pytest.raises(FileNotFoundError, match="sc_tokenizer"):
        gpu_study.load_cached("sc_tokenizer", catalog["sc_tokenizer"], str(tmp_path), root)


def test_a_cached_stage_provides_only_what_later_stages_read():
    args = gpu_study.parse_args(["--env", "base", "--rows", "tiger", "--set", "evaluation.top_k=10"])
    assert args.set == {"evaluation.top_k": 10}
    study = gpu_study.Study.__new__(gpu_study.Study)
    needed = study._read_later("tiger", "tokenization")
    assert {"item_scids", "user_scids", "sasrec_model"} <= needed
    assert not {"item_semantic_embeddings", "item_cf_embeddings"} & needed  # only tokenization reads them
    with pytest.raises(SystemExit):
        gpu_study.parse_args(["--set", "evaluation.top_k"])  # no '='


def _bare_study(tmp_path: Path, *argv: str) -> "gpu_study.Study":
    study = gpu_study.Study.__new__(gpu_study.Study)
    study.args = gpu_study.parse_args(["--env", "base", "--work-dir", str(tmp_path / "work"), *argv])
    study.params, study.catalog, study.default_root = gpu_study.load_conf("base")
    study.memo, study.work_dir = {}, study.args.work_dir
    study.report = {"rows": {}}
    study.save = lambda: None
    return study


def test_sft_checkpoints_go_to_a_folder_of_the_run_and_stage(tmp_path, monkeypatch):
    study = _bare_study(tmp_path)
    seen: list[tuple[str, str]] = []
    monkeypatch.setattr(study, "elapsed", lambda: 0.0)
    monkeypatch.setattr(study, "_run_stage", lambda stage, params, values: (
        seen.append((stage, params["sft_train"]["trainer"]["output_dir"])) or {}, {"seconds": 1.0}))
    for row in ("full", "dpo_random", "tiger"):
        study.run_row(row)
    sft = [d for stage, d in seen if stage == "sft_train"]
    assert len(sft) == 2 and sft[0] != sft[1]  # dpo_random reuses full's SFT stage; tiger's data differ upstream
    assert all(Path(d).parent == tmp_path / "work" for d in sft)
    # the catalog's shared folder stays what other stages see
    assert {d for stage, d in seen if stage != "sft_train"} == {study.params["sft_train"]["trainer"]["output_dir"]}
    other = _bare_study(tmp_path / "b")
    assert other.stage_params("sft_train", other.row_params("full"), "k")["sft_train"]["trainer"]["output_dir"] \
        != study.stage_params("sft_train", study.row_params("full"), "k")["sft_train"]["trainer"]["output_dir"]


@pytest.mark.parametrize("scope, ran", [("stage", ["data_prep"]), ("row", ["data_prep", "tokenization", "sft_data",
                                                                           "sft_train", "evaluation"])])
def test_deadline_scope(tmp_path, monkeypatch, scope, ran):
    # the deadline passes while the first stage runs: per stage the rest is skipped, per row the row finishes
    study = _bare_study(tmp_path, "--rows", "tiger", "--deadline", "5", "--deadline-scope", scope)
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(study, "elapsed", lambda: next(clock))
    monkeypatch.setattr(study, "_run_stage", lambda stage, params, values: ({}, {"seconds": 1.0}))
    study.run_row("tiger")
    stages = study.report["rows"]["tiger"]["stages"]
    assert [s for s, info in stages.items() if "seconds" in info] == ran
    assert all("deadline" in info["skipped"] for s, info in stages.items() if s not in ran)
