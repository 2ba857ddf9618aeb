"""The notebooks run headless, top to bottom, on the organism, and show their figures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import restrict_store

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_the_three_notebooks():
    assert [p.stem for p in NOTEBOOKS] == ["01_explore_run", "02_activation_viewer", "03_budget_rule"]


@pytest.mark.parametrize("store", ["full", "analysis", "scalars"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_headless(path, store, organism_run, tmp_path, monkeypatch):
    """Under every store policy: what the run keeps is shown, and what it lacks is one line."""
    run_dir = tmp_path / "run"
    shutil.copytree(organism_run, run_dir)
    if store != "full":
        restrict_store(run_dir, store)
    monkeypatch.setenv("VPSTUDY_RUN", str(run_dir))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the notebook shows no figure"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    if store == "scalars" and path.stem == "02_activation_viewer":  # its maps need p̄: one line says so
        assert "--store" in text, text[-2000:]
    # it looked at the run it was given, and wrote nothing into it
    assert str(run_dir) in "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert not (run_dir / "analysis").exists()
