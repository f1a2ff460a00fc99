"""The file names of the export folder: the exporter (``pipeline.export.artifacts``) writes them, the evaluate
stage's agreement check (``pipeline.evaluation.export_agreement``) reads them, and neither imports the other."""
from __future__ import annotations

ONNX_FILES = {"qlinear": "model.onnx", "integer": "model_integer.onnx"}  # style -> file name
TFLITE_FILE = "model.tflite"  # the int8 TensorFlow Lite model (pipeline.export.tflite_model), run in TFLM
