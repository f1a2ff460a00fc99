"""quantize-biases stage: int32 biases, fixed-point requantization, and the complete integer model."""
from __future__ import annotations

import logging
import sys

from pipeline.io import read_json
from pipeline.quant.model import build_integer_model, load_quantized_weights, save_integer_model
from stages.common import CHECKPOINT, INTEGER_MODEL, PROFILE, QUANTIZED_WEIGHTS, load_trained_model, start_stage


def main() -> None:
    params = start_stage("quantize-biases")
    model, checkpoint = load_trained_model(params.train.model, CHECKPOINT)
    activation_ranges = {name: layer["range"] for name, layer in read_json(PROFILE)["layers"].items()}
    quantized_weights, _ = load_quantized_weights(QUANTIZED_WEIGHTS)
    try:
        integer_model = build_integer_model(
            model,
            activation_ranges,
            input_mean=checkpoint["mean"],
            input_std=checkpoint["std"],
            quantized_weights=quantized_weights,
        )
    except OverflowError as error:  # a bias or accumulator that int32 cannot hold: never clamped silently
        sys.exit(f"[quantize-biases] {error}")
    save_integer_model(integer_model, INTEGER_MODEL)
    for op in integer_model.ops:
        if op["op"] in ("conv2d", "linear"):
            logging.info("%-6s bias int32 in [%d, %d], requantize %s", op["name"], int(op["bias"].min()),
                         int(op["bias"].max()), "to int8" if op["output_bits"] == 8 else "to int32 logits")


if __name__ == "__main__":
    main()
