"""Measuring what quantization did: accuracies, agreement (of the exported models too), per-layer SQNR, model sizes."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.export.c_build import c_logits, find_compiler
from pipeline.export.onnx_model import onnx_predictions
from pipeline.export.tflite_run import run_tflm
from pipeline.export_layout import ONNX_FILES, TFLITE_FILE
from pipeline.graph.nodes import FloatGraph, float_parameter_count
from pipeline.graph.run import run_float
from pipeline.quant.engine import (
    integer_tensor_outputs,
    quantize_model_input,
    run_integer,
    run_simulated,
)
from pipeline.quant.ir import IntegerModel, parameter_bytes
from pipeline.quant.ranges import dequantize
from pipeline.transforms import normalized_batches

FLOAT_BYTES = 4  # float32 parameters


def percent_equal(a: Tensor, b: Tensor) -> float:
    """Percent of positions where ``a`` equals ``b`` (an accuracy or an agreement rate), to 0.01."""
    return round(100.0 * float((a == b).double().mean()), 2)


def paired_difference_error(reference_correct: Tensor, correct: Tensor) -> float:
    """Standard error, in points, of the accuracy difference of two models scored on the same images.

    ``reference_correct`` and ``correct`` say per image whether each model was right. Only the images
    where exactly one of them is right move the difference, so its standard error is
    100 / n * sqrt(b + c - (b - c)^2 / n), with b and c the images only the reference and only the
    other model got right: far below the two accuracies' own standard errors when the models mostly agree.
    """
    n = len(correct)
    only_reference = int((reference_correct & ~correct).sum())
    only_other = int((correct & ~reference_correct).sum())
    return 100.0 / n * math.sqrt(max(only_reference + only_other - (only_reference - only_other) ** 2 / n, 0.0))


def accuracy_report(predictions: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Overall and per-class accuracy in percent."""
    correct = predictions == labels
    per_class = {
        name: 100.0 * correct[labels == index].float().mean().item() if (labels == index).any() else None
        for index, name in enumerate(class_names)
    }
    return {"accuracy": 100.0 * correct.float().mean().item(), "per_class": per_class}


