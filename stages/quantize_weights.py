"""quantize-weights stage: int8 (or narrower) weights and their scales, and the weight-only-quantized model."""
from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable

import torch

from pipeline.arrays import load_arrays
from pipeline.graph.file import GraphFile
from pipeline.graph.nodes import FloatGraph, folded_state_dict, with_biases
from pipeline.io import read_json, save_checkpoint
from pipeline.params import QuantizeWeightsParams
from pipeline.quant.bias_correction import corrected_biases
from pipeline.quant.calibrators import weight_range
from pipeline.quant.mixed_precision import (
    choose_bits,
    held_out_images,
    layer_sizes,
    noise_by_layer,
    packed_model_bytes,
)
from pipeline.quant.ranges import (
    ZERO_RANGE_SCALE,
    ActivationFormat,
    check_layer_bits,
    layer_bits,
)
from pipeline.quant.rounding import RoundingInputs, rounding_method
from pipeline.quant.scale_groups import activation_quantizer
from pipeline.quant.weights import dequantized_weights
from pipeline.transforms import calibration_indices
from pipeline.weights_file import save_quantized_weights
from stages.common import (
    ARRAYS,
    PROFILE,
    QUANTIZED_WEIGHTS,
    SENSITIVITY,
    WEIGHT_ONLY_CHECKPOINT,
    measured_with,
    start_stage,
)
from stages.inputs import load_stage_graph


def main() -> None:
    params = start_stage("quantize-weights").quantize_weights
    graph_file = load_stage_graph()
    graph = graph_file.graph
    num_weights = layer_sizes(graph)
    # Before any work: the packed size, the budget and every quantizer read each layer's bits.
    try:
        check_layer_bits(params.bits, list(num_weights))
    except ValueError as error:
        sys.exit(f"[quantize-weights] quantize_weights.bits: {error}")
    quantization = params.weight_quantization
    calibration = quantization.calibration
    for warning in _zero_range_warnings(graph, calibration.granularity):
        logging.warning(warning)
    budget = params.size_budget(sum(num_weights.values()))
    if budget is not None:
        quantization = dataclasses.replace(quantization, bits=_budget_bits(params, graph_file, budget))
    bits = quantization.bits
    # Narrower weights are still stored as int8 (here and in the integer model); packed is their size at their bits.
    meta = {"bits": bits, "calibrator": calibration.calibrator, "options": dataclasses.asdict(calibration.settings),
            "granularity": calibration.granularity, "equalize": graph_file.equalized, "rounding": quantization.rounding,
            "bias_correction": params.bias_correction,
            "packed_weight_bytes": packed_model_bytes(num_weights, bits)}
    if budget is not None:
        meta["size_budget_bytes"] = budget
    rounding = rounding_method(quantization.rounding)
    images = _calibration_images(params) if rounding.learns_from_images or params.bias_correction else None
    inputs = RoundingInputs(images, graph_file.mean, graph_file.std, lambda: _profiled_activations(graph))
    rounded = rounding.round(graph, quantization, inputs)
    quantized = rounded.weights
    meta |= rounded.report
    biases = corrected_biases(graph, quantized, images, graph_file.mean, graph_file.std) if params.bias_correction else {}
    if images is not None:
        meta["calibration"] = dataclasses.asdict(params.calibration)
    save_quantized_weights(quantized, meta, QUANTIZED_WEIGHTS, biases)
    # The weights (and corrected biases) of the BatchNorm-folded graph, by layer name (pipeline.graph.with_weights reads them).
    save_checkpoint(
        WEIGHT_ONLY_CHECKPOINT,
        dict(graph_file.checkpoint)
        | {"state_dict": folded_state_dict(with_biases(graph, biases), dequantized_weights(quantized)),
           "batchnorm_folded": True},
    )
    for name, (q_weight, scale) in quantized.items():
        logging.info("%-6s %s int%d weights, scale %s", name, tuple(q_weight.shape), layer_bits(bits, name),
                     f"{float(scale):.3e}" if scale.ndim == 0 else f"{len(scale)} per-channel")
    logging.info("weights: %d bytes packed at their bits, %d stored as int8", meta["packed_weight_bytes"],
                 sum(num_weights.values()))


