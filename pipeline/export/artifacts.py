"""All deployment artifacts of an integer model in one folder, their sizes, and their agreement with the engine."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from torch import Tensor

from pipeline.evaluation import percent_equal
from pipeline.export.c_build import c_footprint, c_logits, find_compiler
from pipeline.export.c_model import C_FILES, write_c_sources
from pipeline.export.onnx_model import onnx_predictions, save_onnx_model
from pipeline.quant.engine import quantize_model_input, run_integer
from pipeline.quant.ir import IntegerModel

ONNX_FILES = {"qlinear": "model.onnx", "integer": "model_integer.onnx"}  # style -> file name
METRICS_FILE = "export_metrics.json"


def export_integer_model(model: IntegerModel, directory: str | os.PathLike, compiler: str = "gcc") -> dict[str, Any]:
    """Write both ONNX styles and the C sources into ``directory``; return the export metrics.

    Metrics: ``artifact_bytes`` per file; ``c``: the generator's parameter and
    static-RAM bytes, plus the object's section sizes from ``c_footprint``
    when ``compiler`` is installed (None otherwise, with a warning: the
    sources do not need a compiler to be written).
    """
    directory = Path(directory)
    for style, name in ONNX_FILES.items():
        save_onnx_model(model, directory / name, style)
    sources = write_c_sources(model, directory)
    names = [*ONNX_FILES.values(), *C_FILES]
    metrics: dict[str, Any] = {"artifact_bytes": {name: (directory / name).stat().st_size for name in names}}
    if find_compiler(compiler) is None:
        logging.warning("no C compiler %r on PATH: C code size not measured", compiler)
        metrics["c"] = {
            "compiler": None, "code_size_bytes": None,
            "parameter_bytes": sources.parameter_bytes, "static_ram_bytes": sources.static_ram_bytes,
        }
    else:
        metrics["c"] = c_footprint(directory, compiler)
    return metrics


def export_agreement(
    model: IntegerModel,
    directory: str | os.PathLike,
    x_normalized: Tensor,
    labels: Tensor | None = None,
    compiler: str = "gcc",
    engine_logits: Tensor | None = None,
) -> dict[str, Any]:
    """How the exported C and ONNX models in ``directory`` agree with ``run_integer`` on normalized images.

    Counts images whose logits (C, integer ONNX) or predictions differ from the
    engine's, the QLinear ONNX model's prediction agreement in percent, and
    with ``labels`` each one's accuracy in percent. C figures are None when
    ``compiler`` is not installed. ``engine_logits``, the engine's int32 logits
    for these images where the caller has them already, saves running it again.
    """
    directory = Path(directory)
    x_int8 = quantize_model_input(model, x_normalized)
    if engine_logits is None:
        engine_logits = run_integer(model, x_int8).flatten(1)
    elif len(engine_logits) != len(x_int8):
        raise ValueError(
            f"engine_logits holds {len(engine_logits)} images but x_normalized {len(x_int8)}; pass the engine's "
            "logits for these same images, or None to run the engine here"
        )
    engine_predictions = engine_logits.argmax(dim=1)
    report: dict[str, Any] = {"images": len(x_int8)}
    runs: dict[str, Tensor] = {}
    for style, name in ONNX_FILES.items():
        predictions, logits = onnx_predictions(directory / name, x_normalized)
        report[f"onnx_{style}_logit_mismatches"] = _mismatched_images(logits, engine_logits)
        report[f"onnx_{style}_prediction_mismatches"] = int((predictions != engine_predictions).sum())
        runs[f"onnx_{style}"] = predictions
    if find_compiler(compiler) is None:
        report |= {"c_logit_mismatches": None, "c_prediction_mismatches": None}
    else:
        logits = c_logits(directory, x_int8, compiler)
        report["c_logit_mismatches"] = _mismatched_images(logits, engine_logits)
        report["c_prediction_mismatches"] = int((logits.argmax(dim=1) != engine_predictions).sum())
        runs["c"] = logits.argmax(dim=1)
    report["onnx_qlinear_agreement"] = percent_equal(runs["onnx_qlinear"], engine_predictions)
    if labels is not None:
        runs["engine"] = engine_predictions
        report["accuracy"] = {run: percent_equal(predictions, labels) for run, predictions in runs.items()}
    return report


def _mismatched_images(logits: Tensor, expected: Tensor) -> int:
    """Images whose logits differ from ``expected`` in any class."""
    return int((logits != expected).any(dim=1).sum())
