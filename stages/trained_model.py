"""The train stage's model, rebuilt from its checkpoint (which records the architecture) for the stages that run it."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.models import CheckpointError, ModelSpecError, restore_model
from stages.common import CHECKPOINT
from stages.inputs import load_stage_checkpoint


def load_trained_model(path: Path = CHECKPOINT) -> tuple[nn.Module, dict[str, Any]]:
    """The float model of the train stage, in eval mode, and its checkpoint's metadata.

    A file torch.load cannot read without running code, one that records no model, one with non-finite weights,
    or a model factory that fails ends the stage with one line naming the file and what is wrong.
    """
    checkpoint = load_stage_checkpoint(path)
    try:
        recorded = checkpoint.get("model") if isinstance(checkpoint, dict) else None
        model = restore_model(checkpoint, recorded, str(path))
    except (CheckpointError, ModelSpecError) as error:
        sys.exit(f"error: {error}")
    return model.eval(), checkpoint
