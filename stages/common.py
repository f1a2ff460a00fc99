"""What every stage shares: artifact paths, logging, validated params, the trained model."""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.graph.capture import capture
from pipeline.graph.nodes import FloatGraph, UnsupportedModelError
from pipeline.io import UnreadableCheckpointError, load_checkpoint
from pipeline.models import CheckpointError, ModelSpecError, restore_model
from pipeline.params import Params, ParamsError, QuantizeWeightsParams, load_params
from pipeline.quant.equalization import equalize as equalize_graph

PARAMS_FILE = "params.yaml"

# Artifacts, all under data/ (DVC outputs); dvc.yaml names the same paths.
ARRAYS = Path("data/dataset.npz")
MANIFEST = Path("data/dataset_manifest.json")
CHECKPOINT = Path("data/model.pt")
TRAIN_METRICS = Path("data/train_metrics.json")
TRAINING_LOG = Path("data/training")  # dvclive's folder: per-epoch loss, accuracy and lr
PROFILE = Path("data/profile.json")
QUANTIZED_WEIGHTS = Path("data/weights_int8.npz")
WEIGHT_ONLY_CHECKPOINT = Path("data/model_weights_int8.pt")
INTEGER_MODEL = Path("data/integer_model.npz")
EXPORT_DIR = Path("data/export")  # ONNX and C sources of the integer model
METRICS = Path("data/metrics.json")  # every figure of the evaluate stage
ACCURACY = Path("data/accuracy.json")  # the accuracy table, the one file `dvc metrics show` reads
PLOTS_DIR = Path("data/plots")
# Each layer's sensitivity to weight bits: a plain output, not a `metrics:` one, so that `dvc metrics show`
# stays the accuracy table (`dvc metrics show data/sensitivity.json` shows it).
SENSITIVITY = Path("data/sensitivity.json")
RESULTS_TABLE = Path("data/results.md")


def start_stage(name: str) -> Params:
    """Set up logging and validate all of params.yaml before the stage does any work."""
    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(message)s")
    try:
        return load_params(PARAMS_FILE)
    except ParamsError as error:
        sys.exit(f"[{name}] invalid {PARAMS_FILE}: {error}")


def load_trained_model(expected_model: str, path: Path = CHECKPOINT) -> tuple[nn.Module, dict[str, Any]]:
    """The float model of the train stage, in eval mode, and its checkpoint's metadata.

    A file torch.load cannot read without running code, a checkpoint of another model than ``expected_model``
    (the ``train.model`` param), one with non-finite weights, or a model factory that fails ends the stage with
    one line naming the file and what is wrong.
    """
    checkpoint = load_stage_checkpoint(path)
    try:
        model = restore_model(checkpoint, expected_model, str(path))
    except (CheckpointError, ModelSpecError) as error:
        sys.exit(f"error: {error}")
    return model.eval(), checkpoint


def load_stage_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint an earlier stage wrote; one that cannot be read safely ends the stage in one line naming it."""
    try:
        return load_checkpoint(path)
    except UnreadableCheckpointError as error:
        sys.exit(f"error: {error}")


def capture_model(model: nn.Module, stage: str) -> FloatGraph:
    """The model's float graph (BatchNorm folded, activations fused); an unsupported op ends the stage."""
    try:
        return capture(model)
    except UnsupportedModelError as error:
        sys.exit(f"[{stage}] the model cannot be quantized: {error}")


def load_trained_graph(
    expected_model: str, stage: str, equalize: bool
) -> tuple[nn.Module, FloatGraph, dict[str, Any]]:
    """``load_trained_model`` and the trained model's float graph, cross-layer equalized when ``equalize``
    (``quantize_weights.equalize``: every stage that reads the graph must see the same weights and tensors)."""
    model, checkpoint = load_trained_model(expected_model)
    graph = capture_model(model, stage)
    if equalize:
        equalized = equalize_graph(graph)
        logging.info("cross-layer equalization: %d layer pairs (%s), %d sweeps%s", len(equalized.pairs),
                     ", ".join(f"{pair.first}->{pair.second}" for pair in equalized.pairs) or "none",
                     equalized.iterations, "" if equalized.converged else ", not converged")
        graph = equalized.graph
    return model, graph, checkpoint


def measured_with(model: str, params: QuantizeWeightsParams) -> dict[str, Any]:
    """What the sensitivity depends on besides the images: a size budget may only use one measured the same way."""
    return {"model": model, "equalize": params.equalize, "calibrator": params.calibrator, "granularity": params.granularity,
            "options": dataclasses.asdict(params.calibrator_settings)}