def sqnr_db(reference: Tensor, approximation: Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(sum(ref^2) / sum((ref - approx)^2)) in dB; inf when exact."""
    reference, approximation = reference.to(torch.float64), approximation.to(torch.float64)
    noise = float(((reference - approximation) ** 2).sum())
    signal = float((reference**2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


@torch.no_grad()
def engine_logits(
    integer_model: IntegerModel,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 1000,
    progress: bool | None = None,
) -> Tensor:
    """The integer engine's int32 logits (N, classes) for uint8 images (N, 32, 32, 3).

    ``progress=None`` shows a bar only when stderr is a terminal.
    """
    return torch.cat([
        run_integer(integer_model, quantize_model_input(integer_model, batch)).flatten(1)
        for batch in normalized_batches(images, mean, std, batch_size, "integer engine", progress)
    ])


def engine_predictions(
    integer_model: IntegerModel, images: Tensor, mean: Sequence[float], std: Sequence[float], batch_size: int = 1000
) -> Tensor:
    """Classes predicted by the integer engine (argmax of its int32 logits) for uint8 images (N, 32, 32, 3)."""
    return engine_logits(integer_model, images, mean, std, batch_size).argmax(1)


@torch.no_grad()
def simulated_predictions(
    integer_model: IntegerModel,
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 1000,
    progress: bool | None = None,
) -> Tensor:
    """Classes predicted by the float simulation of ``integer_model`` for uint8 images (N, 32, 32, 3).

    ``progress=None`` shows a bar only when stderr is a terminal.
    """
    return torch.cat([
        run_simulated(integer_model, batch).argmax(1)
        for batch in normalized_batches(images, mean, std, batch_size, "float simulation", progress)
    ])


def weight_sqnr(graph: FloatGraph, integer_model: IntegerModel) -> dict[str, float]:
    """SQNR (dB) of each layer's dequantized int weights against its float (BatchNorm-folded) weights."""
    layers = {node.name: node for node in graph.layers()}
    return {
        layer.name: sqnr_db(layers[layer.name].weight, dequantize(layer.weight, layer.weight_scale, axis=0))
        for layer in integer_model.layers()
    }


@torch.no_grad()
def output_sqnr(graph: FloatGraph, integer_model: IntegerModel, x_normalized: Tensor) -> dict[str, float]:
    """SQNR (dB) of each layer's dequantized integer output against the float graph's (after the same activation).

    Errors accumulate: layer n's figure includes everything quantized before it.
    """
    outputs = {layer.output: layer.name for layer in integer_model.layers()}
    float_outputs: dict[str, Tensor] = {}
    run_float(graph, x_normalized, observe=lambda name, value: float_outputs.update({name: value}) if name in outputs else None)
    integer_outputs = integer_tensor_outputs(integer_model, quantize_model_input(integer_model, x_normalized))
    return {
        name: sqnr_db(float_outputs[tensor], dequantize(integer_outputs[tensor], integer_model.tensors[tensor].scale))
        for tensor, name in outputs.items()
    }


def export_agreement(
    model: IntegerModel,
    directory: str | os.PathLike,
    x_normalized: Tensor,
    labels: Tensor | None = None,
    compiler: str = "gcc",
    engine_logits: Tensor | None = None,
) -> dict[str, Any]:
    """How the exported C, ONNX and ``.tflite`` models in ``directory`` agree with ``run_integer`` on normalized images.

    Counts images whose logits (C, integer ONNX, the ``.tflite`` in TensorFlow Lite Micro) or predictions differ
    from the
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
    tflite_logits = run_tflm((directory / TFLITE_FILE).read_bytes(), x_int8)
    report["tflite_logit_mismatches"] = _mismatched_images(tflite_logits, engine_logits)
    runs["tflite_int8"] = tflite_logits.argmax(dim=1)
    report["onnx_qlinear_agreement"] = percent_equal(runs["onnx_qlinear"], engine_predictions)
    if labels is not None:
        runs["engine"] = engine_predictions
        report["accuracy"] = {run: percent_equal(predictions, labels) for run, predictions in runs.items()}
    return report


def _mismatched_images(logits: Tensor, expected: Tensor) -> int:
    """Images whose logits differ from ``expected`` in any class."""
    return int((logits != expected).any(dim=1).sum())


def float_model_bytes(graph: FloatGraph) -> int:
    """Bytes of the float32 parameters (BatchNorm folded, as deployed)."""
    return FLOAT_BYTES * float_parameter_count(graph)


def integer_model_bytes(integer_model: IntegerModel) -> int:
    """Bytes of what the integer engine and the exported C store: every weight in one byte (int8, whatever its
    bits), int32 biases, int32 multipliers and shifts."""
    return parameter_bytes(integer_model)


def packed_integer_model_bytes(integer_model: IntegerModel, packed_weight_bytes: int) -> int:
    """``integer_model_bytes`` with the weights packed at their bits instead of one byte each.

    ``packed_weight_bytes``: the weights' packed size that the quantize-weights stage records
    (``pipeline.quant.mixed_precision.packed_model_bytes``: each layer ceil(weights x bits / 8)).
    """
    stored_weight_bytes = sum(layer.weight.numel() for layer in integer_model.layers())
    return integer_model_bytes(integer_model) - stored_weight_bytes + packed_weight_bytes


def accuracy_table(metrics: Mapping[str, Any]) -> dict[str, float | int | None]:
    """The few figures `dvc metrics show` prints, from the evaluate stage's full metrics, as one flat row.

    Accuracies in percent on the test split (the keys name what ran, not a width, so that runs of different
    bits line up in `dvc metrics diff`; the widths are in metrics.json's ``quantization``); ``drop`` is fp32
    minus integer in points (negative: the integer model scored higher); ``c_mismatches`` counts test images
    whose C logits differ from the engine's (None without a C compiler); ``tflite_int8`` and ``tflite_mismatches`` the
    same for data/export/model.tflite run in TensorFlow Lite Micro; ``packed_bytes`` is the integer
    model's parameter bytes with the weights packed at their bits (what the engine and the C store, a byte per
    weight, is metrics.json's ``size_bytes.stored``). Flat, short keys keep the table within 160 columns.
    """
    accuracy = metrics["accuracy"]
    return {
        "fp32": accuracy["fp32"],
        "weights_only": accuracy["weights_only"],
        "integer": accuracy["integer"],
        "c": accuracy["c"],
        "onnx_qlinear": accuracy["onnx_qlinear"],
        "drop": round(accuracy["fp32"] - accuracy["integer"], 2),
        "c_mismatches": metrics["mismatches"]["c_logits"],
        "tflite_int8": accuracy["tflite_int8"],
        "tflite_mismatches": metrics["mismatches"]["tflite_logits"],
        "packed_bytes": metrics["size_bytes"]["packed"],
    }