def _zero_range_warnings(graph: FloatGraph, granularity: str) -> list[str]:
    """A warning for each layer with a weight calibration range of 0, per tensor or in some output channels: it gets
    scale ZERO_RANGE_SCALE there (exact, as all its weights there are 0: a dead layer, or pruned channels).

    Every weight calibrator's range is 0 exactly where max|w| is (sigma: mean and std 0; mse: r * max|w|), so
    ``minmax`` finds them without the chosen calibrator's search.
    """
    warnings = []
    for node in graph.layers():
        zero = weight_range(node.weight, 1, "minmax", granularity) == 0  # minmax ignores qmax (1)
        if bool(zero.all()):
            warnings.append(f"{node.name}: weight calibration range 0 (its weights are all 0): scale {ZERO_RANGE_SCALE} "
                            "used")
        elif bool(zero.any()):
            channels = ", ".join(str(index) for index in zero.nonzero().flatten().tolist())
            warnings.append(f"{node.name}: weight calibration range 0 in output channels {channels} of {len(zero)} "
                            f"(their weights are all 0): scale {ZERO_RANGE_SCALE} used for them")
    return warnings


def _budget_bits(params: QuantizeWeightsParams, graph_file: GraphFile, budget: int) -> dict[str, int]:
    """Each layer's bits within ``budget`` packed bytes: the sensitivity stage's noise, refined against the measured
    noise of whole allocations on its held-out images (``choose_bits``; the images its report names)."""
    graph = graph_file.graph
    key = f"quantize_weights.{params.size_budget_key} {getattr(params, params.size_budget_key)}"
    report = read_json(SENSITIVITY)
    expected = measured_with(graph_file.checkpoint["model"], graph_file.equalized, params.weight_calibration)
    if report["measured_with"] != expected:
        sys.exit(f"[quantize-weights] {key}: {SENSITIVITY} was measured with {report['measured_with']}, not with "
                 f"{expected}: set the sensitivity section's calibrator, granularity and calibrator settings to "
                 "quantize_weights' and run the sensitivity stage first (dvc repro sensitivity)")
    arrays = load_arrays(ARRAYS)
    try:
        images, _ = held_out_images(arrays.train_images, arrays.train_labels, report["num_samples"], report["seed"],
                                    graph_file.mean, graph_file.std)
        bits = choose_bits(graph, images, noise_by_layer(report["layers"]), budget, params.weight_calibration)
    except ValueError as error:
        sys.exit(f"[quantize-weights] {key}: {error}")
    logging.info("%s: %d bytes; bits chosen from %s: %s", key, budget, SENSITIVITY,
                 " ".join(f"{layer}:{width}" for layer, width in bits.items()))
    return bits


def _profiled_activations(graph: FloatGraph) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """The integer model's activation quantization from the profile stage's ranges and format, in float."""
    profile = read_json(PROFILE)
    ranges = {root: group["range"] for root, group in profile["activations"].items()}
    return activation_quantizer(graph, ranges, ActivationFormat(**profile["activation_format"]))


def _calibration_images(params: QuantizeWeightsParams) -> torch.Tensor:
    """The uint8 training images AdaRound and bias correction learn from (``quantize_weights.calibration``)."""
    train_images = load_arrays(ARRAYS).train_images
    try:
        indices = calibration_indices(len(train_images), params.calibration.num_samples, params.calibration.seed,
                                      "quantize_weights.calibration.num_samples")
    except ValueError as error:
        sys.exit(f"[quantize-weights] {error}")
    return torch.from_numpy(train_images[indices])


if __name__ == "__main__":
    main()
