"""The study's machine-readable results (docs/results_<env>.json): every <run>/<model>, mean, 95% t-CI and
per-seed values, on hand-made finished jobs."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quality_study  # noqa: E402


def _job(out: Path, run: str, seed: int, values: dict[str, float]) -> None:
    d = out / "results" / run / f"seed{seed}"
    d.mkdir(parents=True)
    rows = [{"model": m, "split": "test", "metric": "recall@10", "value": v, "n_users": 610} for m, v in values.items()]
    pd.DataFrame(rows).to_parquet(d / "metrics.parquet")


def _sft_metrics(valid_recall: float, loss: float) -> dict:
    return {"scalars": {"best_valid_recall@10": valid_recall, "best_eval_loss": loss, "global_step": 100.0,
                        "tokens_per_s": 5000.0}, "curves": {}}


def test_results_json_has_every_run_model_with_mean_ci_and_seeds(tmp_path):
    for seed, (sas, sft, rf) in zip((42, 43, 44), ((0.1, 0.05, 0.06), (0.2, 0.07, 0.07), (0.3, 0.09, 0.11))):
        _job(tmp_path, "full", seed, {"sasrec": sas, "sft": sft, "rf_dpo_hard": rf})
    _job(tmp_path, "sft_seq", 42, {"sft": 0.08})
    doc = quality_study.results_json(tmp_path, "ml_latest_small", "cmd")
    assert doc["dataset"] == "ml_latest_small" and doc["seeds"] == [42, 43, 44]
    assert set(doc["rows"]) == {"full/sasrec", "full/sft", "full/rf_dpo_hard", "sft_seq/sft"}
    r = doc["rows"]["full/sasrec"]["test"]["recall@10"]
    # mean 0.2, sd 0.1, t(0.975, df=2) = 4.302653 -> half-width 4.302653 * 0.1 / sqrt(3) = 0.248414
    assert r["mean"] == pytest.approx(0.2)
    assert r["ci95"] == pytest.approx([0.2 - 0.248414, 0.2 + 0.248414], abs=1e-6)
    assert r["per_seed"] == pytest.approx({"42": 0.1, "43": 0.2, "44": 0.3})
    one = doc["rows"]["sft_seq/sft"]["test"]["recall@10"]
    assert one["mean"] == pytest.approx(0.08) and one["ci95"] is None  # one seed: no interval
    # Paired SP-DPO -> RF-DPO etc. need their lines; SASRec -> full is there: per-seed rf - sasrec.
    pair = next(p for p in doc["paired_differences"] if p["b"].endswith("Align3GR (full)") and p["a"].endswith("SASRec")
                and p["metric"] == "recall@10")
    assert pair["per_seed"] == pytest.approx({"42": -0.04, "43": -0.13, "44": -0.19})
    json.dumps(doc)  # serialisable as is


def test_timings_table_shows_cpu_time_when_recorded(tmp_path):
    d = tmp_path / "results" / "full" / "seed42"
    d.mkdir(parents=True)
    (d / "timings.json").write_text(json.dumps({
        "sft_train": {"wall_s": 1246.8, "cpu_s": 700.2, "max_rss_mb": 1274.5},
        "data_prep": {"wall_s": 35.1, "max_rss_mb": 718.8, "cached": True},  # an older record without cpu_s
    }))
    row = quality_study._timings_table(tmp_path)[2]
    assert "1247 s (CPU 700 s), 1274 MB" in row and "35 s (cached), 719 MB" in row


def test_means_equal_up_to_summation_order_compare_as_equal():
    a = (sum([0.0803, 0.0689, 0.0541]) / 3, 0.03)
    b = (math.nextafter(a[0], 1.0), 0.02)  # the same 124 hits, one bit apart
    assert b[0] != a[0] and quality_study._compare(a, b) == "equal"
    assert quality_study._compare(a, (a[0] + 0.001, 0.0)).startswith("higher")


def test_sft_selection_sits_beside_test_in_the_json_and_the_report(tmp_path):
    for seed, (valid, test) in zip((42, 43, 44), ((0.07, 0.08), (0.08, 0.06), (0.09, 0.07))):
        _job(tmp_path, "full", seed, {"sasrec": 0.1, "sft": test})
        (tmp_path / "results" / "full" / f"seed{seed}" / quality_study.SELECTION_FILE).write_text(
            json.dumps(quality_study.sft_selection(_sft_metrics(valid, 2.0))))
    _job(tmp_path, "sft_seq", 42, {"sft": 0.05})  # finished before selection was recorded: no entry, no error
    doc = quality_study.results_json(tmp_path, "ml_latest_small", "cmd")
    sel = doc["rows"]["full/sft"]["valid_selection"]
    assert set(sel) == {"best_valid_recall@10", "best_eval_loss", "global_step"}  # tokens_per_s is not a choice
    assert sel["best_valid_recall@10"]["mean"] == pytest.approx(0.08)
    assert sel["best_valid_recall@10"]["per_seed"] == pytest.approx({"42": 0.07, "43": 0.08, "44": 0.09})
    assert "valid_selection" not in doc["rows"]["sft_seq/sft"] and "valid_selection" not in doc["rows"]["full/sasrec"]
    table = quality_study._selection_table(tmp_path)
    assert len(table) == 3 and table[2].startswith("| full | 42,43,44 | 0.0800 ± ")
    assert "0.0700 / 0.0800 / 0.0900" in table[2] and table[2].endswith("| 0.0700 ± 0.0248 |")


def test_a_finished_job_gets_its_selection_from_the_cached_sft_stage(tmp_path):
    import argparse

    args = argparse.Namespace(env="base", out=str(tmp_path), quick=False, dry_run=False, stage_timeout=None,
                              keep_workspaces=False, threads=None, shared_data=str(tmp_path), reuse_across_code=True)
    study = quality_study.Study(args)
    run = quality_study.RUNS["sft_seq"]
    key = study.stage_keys(run, 42)["sft_train"]
    cached = tmp_path / "cache" / "sft_train" / key / "files" / "08_reporting" / "sft_train" / "metrics.json"
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps(_sft_metrics(0.0705, 1.981)))
    for seed in (42, 43):
        _job(tmp_path, "sft_seq", seed, {"sft": 0.0787})
    study.run_job(run, 42)
    study.run_job(run, 43)  # another seed, another key: nothing cached, nothing invented
    got = json.loads((tmp_path / "results" / "sft_seq" / "seed42" / quality_study.SELECTION_FILE).read_text())
    assert got == {"best_valid_recall@10": 0.0705, "best_eval_loss": 1.981, "global_step": 100.0}
    assert not (tmp_path / "results" / "sft_seq" / "seed43" / quality_study.SELECTION_FILE).exists()


def test_per_case_results_give_pooled_paired_deltas_with_a_cluster_ci_and_mde(tmp_path):
    """Two hand-made finished jobs' workspaces → per_case.parquet → the pooled SASRec → full difference."""
    import study_pooled

    users = [str(u) for u in range(6)]
    for seed in (42, 43):
        data = tmp_path / f"ws{seed}" / "data"
        (data / "03_primary").mkdir(parents=True)
        (data / "07_model_output").mkdir(parents=True)
        pd.DataFrame({"user_id": users, "history": [["x"]] * 6, "target": [f"t{u}" for u in users],
                      "position": 5}).to_parquet(data / "03_primary" / "test.parquet")
        # sasrec hits users 0, 1; rf_dpo_hard hits 0, 1, 2 (and user 3 on seed 43)
        hits = {"sasrec": {"0", "1"}, "rf_dpo_hard": {"0", "1", "2"} | ({"3"} if seed == 43 else set())}
        recs = [{"model": m, "split": "test", "user_id": u, "rank": 1, "item_id": f"t{u}" if u in h else "other",
                 "score": 1.0} for m, h in hits.items() for u in users]
        pd.DataFrame(recs).to_parquet(data / "07_model_output" / "recommendations.parquet")
        _job(tmp_path, "full", seed, {"sasrec": len(hits["sasrec"]) / 6, "rf_dpo_hard": len(hits["rf_dpo_hard"]) / 6})
        assert study_pooled.write_per_case(data, tmp_path / "results" / "full" / f"seed{seed}" / study_pooled.PER_CASE_FILE)
    doc = quality_study.results_json(tmp_path, "x", "cmd")
    pooled = next(p for p in doc["pooled_paired_differences"]
                  if p["a_row"] == "full/sasrec" and p["b_row"] == "full/rf_dpo_hard" and p["metric"] == "recall@10")
    assert pooled["delta"] == pytest.approx(3 / 12) and pooled["seeds"] == [42, 43]
    assert pooled["n_users"] == 6 and pooled["n_cases"] == 12
    assert pooled["ci_low"] <= pooled["delta"] <= pooled["ci_high"] and pooled["mde"] > 0
    assert any("no difference shown" in line or "b higher" in line for line in study_pooled.pooled_table(doc["pooled_paired_differences"]))
    json.dumps(doc)
    # The command line compares any two rows, on the seeds asked for.
    out_json = tmp_path / "pairs.json"
    assert study_pooled.main(["--out", str(tmp_path), "--pair", "full/sasrec:full/rf_dpo_hard", "--seeds", "42",
                              "--json", str(out_json)]) == 0
    one_seed = next(p for p in json.loads(out_json.read_text()) if p["metric"] == "recall@10")
    assert one_seed["seeds"] == [42] and one_seed["delta"] == pytest.approx(1 / 6)
    # ... and draws them (a PNG, one panel per metric)
    png = tmp_path / "pairs.png"
    assert study_pooled.main(["--out", str(tmp_path), "--pair", "full/sasrec:full/rf_dpo_hard", "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))
    # A pair whose rows share one seed does not narrow the next pair's seeds.
    import shutil
    shutil.copytree(tmp_path / "results" / "full" / "seed42", tmp_path / "results" / "one" / "seed42")
    a, b1, b2 = ("t", "sasrec"), ("t", "one"), ("t", "full")
    rows = {a: ("full", "sasrec"), b1: ("one", "rf_dpo_hard"), b2: ("full", "rf_dpo_hard")}
    seeds = {p["b_row"]: p["seeds"] for p in study_pooled.pooled_pairs(tmp_path, [(a, b1), (a, b2)], rows)}
    assert seeds == {"one/rf_dpo_hard": [42], "full/rf_dpo_hard": [42, 43]}
    with pytest.raises(SystemExit, match="RUN/MODEL"):
        study_pooled.main(["--out", str(tmp_path), "--pair", "full:full/rf_dpo_hard"])
