"""Wall time of the demo notebook, ``notebooks/quantization_demo.ipynb``, against its one-minute target.

The notebook is meant to run in about a minute on a CPU (synthetic data, no
download). ``tests/test_notebook.py`` checks that it runs and draws its figures;
how long it takes is measured here, not asserted in a test, because a shared
machine's load would make such a test fail at random.

    python -m benchmarks.notebook_runtime [--runs 3]
"""
from __future__ import annotations

import argparse
import statistics
import time

import nbformat
from nbclient import NotebookClient

from tests.project_copy import PROJECT_ROOT

NOTEBOOK = PROJECT_ROOT / "notebooks" / "quantization_demo.ipynb"
TARGET_SECONDS = 60  # the whole notebook, kernel start included


def execute_notebook(cell_timeout: int | None = None) -> nbformat.NotebookNode:
    """The notebook, executed from the project root as a reader would run it, with its outputs.

    Any cell error raises nbclient's CellExecutionError with its traceback; ``cell_timeout``
    (seconds per cell, None: no limit) guards against a hung kernel.
    """
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=cell_timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(PROJECT_ROOT)}}).execute()
    return notebook


def notebook_seconds() -> float:
    """Wall time of one execution of the notebook, kernel start included."""
    started = time.perf_counter()
    execute_notebook()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="executions to time")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error(f"--runs: value {args.runs} is out of range; allowed: >= 1")
    times = [notebook_seconds() for _ in range(args.runs)]
    print(f"{NOTEBOOK.name}: median {statistics.median(times):.1f} s over {len(times)} runs "
          f"(min {min(times):.1f} s, max {max(times):.1f} s); target {TARGET_SECONDS} s")


if __name__ == "__main__":
    main()
