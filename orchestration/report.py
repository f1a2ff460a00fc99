"""The results table's command line: one row per metrics file, git revision or DVC experiment, as Markdown.

    python -m orchestration.report data/metrics.json [more metrics files, git revisions or DVC experiment names ...]

An argument that is not a file is read as a revision: data/metrics.json at that git commit, branch, tag or
DVC experiment. ``pipeline.report`` makes the table.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.report import results_markdown

# No torch, matplotlib or prefect here: the command line prints a table in well under a second.

METRICS_PATH = "data/metrics.json"  # the evaluate stage's output, read at a revision


def load_metrics(source: str) -> dict[str, Any]:
    """metrics.json from a file path, or data/metrics.json at a git revision or DVC experiment name."""
    if Path(source).is_file():
        return json.loads(Path(source).read_text())
    import dvc.api  # imported here: it takes about a second, and files need none of it
    from dvc.exceptions import DvcException

    try:
        metrics = dvc.api.metrics_show(METRICS_PATH, rev=source)
    except DvcException as error:
        raise ValueError(f"{source!r} is neither a file nor a git revision or DVC experiment: {error}") from None
    if not metrics:
        raise ValueError(f"{source!r} is a revision without {METRICS_PATH}")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of the given sources: exit status 2 without any, 1 when one cannot be read."""
    sources = list(sys.argv[1:] if argv is None else argv)
    if not sources:
        print(f"usage: python -m orchestration.report {METRICS_PATH} [more files, revisions or experiments ...]",
              file=sys.stderr)
        return 2
    try:
        runs = {source: load_metrics(source) for source in sources}
    except ValueError as error:
        print(f"orchestration.report: {error}", file=sys.stderr)
        return 1
    print(results_markdown(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
