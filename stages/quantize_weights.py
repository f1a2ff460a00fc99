"""quantize-weights stage: int8 (or narrower) weights and their scales, and the weight-only-quantized model."""
from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import Any

import torch

from pipeline.data import load_arrays
from pipeline.graph.nodes import FloatGraph, folded_state_dict, with_biases
from pipeline.io import read_json, save_checkpoint
from pipeline.model_files import save_quantized_weights
from pipeline.params import Params, QuantizeWeightsParams
from pipeline.profile import calibration_indices
from pipeline.quant.adaround import adaround_model_weights
from pipeline.quant.bias_correction import corrected_biases
from pipeline.quant.build import activation_quantizer, quantize_model_weights
from pipeline.quant.calibrators import weight_range
from pipeline.quant.engine import dequantized_weights
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
from stages.common import (
    ARRAYS,
    PROFILE,
    QUANTIZED_WEIGHTS,
    SENSITIVITY,
    WEIGHT_ONLY_CHECKPOINT,
    load_trained_graph,
    measured_with,
    start_stage,
)

# How the log names the rounding each layer kept (``adaround_model_weights``' "kept").
KEPT_ROUNDING = {"adaround": "learned rounding", "nearest": "round-to-nearest"}


def main() -> None:
    all_params = start_stage("quantize-weights")
    params = all_params.quantize_weights
    _, graph, checkpoint = load_trained_graph(all_params.train.model, "quantize-weights", params.equalize)
    num_weights = layer_sizes(graph)
    # Before any work: the packed size, the budget and every quantizer read each layer's bits.
    try:
        check_layer_bits(params.bits, list(num_weights))
    except ValueError as error:
        sys.exit(f"[quantize-weights] quantize_weights.bits: {error}")
    for warning in _zero_range_warnings(graph, params.granularity):
        logging.warning(warning)
    settings = params.calibrator_settings
    budget = params.size_budget(sum(num_weights.values()))
    bits = params.bits if budget is None else _budget_bits(all_params, graph, checkpoint, budget)
    # Narrower weights are still stored as int8 (here and in the integer model); packed is their size at their bits.
    meta = {"bits": bits, "calibrator": params.calibrator, "options": dataclasses.asdict(settings),
            "granularity": params.granularity, "equalize": params.equalize, "rounding": params.rounding,
            "bias_correction": params.bias_correction,
            "packed_weight_bytes": packed_model_bytes(num_weights, bits)}
    if budget is not None:
        meta["size_budget_bytes"] = budget
    images = _calibration_images(params) if params.rounding == "adaround" or params.bias_correction else None
    if params.rounding == "nearest":
        quantized = quantize_model_weights(graph, bits, params.calibrator, params.granularity, settings)
    else:
        quantized, errors = adaround_model_weights(
            graph, images, checkpoint["mean"], checkpoint["std"], bits,
            params.calibrator, params.granularity, settings, params.adaround,
            activations=_profiled_activations(graph) if params.adaround.quantized_activations else None,
        )
        meta |= {"adaround": dataclasses.asdict(params.adaround), "reconstruction_error": errors}
        for name, error in errors.items():
            logging.info("%-6s reconstruction error: nearest %.4g, adaround %.4g: kept %s", name, error["nearest"],
                         error["adaround"], KEPT_ROUNDING[error["kept"]])
    biases = corrected_biases(graph, quantized, images, checkpoint["mean"], checkpoint["std"]) if params.bias_correction else {}
    if images is not None:
        meta["calibration"] = dataclasses.asdict(params.calibration)
    save_quantized_weights(quantized, meta, QUANTIZED_WEIGHTS, biases)
    # The weights (and corrected biases) of the BatchNorm-folded graph, by layer name (pipeline.graph.with_weights reads them).
    save_checkpoint(
        WEIGHT_ONLY_CHECKPOINT,
        {key: value for key, value in checkpoint.items() if key != "state_dict"}
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


def _budget_bits(all_params: Params, graph: FloatGraph, checkpoint: dict[str, Any], budget: int) -> dict[str, int]:
    """Each layer's bits within ``budget`` packed bytes: the sensitivity stage's noise, refined against the measured
    noise of whole allocations on its held-out images (``choose_bits``)."""
    params, model = all_params.quantize_weights, all_params.train.model
    key = f"quantize_weights.{params.size_budget_key} {getattr(params, params.size_budget_key)}"
    report = read_json(SENSITIVITY)
    if report["measured_with"] != measured_with(model, params):
        sys.exit(f"[quantize-weights] {key}: {SENSITIVITY} was measured with {report['measured_with']}, not with "
                 f"{measured_with(model, params)}: run the sensitivity stage first (dvc repro sensitivity)")
    arrays = load_arrays(ARRAYS)
    try:
        images, _ = held_out_images(arrays.train_images, arrays.train_labels, all_params.sensitivity.num_samples,
                                    all_params.sensitivity.seed, checkpoint["mean"], checkpoint["std"])
        bits = choose_bits(graph, images, noise_by_layer(report["layers"]), budget, params.calibrator,
                           params.granularity, params.calibrator_settings)
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
