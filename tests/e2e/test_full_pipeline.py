"""The README's main job, `kedro run --pipelines=full`, end to end through the Kedro CLI on a tiny demo.

Runs in a copy of the project (conf + pyproject) in a temp dir so the repository's data/ is untouched,
then reruns one stage on the cached artifacts and checks `--only-missing-outputs` skips everything.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
# The module fixture is a whole `kedro run --pipelines=full` (minutes on 2 busy cores); pytest-timeout
# counts it in the first test's time.
pytestmark = pytest.mark.timeout(1800)

TINY = ",".join(
    [
        "data_prep.demo.n_users=80",
        "data_prep.demo.n_items=60",
        "tokenization.collaborative_encoder.epochs=2",
        "tokenization.phase1.epochs=1",
        "tokenization.phase2.epochs=2",
        "tokenization.rq_vae.kmeans_iters=5",
        "sft_data.max_train_examples=300",
        "sft_train.backbone.scratch.vocab_size=500",
        "sft_train.backbone.scratch.hidden_size=64",
        "sft_train.backbone.scratch.intermediate_size=128",
        "sft_train.backbone.scratch.num_hidden_layers=2",
        "sft_train.backbone.scratch.num_attention_heads=2",
        "sft_train.backbone.scratch.num_key_value_heads=2",
        "sft_train.trainer.max_steps=6",
        "sft_train.trainer.eval_steps=3",
        "sft_train.trainer.max_eval_examples=32",
        "sft_train.trainer.progress_bar=false",
        "sp_dpo_curriculum.prompts_per_stage=8",
        "sp_dpo_curriculum.n_negatives=4",
        "sp_dpo_curriculum.decoding.beam_width=6",
        "sp_dpo_curriculum.decoding.top_k=6",
        "rf_dpo.prompts.max_users=12",
        "rf_dpo.n_rejected=4",
        "rf_dpo.recommend.top_k=6",
        "rf_dpo.recommend.beam_width=6",
        "evaluation.beam_width=10",
        "evaluation.top_k=10",
        "evaluation.max_users.valid=20",
        "evaluation.bootstrap.n_resamples=50",
        "evaluation.paired_test.n_permutations=200",
    ]
)


def _kedro(project: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    kedro = Path(sys.executable).with_name("kedro")
    proc = subprocess.run(
        [str(kedro), *args], cwd=project, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"kedro {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("align3gr_full")
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(REPO / ".telemetry", root / ".telemetry")
    (root / "src").mkdir()  # kedro wants the source folder; the code comes from the installed package
    for layer in (REPO / "data").iterdir():
        if layer.is_dir():
            (root / "data" / layer.name).mkdir(parents=True)
    _kedro(root, "run", "--pipelines=full", f"--params={TINY}")
    return root


def private_copy(project: Path, tmp_path: Path) -> Path:
    """A copy of the built project for a test that reruns or deletes something, so that no test depends on
    what another did to the shared module fixture (any order, any subset)."""
    dest = tmp_path / "project"
    shutil.copytree(project, dest, symlinks=True)
    return dest


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def upstream_of_evaluation(root: Path) -> dict[str, tuple[int, bytes]]:
    """`snapshot` of the files under `root` that the evaluation stage only reads."""
    return {k: v for k, v in snapshot(root).items() if not k.startswith("sasrec_bce/")}


def tie_aware_recall(recs: pd.DataFrame, targets: pd.Series, k: int) -> float:
    """Mean Recall@k over `targets` (user_id -> item), written out independently of the project's metrics
    code: a target tied in score with other listed items gets |group ∩ top-k| / |group|; a miss gets 0."""
    credit = []
    for user, target in targets.items():
        lst = recs[recs["user_id"] == user].sort_values("rank")
        hit = lst[lst["item_id"] == target]
        if hit.empty:
            credit.append(0.0)
            continue
        group = lst[lst["score"] == hit["score"].iloc[0]]
        credit.append(float((group["rank"] <= k).sum()) / len(group))
    return sum(credit) / len(credit)


def test_full_run_writes_every_stage(project: Path):
    data = project / "data"
    items = pd.read_parquet(data / "02_intermediate/items.parquet")
    scids = pd.read_parquet(data / "05_model_input/item_scids.parquet")
    assert set(scids["id"]) == set(items["item_id"])
    assert scids["tokens"].is_unique
    for ckpt in ("sasrec", "sc_tokenizer", "sft_model", "sp_dpo_easy", "sp_dpo_medium", "sp_dpo_hard",
                 "rf_dpo_easy", "rf_dpo_hard"):
        assert (data / "06_models" / ckpt / "_CHECKPOINT_COMPLETE.json").is_file(), ckpt
    recs = pd.read_parquet(data / "07_model_output/recommendations.parquet")
    assert set(recs["item_id"]) <= set(items["item_id"])  # constrained decoding never invents an item
    metrics = pd.read_parquet(data / "08_reporting/evaluation/metrics.parquet")
    models = set(metrics["model"])
    assert {"most_popular", "sasrec", "item_knn"} <= models
    assert any(m.startswith("sft") for m in models) and any("rf_dpo" in m for m in models)
    # every test-split Recall@5/10 in the table is what the recommendations table gives, recomputed here
    # (TINY keeps top_k = 10, so Recall@10 alone would not see a wrong tie rule: @5 does)
    test = pd.read_parquet(data / "03_primary/test.parquet")
    targets = pd.Series(test["target"].astype(str).to_numpy(), index=test["user_id"].astype(str))
    for k in (5, 10):
        value = metrics[(metrics["split"] == "test") & (metrics["metric"] == f"recall@{k}")].set_index("model")["value"]
        assert set(value.index) == models
        for model in models:
            mine = recs[(recs["model"] == model) & (recs["split"] == "test")]
            assert value[model] == pytest.approx(tie_aware_recall(mine, targets, k)), (model, k)
    assert (metrics["n_users"][metrics["split"] == "test"] == len(test)).all()
    for png in ("tokenization/codebook_usage.png", "sft_train/training_curve.png",
                "evaluation/comparison.png"):
        assert (data / "08_reporting" / png).stat().st_size > 1000, png


def test_rerun_one_stage_on_cached_artifacts(project: Path, tmp_path: Path):
    project = private_copy(project, tmp_path)
    data = project / "data"
    outputs = [data / "07_model_output/recommendations.parquet", data / "08_reporting/evaluation/metrics.parquet"]
    upstream = {layer: upstream_of_evaluation(data / layer) for layer in
                ("01_raw", "02_intermediate", "03_primary", "04_feature", "05_model_input", "06_models")}
    recs_before = pd.read_parquet(outputs[0])
    written_before = [p.stat().st_mtime_ns for p in outputs]
    _kedro(project, "run", "--pipelines=evaluation", f"--params={TINY}")
    # evaluation ran again: its outputs were rewritten ...
    assert [p.stat().st_mtime_ns for p in outputs] != written_before
    # ... from the cached checkpoints (same recommendations, the LM rows included) ...
    recs_after = pd.read_parquet(outputs[0])
    assert set(recs_after["model"]) == set(recs_before["model"]) and any(m.startswith("sft") for m in recs_after["model"])
    pd.testing.assert_frame_equal(recs_after, recs_before)
    # ... and nothing upstream was touched, no checkpoint retrained (the BCE SASRec baseline is evaluation's
    # own output: retrained from the same seed, it gave the same lists above)
    assert {layer: upstream_of_evaluation(data / layer) for layer in upstream} == upstream


def test_only_missing_outputs_reruns_only_what_is_missing(project: Path, tmp_path: Path):
    project = private_copy(project, tmp_path)
    data = project / "data"
    markers = sorted((data / "06_models").glob("*/_CHECKPOINT_COMPLETE.json"))
    before = {m: m.read_text() for m in markers}
    chart = data / "08_reporting/evaluation/comparison.png"
    chart.unlink()
    _kedro(project, "run", "--pipelines=full", "--only-missing-outputs", f"--params={TINY}")
    assert chart.is_file()  # the missing evaluation output was rebuilt
    assert {m: m.read_text() for m in markers} == before  # no finished checkpoint was retrained


def test_stage_and_node_forms_with_namespaced_stages(project: Path):
    """Each stage is a Kedro modular pipeline: `--pipelines=<stage>` keeps working on the shared, un-prefixed
    datasets, node names carry the stage (`--nodes=tokenization.report_tokenization_quality`), and
    `kedro lineage status` names the stale nodes that way in the `kedro run` it prints."""
    data = project / "data"
    scids = (data / "05_model_input/item_scids.parquet").read_bytes()
    model = data / "06_models/sft_model/_CHECKPOINT_COMPLETE.json"
    before = model.read_text()
    _kedro(project, "run", "--pipelines=sft_train", f"--params={TINY}")
    assert model.read_text() != before  # retrained, on the cached SFT examples and SCIDs
    assert (data / "05_model_input/item_scids.parquet").read_bytes() == scids

    # `kedro lineage status` has no --params: it compares against conf, so conf/local gets the same TINY values.
    tiny: dict = {}
    for item in TINY.split(","):
        key, value = item.split("=")
        *parents, leaf = key.split(".")
        node = tiny
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    local = project / "conf/local/parameters_e2e_tiny.yml"
    local.write_text(yaml.safe_dump(tiny))
    try:
        report_path = project / "lineage.json"
        _kedro(project, "lineage", "status", "--json", "-o", str(report_path))
    finally:
        local.unlink()
    report = json.loads(report_path.read_text())
    assert "sp_dpo_curriculum" in report["stale_stages"] and "tokenization" not in report["stale_stages"], report
    roots = report["rebuild_command"].removeprefix("kedro run --from-nodes=").split(",")
    assert "sp_dpo_curriculum.build_sp_dpo_pairs_easy" in roots, report["rebuild_command"]

    quality = data / "08_reporting/tokenization/quality.parquet"
    quality.unlink()
    _kedro(project, "run", "--nodes=tokenization.report_tokenization_quality", f"--params={TINY}")
    assert quality.is_file()
    assert (data / "05_model_input/item_scids.parquet").read_bytes() == scids  # only that node ran
