"""All deployment artifacts of an integer model in one folder, and their sizes (their agreement with the engine:
``pipeline.evaluation.export_agreement``)."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from pipeline.export.c_build import c_footprint, find_compiler
from pipeline.export.c_model import C_FILES, write_c_sources
from pipeline.export.onnx_model import save_onnx_model
from pipeline.export.tflite_model import build_tflite
from pipeline.export.tflite_run import tflm_arena_bytes
from pipeline.export_layout import ONNX_FILES, TFLITE_FILE
from pipeline.io import atomic_path
from pipeline.quant.ir import IntegerModel

METRICS_FILE = "export_metrics.json"


def export_integer_model(model: IntegerModel, directory: str | os.PathLike, compiler: str = "gcc") -> dict[str, Any]:
    """Write both ONNX styles, the C sources and the ``.tflite`` into ``directory``; return the export metrics.

    Metrics: ``artifact_bytes`` per file; ``c``: the generator's parameter and
    static-RAM bytes, plus the object's section sizes from ``c_footprint``
    when ``compiler`` is installed (None otherwise, with a warning: the
    sources do not need a compiler to be written); ``tflite``: the arena TensorFlow Lite Micro plans for it.
    A model the ``.tflite`` cannot express (``tflite_model``'s errors name the node) fails before any file is written.
    """
    directory = Path(directory)
    tflite_blob = build_tflite(model)
    for style, name in ONNX_FILES.items():
        save_onnx_model(model, directory / name, style)
    sources = write_c_sources(model, directory)
    with atomic_path(directory / TFLITE_FILE) as tmp:
        Path(tmp).write_bytes(tflite_blob)
    names = [*ONNX_FILES.values(), *C_FILES, TFLITE_FILE]
    metrics: dict[str, Any] = {"artifact_bytes": {name: (directory / name).stat().st_size for name in names}}
    if find_compiler(compiler) is None:
        logging.warning("no C compiler %r on PATH: C code size not measured", compiler)
        metrics["c"] = {
            "compiler": None, "code_size_bytes": None,
            "parameter_bytes": sources.parameter_bytes, "static_ram_bytes": sources.static_ram_bytes,
        }
    else:
        metrics["c"] = c_footprint(directory, compiler)
    metrics["tflite"] = {"tflm_arena_bytes": tflm_arena_bytes(tflite_blob)}
    return metrics
