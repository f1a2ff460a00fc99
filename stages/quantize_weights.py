"""quantize-weights stage: int8 (or narrower) weights and their scales, and the weight-only-quantized model."""
from __future__ import annotations

import dataclasses
import logging
import sys

import torch

from pipeline.data import load_arrays
from pipeline.graph import folded_state_dict, with_biases
from pipeline.io import save_checkpoint
from pipeline.model_files import save_quantized_weights
from pipeline.params import QuantizeWeightsParams
from pipeline.profile import calibration_indices
from pipeline.quant.adaround import adaround_model_weights
from pipeline.quant.bias_correction import corrected_biases
from pipeline.quant.build import quantize_model_weights
from pipeline.quant.engine import dequantized_weights
from pipeline.quant.ranges import check_layer_bits, layer_bits
from stages.common import ARRAYS, QUANTIZED_WEIGHTS, WEIGHT_ONLY_CHECKPOINT, load_trained_graph, start_stage


def main() -> None:
    all_params = start_stage("quantize-weights")
    params = all_params.quantize_weights
    _, graph, checkpoint = load_trained_graph(all_params.train.model, "quantize-weights")
    settings = params.calibrator_settings
    meta = {"bits": params.bits, "calibrator": params.calibrator, "options": dataclasses.asdict(settings),
            "granularity": params.granularity, "rounding": params.rounding, "bias_correction": params.bias_correction}
    try:
        check_layer_bits(params.bits, [node.name for node in graph.layers()])
    except ValueError as error:
        sys.exit(f"[quantize-weights] quantize_weights.bits: {error}")
    images = _calibration_images(params) if params.rounding == "adaround" or params.bias_correction else None
    if params.rounding == "nearest":
        quantized = quantize_model_weights(graph, params.bits, params.calibrator, params.granularity, settings)
    else:
        quantized, errors = adaround_model_weights(
            graph, images, checkpoint["mean"], checkpoint["std"], params.bits,
            params.calibrator, params.granularity, settings, params.adaround,
        )
        meta |= {"adaround": dataclasses.asdict(params.adaround), "reconstruction_error": errors}
        for name, error in errors.items():
            logging.info("%-6s reconstruction error: nearest %.4g, adaround %.4g", name, error["nearest"],
                         error["adaround"])
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
        logging.info("%-6s %s int%d weights, scale %s", name, tuple(q_weight.shape), layer_bits(params.bits, name),
                     f"{float(scale):.3e}" if scale.ndim == 0 else f"{len(scale)} per-channel")


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
