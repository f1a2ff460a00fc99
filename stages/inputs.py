"""Reading the earlier stages' outputs: one that cannot be read safely ends the stage in one line naming it."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pipeline.graph.file import GraphFile, load_graph_file
from pipeline.io import UnreadableCheckpointError, load_checkpoint
from stages.common import GRAPH


def load_stage_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint an earlier stage wrote; one that cannot be read safely ends the stage in one line naming it."""
    try:
        return load_checkpoint(path)
    except UnreadableCheckpointError as error:
        sys.exit(f"error: {error}")


def load_stage_graph(path: Path = GRAPH) -> GraphFile:
    """The graph stage's float graph (``pipeline.graph.file``); a file it cannot read ends the stage in one line."""
    try:
        return load_graph_file(path)
    except (UnreadableCheckpointError, ValueError) as error:
        sys.exit(f"error: {error}")
