"""`kedro viz build` writes a static site that headless Chromium renders into the pipeline's DAG."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import free_port

TASKS = {"make_items", "embed_items", "quantize_items", "train_scorer", "evaluate_scorer"}
DATASETS = {"items", "item_embeddings", "item_scids", "toy_model", "evaluation_metrics"}
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=8000",
)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (`apt-get install -y chromium`; .ci/run does it)")
def test_static_build_renders_the_dag_in_chromium(project_copy: Path, tmp_path: Path) -> None:
    kedro = Path(sys.executable).with_name("kedro")
    build = subprocess.run([str(kedro), "viz", "build"], cwd=project_copy, capture_output=True, text=True, timeout=240)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    site = project_copy / "build"
    graph = json.loads((site / "api" / "main").read_text())
    assert TASKS <= {n["name"] for n in graph["nodes"] if n["type"] == "task"}

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(site)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with tempfile.TemporaryDirectory(dir=tmp_path) as profile:
            dom = subprocess.run(
                [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
                capture_output=True, text=True, timeout=120,
            ).stdout
    finally:
        server.terminate()
        server.wait(timeout=10)
    # The graph itself, not only the sidebar list: one SVG group per task node and per dataset node.
    drawn_tasks = set(re.findall(r'class="pipeline-node pipeline-node--task"[^>]*data-node-fullname="([^"]+)"', dom))
    drawn_data = set(re.findall(r'class="pipeline-node pipeline-node--data"[^>]*data-node-fullname="([^"]+)"', dom))
    assert drawn_tasks == TASKS, dom[:2000]
    assert DATASETS <= drawn_data
