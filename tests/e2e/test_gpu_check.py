"""benchmarks/gpu_check.py: the tiny run measures every stage on a CPU and writes its report; without CUDA
the full-size run measures nothing and says so."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks/gpu_check.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _lcrec_index(path: Path, n: int) -> dict[str, list[str]]:
    """An LC-Rec style index: item id -> ["<a_1>", "<b_2>", "<c_3>", "<d_0>"]; item 3 repeats item 2's codes."""
    index = {str(i): [f"<a_{i // 16}>", f"<b_{i % 16}>", f"<c_{i * 5 % 16}>", f"<d_{i % 3}>"] for i in range(n)}
    index["3"] = index["2"]
    path.write_text(json.dumps(index))
    return index


def test_tiny_run_measures_every_stage(tmp_path):
    index = _lcrec_index(tmp_path / "index.json", 60)
    kept = [codes for i, codes in index.items() if i != "3"][:50]
    _run(tmp_path, "--tiny", "--catalogue", "index.json", "--out", "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["device"] == "cpu" and report["tiny"] and set(report["versions"]) == {"torch", "transformers", "peft"}
    assert report["shape"]["hidden_size"] == 64 and report["shape"]["num_hidden_layers"] == 2
    # 50 items kept in file order, the duplicate SCID skipped; all 4 code levels
    assert report["catalogue"]["levels"] == 4 and report["catalogue"]["items"] == 50
    assert report["catalogue"]["duplicate_scids_dropped"] == 1
    stages = report["stages"]
    assert list(stages) == ["build", "sft", "dpo", "decode"]
    assert all(s["seconds"] > 0 and "peak_gpu_gb" in s for s in stages.values())
    assert stages["build"]["scid_tokens"] == len({(lv, c) for codes in kept for lv, c in enumerate(codes)})
    assert stages["sft"]["steps"] == 2 and stages["sft"]["tokens_per_s"] > 0
    assert stages["dpo"]["pairs"] == 2 and stages["dpo"]["rejected_per_pair"] == 20 and stages["dpo"]["tokens_per_s"] > 0
    assert stages["decode"]["users"] == 8 and stages["decode"]["users_per_s"] > 0 and stages["decode"]["valid_top1"] == 1.0
    assert report["total_seconds"] < 60


def test_deadline_skips_stages_and_absent_catalogue_is_synthetic(tmp_path):
    _run(tmp_path, "--tiny", "--catalogue", "missing.json", "--deadline", "0", "--out", "r.json")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["catalogue"]["source"].startswith("synthetic") and report["catalogue"]["levels"] == 3
    assert all("deadline" in s["skipped"] for s in report["stages"].values()) and len(report["stages"]) == 4


def test_without_cuda_nothing_is_measured(tmp_path):
    proc = _run(tmp_path, "--out", "r.json")
    assert "no CUDA device: nothing measured; run on a GPU" in proc.stdout
    assert not (tmp_path / "r.json").exists()
