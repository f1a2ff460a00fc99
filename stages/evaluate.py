"""evaluate stage: test-split accuracy of the float, weights-only and integer models; agreement, SQNR, sizes."""
from __future__ import annotations

import logging
import math

import torch

from pipeline.arrays import load_arrays
from pipeline.evaluation import (
    accuracy_report,
    accuracy_table,
    engine_logits,
    export_agreement,
    float_model_bytes,
    integer_model_bytes,
    output_sqnr,
    packed_integer_model_bytes,
    percent_equal,
    simulated_predictions,
    weight_sqnr,
)
from pipeline.graph.nodes import with_weights
from pipeline.graph.run import GraphModel
from pipeline.io import read_json, write_json
from pipeline.model_files import load_integer_model
from pipeline.models import predict
from pipeline.transforms import normalize, sample_indices
from pipeline.weights_file import load_quantized_weights
from stages.common import (
    ACCURACY,
    ARRAYS,
    EXPORT_DIR,
    INTEGER_MODEL,
    MANIFEST,
    METRICS,
    PROFILE,
    QUANTIZED_WEIGHTS,
    WEIGHT_ONLY_CHECKPOINT,
    start_stage,
)
from stages.inputs import load_stage_checkpoint, load_stage_graph
from stages.trained_model import load_trained_model

SQNR_IMAGES = 1000  # test images for the per-layer output SQNR, a seeded random subset


def _decibels(values: dict[str, float]) -> dict[str, float | None]:
    # JSON has no infinity: an exact layer (no quantization noise) is reported as null.
    return {name: round(value, 2) if math.isfinite(value) else None for name, value in values.items()}


def main() -> None:
    params = start_stage("evaluate").evaluate
    arrays = load_arrays(ARRAYS)
    images, labels = torch.from_numpy(arrays.test_images), torch.from_numpy(arrays.test_labels)
    # fp32 is the trained model itself, as trained (BatchNorm not folded); the rest starts from the graph stage's graph.
    model, checkpoint = load_trained_model()
    graph = load_stage_graph().graph
    mean, std = checkpoint["mean"], checkpoint["std"]

    fp32 = accuracy_report(predict(model, images, mean, std, params.batch_size), labels, arrays.class_names)
    weight_only = GraphModel(with_weights(graph, load_stage_checkpoint(WEIGHT_ONLY_CHECKPOINT)["state_dict"]))
    weights_quantized = predict(weight_only, images, mean, std, params.batch_size)
    integer_model = load_integer_model(INTEGER_MODEL)
    integer_logits = engine_logits(integer_model, images, mean, std, params.batch_size)
    engine = integer_logits.argmax(1)
    simulated = simulated_predictions(integer_model, images, mean, std, params.batch_size)
    # Every test image through the exported C (compiled here) and ONNX models, against the engine.
    exported = export_agreement(
        integer_model, EXPORT_DIR, normalize(images, mean, std), labels, engine_logits=integer_logits
    )
    # Not a prefix: an image-folder source stores the test split grouped by class.
    sqnr_indices = torch.from_numpy(sample_indices(len(images), min(SQNR_IMAGES, len(images)), seed=0))
    _, weight_meta = load_quantized_weights(QUANTIZED_WEIGHTS)
    profile = read_json(PROFILE)
    manifest = read_json(MANIFEST)

    metrics = {
        "accuracy": {
            "fp32": round(fp32["accuracy"], 2),
            "weights_only": percent_equal(weights_quantized, labels),
            "integer": percent_equal(engine, labels),
            "simulated": percent_equal(simulated, labels),
            "onnx_qlinear": exported["accuracy"]["onnx_qlinear"],
            "onnx_integer": exported["accuracy"]["onnx_integer"],
            "c": exported["accuracy"].get("c"),
            "tflite_int8": exported["accuracy"]["tflite_int8"],
        },
        "agreement": {
            "engine_vs_simulated": percent_equal(engine, simulated),
            "engine_vs_onnx": exported["onnx_qlinear_agreement"],
        },
        "mismatches": {  # test images whose logits differ from the Python engine's (None: no C compiler)
            "c_logits": exported["c_logit_mismatches"],
            "onnx_integer_logits": exported["onnx_integer_logit_mismatches"],
            "onnx_qlinear_logits": exported["onnx_qlinear_logit_mismatches"],
            "tflite_logits": exported["tflite_logit_mismatches"],  # data/export/model.tflite in TensorFlow Lite Micro
        },
        "sqnr_db": {
            "weights": _decibels(weight_sqnr(graph, integer_model)),
            "outputs": _decibels(output_sqnr(graph, integer_model, normalize(images[sqnr_indices], mean, std))),
        },
        # Narrower weights are stored a byte each (stored); packed is the size a runtime packing them would need.
        "size_bytes": {
            "fp32": float_model_bytes(graph),
            "stored": integer_model_bytes(integer_model),
            "packed": packed_integer_model_bytes(integer_model, weight_meta["packed_weight_bytes"]),
        },
        "quantization": {
            "weight_bits": weight_meta["bits"],
            "weight_calibrator": weight_meta["calibrator"],
            "granularity": weight_meta["granularity"],
            "equalize": weight_meta["equalize"],
            "weight_rounding": weight_meta["rounding"],
            "bias_correction": weight_meta["bias_correction"],
            "activation_calibrator": profile["calibrator"],
            "activation_bits": profile["activation_format"]["bits"],
            "unsigned_activations": profile["activation_format"]["unsigned"],
            "calibration_images": profile["num_samples"],
        },
        "per_class_accuracy": {"fp32": {k: round(v, 2) for k, v in fp32["per_class"].items() if v is not None}},
        "test_images": len(labels),
        "dataset": {"source": manifest["source"], "format": manifest["format"]},
    }
    write_json(METRICS, metrics)
    write_json(ACCURACY, accuracy_table(metrics))
    accuracy = metrics["accuracy"]
    # The widths are in quantize-weights' and profile's logs; naming them here would make this stage depend on
    # the results table's labels (pipeline.report), and re-run on every change to the table.
    logging.info(
        "test accuracy on %d images: fp32 %.2f%%, weights only %.2f%%, integer %.2f%% (simulation %.2f%%, "
        "engine = simulation on %.2f%%)", len(labels), accuracy["fp32"], accuracy["weights_only"],
        accuracy["integer"], accuracy["simulated"], metrics["agreement"]["engine_vs_simulated"],
    )


if __name__ == "__main__":
    main()
