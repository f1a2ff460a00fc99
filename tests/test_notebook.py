"""notebooks/quantization_demo.ipynb runs end to end (synthetic data, CPU, no download) and shows its figures.

Its one-minute target is measured by ``python -m benchmarks.notebook_runtime``, not here: a timed test
would fail whenever the shared machine is slow.
"""
from __future__ import annotations

from benchmarks.notebook_runtime import execute_notebook

CELL_TIMEOUT = 600  # seconds: only a guard against a hung kernel, far above any cell's normal time


def test_demo_notebook_runs_and_draws_every_figure():
    notebook = execute_notebook(CELL_TIMEOUT)
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    text = "".join(output.get("text", "") for output in outputs)
    assert len(images) == 7  # accuracy; fc1 weights; conv1 input; all weights; all inputs; raw fc2 input; SQNR
    assert "agrees with its float simulation on" in text and "% of weights beyond" in text
