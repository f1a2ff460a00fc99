"""What every stage shares: artifact paths, logging and validated params. No torch here: the stages that run
no model (check-params, download) import only this; reading the earlier stages' outputs is ``stages.inputs``."""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from pipeline.params import Params, ParamsError, load_params
from pipeline.quant.settings import WeightCalibration

PARAMS_FILE = "params.yaml"

# Artifacts, all under data/ (DVC outputs); dvc.yaml names the same paths.
ARRAYS = Path("data/dataset.npz")
MANIFEST = Path("data/dataset_manifest.json")
CHECKPOINT = Path("data/model.pt")
TRAIN_METRICS = Path("data/train_metrics.json")
TRAINING_LOG = Path("data/training")  # dvclive's folder: per-epoch loss, accuracy and lr
GRAPH = Path("data/graph.pt")  # the float graph every stage after train reads (pipeline.graph.file)
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


def measured_with(model: str, equalize: bool, calibration: WeightCalibration) -> dict[str, Any]:
    """What the sensitivity depends on besides the images: the graph (its model, whether equalized) and the weight
    calibration. A size budget may only use a sensitivity measured the same way."""
    return {"model": model, "equalize": equalize, "calibrator": calibration.calibrator,
            "granularity": calibration.granularity, "options": dataclasses.asdict(calibration.settings)}
