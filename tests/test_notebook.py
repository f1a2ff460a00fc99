"""notebooks/quantization_demo.ipynb runs end to end (synthetic data, CPU, no download) and shows its figures."""
from __future__ import annotations

import time

import nbformat
from nbclient import NotebookClient

from tests.project_copy import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "notebooks" / "quantization_demo.ipynb"
BUDGET = 60  # seconds for the whole notebook, kernel start included


def test_demo_notebook_runs_and_draws_every_figure():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    started = time.perf_counter()
    # Run from the project root, as a reader would; any cell error raises CellExecutionError with its traceback.
    NotebookClient(notebook, timeout=BUDGET, kernel_name="python3",
                   resources={"metadata": {"path": str(PROJECT_ROOT)}}).execute()
    seconds = time.perf_counter() - started
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    text = "".join(output.get("text", "") for output in outputs)
    assert len(images) == 7  # accuracy; fc1 weights; conv1 input; all weights; all inputs; raw fc2 input; SQNR
    assert "agrees with its float simulation on" in text and "% of weights beyond" in text
    assert seconds < BUDGET, f"the notebook took {seconds:.0f} s"
