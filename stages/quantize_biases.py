"""quantize-biases stage: int32 biases, fixed-point requantization, and the complete integer model."""
from __future__ import annotations

import logging
import sys

from pipeline.graph.nodes import UnsupportedModelError, with_biases
from pipeline.io import read_json
from pipeline.model_files import save_integer_model
from pipeline.quant.build import build_integer_model
from pipeline.quant.ranges import ActivationFormat
from pipeline.weights_file import load_corrected_biases, load_quantized_weights
from stages.common import INTEGER_MODEL, PROFILE, QUANTIZED_WEIGHTS, start_stage
from stages.inputs import load_stage_graph


def main() -> None:
    params = start_stage("quantize-biases").quantize_biases
    graph_file = load_stage_graph()
    profile = read_json(PROFILE)
    activation_ranges = {name: group["range"] for name, group in profile["activations"].items()}
    # The format the profile stage calibrated for (profile.activation_bits, profile.unsigned_activations).
    activation_format = ActivationFormat(**profile["activation_format"])
    quantized_weights, _ = load_quantized_weights(QUANTIZED_WEIGHTS)
    logits_range = None
    if params.logits == "int8":
        if "logits" not in profile:
            sys.exit(f"[quantize-biases] {PROFILE} has no logits range (written before int8 logits): rerun the "
                     "profile stage (dvc repro), or set quantize_biases.logits: int32")
        logits_range = profile["logits"]["range"]
    graph = with_biases(graph_file.graph, load_corrected_biases(QUANTIZED_WEIGHTS))  # bias correction's, where it ran
    try:
        integer_model = build_integer_model(
            graph, activation_ranges, quantized_weights, input_mean=graph_file.mean, input_std=graph_file.std,
            activation_format=activation_format, rounding=params.rounding, logits_range=logits_range,
        )
    except (OverflowError, UnsupportedModelError) as error:  # an int32 overflow is never clamped silently
        sys.exit(f"[quantize-biases] {error}")
    save_integer_model(integer_model, INTEGER_MODEL)
    for layer in integer_model.layers():
        out = integer_model.tensors[layer.output]
        target = "to int32 logits" if out.bits == 32 else f"to {out.type_name}"
        logging.info("%-6s bias int32 in [%d, %d], requantize %s", layer.name, int(layer.bias.min()),
                     int(layer.bias.max()), target)


if __name__ == "__main__":
    main()
