"""Deployment exports of an ``IntegerModel``: ONNX graphs and bit-exact C99 sources.

- ``plan``: the ops with their shapes, and what the exporters support;
- ``c_model``: ``model.h``, ``model_data.h``, ``model.c`` (integer-only C99);
- ``c_build``: compile and run them (``c_logits``), measure them (``c_footprint``);
- ``onnx_model``: QLinear and bit-exact integer ONNX graphs, ``onnx_predictions``;
- ``artifacts``: everything into one folder with its metrics, and agreement with the engine.
"""
from pipeline.export.artifacts import METRICS_FILE, ONNX_FILES, export_agreement, export_integer_model
from pipeline.export.c_build import c_footprint, c_logits, compile_runner, find_compiler
from pipeline.export.c_model import C_FILES, CSources, generate_c, write_c_sources
from pipeline.export.onnx_model import build_onnx_model, onnx_predictions, save_onnx_model
from pipeline.export.plan import CIFAR10_INPUT_SHAPE, Step, plan_model

__all__ = [
    "CIFAR10_INPUT_SHAPE",
    "C_FILES",
    "CSources",
    "METRICS_FILE",
    "ONNX_FILES",
    "Step",
    "build_onnx_model",
    "c_footprint",
    "c_logits",
    "compile_runner",
    "export_agreement",
    "export_integer_model",
    "find_compiler",
    "generate_c",
    "onnx_predictions",
    "plan_model",
    "save_onnx_model",
    "write_c_sources",
]
