"""`kedro viz build` of the real project, rendered by headless Chromium: the seven stages drawn as seven
collapsed modular pipelines, in DAG order, inside the catalog's layer bands.

`ALIGN3GR_VIZ_SCREENSHOT=docs/img/kedro_viz_dag.png pytest tests/integration/test_kedro_viz.py` also
writes the README's screenshot, taken by this same path.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from align3gr_pipelines.pipeline_registry import STAGES

from .conftest import REPO, free_port

LAYERS = ["02_intermediate", "03_primary", "04_feature", "05_model_input", "06_models", "07_model_output", "08_reporting"]
ALIGNMENT_TAGS = {"data", "token", "behaviour", "preference", "evaluation"}
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--virtual-time-budget=8000",
    "--window-size=1800,1100",
)
# What a returning user has: the feature tour dismissed; no minimap or sidebar over the graph.
VIEWER_PREFS = {"showFeatureHints": False, "visible": {"miniMap": False, "sidebar": False}}
SCREENSHOT_ENV = "ALIGN3GR_VIZ_SCREENSHOT"


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _project(root: Path) -> Path:
    """The project's conf and metadata; the code is the installed package."""
    shutil.copytree(REPO / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    if (REPO / ".telemetry").exists():
        shutil.copy(REPO / ".telemetry", root / ".telemetry")
    (root / "src").mkdir()
    return root


def _serve(site: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port), "--directory", str(site)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return server, url
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.terminate()
                raise
            time.sleep(0.2)


def _chromium(url: str, tmp: Path, *mode: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(dir=tmp) as profile:
        return subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *mode, url],
            capture_output=True, text=True, timeout=120, cwd=tmp,
        )


def _attrs(tag: str) -> dict[str, str]:
    return dict(re.findall(r'([\w-]+)="([^"]*)"', tag))


def _y(transform: str) -> float:
    return float(re.match(r"translate\(([-\d.e]+),\s*([-\d.e]+)\)", transform).group(2))


@pytest.mark.skipif(chromium() is None, reason="Debian's chromium is not installed (`apt-get install -y chromium`; .ci/run does it)")
def test_viz_draws_the_seven_stages_in_layer_bands(tmp_path: Path) -> None:
    project = _project(tmp_path / "project")
    kedro = Path(sys.executable).with_name("kedro")
    env = dict(os.environ, KEDRO_DISABLE_TELEMETRY="1", DO_NOT_TRACK="1")
    build = subprocess.run([str(kedro), "viz", "build"], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    site = project / "build"

    graph = json.loads((site / "api" / "main").read_text())
    assert graph["selected_pipeline"] == "__default__"
    stages = [n["name"] for n in graph["nodes"] if n["type"] == "modularPipeline"]
    assert sorted(stages) == sorted(STAGES)
    # kedro-viz turns every band off when one dataset is built from a later layer; this list says it did not.
    assert graph["layers"] == LAYERS
    assert {t["id"] for t in graph["tags"]} == ALIGNMENT_TAGS
    layer_of = {n["name"]: n["layer"] for n in graph["nodes"] if n["type"] == "data"}

    index = site / "index.html"
    prefs = f"<script>localStorage.setItem('KedroViz', {json.dumps(json.dumps(VIEWER_PREFS))})</script>"
    index.write_text(index.read_text().replace("<head>", "<head>" + prefs, 1))
    server, url = _serve(site)
    try:
        dom = _chromium(url, tmp_path, "--dump-dom").stdout
        shot = _chromium(url, tmp_path, f"--screenshot={tmp_path / 'dag.png'}")
    finally:
        server.terminate()
        server.wait(timeout=10)

    # The collapsed graph: one drawn node per stage and none of their 43 task nodes, top to bottom in DAG order.
    drawn = [_attrs(t) for t in re.findall(r'<g [^>]*class="pipeline-node pipeline-node--[^"]*"[^>]*>', dom)]
    assert drawn, dom[:2000]
    assert not [d for d in drawn if d["data-node-type"] == "task"]
    stage_y = {d["data-node-fullname"]: _y(d["transform"]) for d in drawn if d["data-node-type"] == "modularPipeline"}
    assert sorted(stage_y) == sorted(STAGES)
    assert sorted(STAGES, key=stage_y.get) == list(STAGES), stage_y
    # The bands, in layer order, each around the datasets of its layer (07_model_output lives inside evaluation).
    labels = re.findall(r'<li class="pipeline-layer-name" data-id="layer-label--([^"]+)"', dom)
    bands = [_attrs(t) for t in re.findall(r'<rect [^>]*class="pipeline-layer"[^>]*>', dom)]
    data = {d["data-node-fullname"]: _y(d["transform"]) for d in drawn if d["data-node-type"] == "data"}
    visible_layers = [layer for layer in LAYERS if layer in {layer_of[name] for name in data}]
    assert labels == visible_layers and len(bands) == len(labels), (labels, len(bands))
    assert {"items", "item_scids", "sft_examples", "sft_model", "sp_dpo_model_hard", "evaluation_comparison_plot"} <= set(data)
    extent = {label: (float(b["y"]), float(b["y"]) + float(b["height"])) for label, b in zip(labels, bands)}
    misplaced = {name: (layer_of[name], y) for name, y in data.items() if not extent[layer_of[name]][0] <= y <= extent[layer_of[name]][1]}
    assert not misplaced, (misplaced, extent)

    png = tmp_path / "dag.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", shot.stderr[-2000:]
    if os.environ.get(SCREENSHOT_ENV):
        target = Path(os.environ[SCREENSHOT_ENV])
        target = target if target.is_absolute() else REPO / target
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, target)
