"""notebooks/align3gr_artifacts.ipynb runs top to bottom on a partly built project."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from .conftest import REPO

NOTEBOOK = REPO / "notebooks" / "align3gr_artifacts.ipynb"


def venv_kernel(tmp_path: Path) -> KernelManager:
    """A kernel running this interpreter, so the test needs no `ipykernel install` (works in a fresh clone)."""
    spec = tmp_path / "kernels" / "align3gr-venv"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "align3gr .venv", "language": "python"}))
    return KernelManager(kernel_name="align3gr-venv", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def test_notebook_plots_what_exists_and_names_what_is_missing(
    project_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Evaluation not run yet: the notebook must say so and still plot the SCIDs and stage metrics.
    shutil.rmtree(project_copy / "data/08_reporting/evaluation")
    monkeypatch.setenv("ALIGN3GR_PROJECT_PATH", str(project_copy))
    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, km=venv_kernel(tmp_path), timeout=240).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "item_scids: 48 ids, 2 levels" in text
    assert "evaluation_metrics: not produced yet (run `kedro run --pipelines=evaluation`)" in text
    pngs = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(pngs) == 3  # SCID code usage, tokenization curves, SFT loss curve
    tables = "".join(o["data"].get("text/plain", "") for o in outputs if "text/html" in o.get("data", {}))
    assert "final_loss" in tables and "missing" in tables
    # The notebook reads the project's own store; it leaves no mlflow.db where it was started.
    assert not (tmp_path / "mlflow.db").exists()
