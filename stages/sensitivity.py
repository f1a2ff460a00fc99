"""sensitivity stage: each layer's held-out accuracy and output SQNR at each weight width with only that layer
quantized, and the size-accuracy curve of uniform and mixed-precision weights (pipeline.quant.mixed_precision).

The held-out images are a seeded random subset of the training split, never the test split. They may
overlap the profile and AdaRound calibration images on purpose: nothing measured here was fitted on
those (round-to-nearest weights, float activations), and keeping the subsets independent spares this
stage a dependency on the profile and calibration params.
"""
from __future__ import annotations

import logging
import sys

from pipeline.data import load_arrays
from pipeline.io import write_json
from pipeline.plots import write_sensitivity_plots
from pipeline.quant.mixed_precision import (
    curve_json,
    held_out_images,
    layer_sensitivity,
    layer_sizes,
    noise_by_layer,
    sensitivity_table,
    size_accuracy_curve,
    table_json,
    weight_quantized_accuracy,
)
from stages.common import (
    ARRAYS,
    PLOTS_DIR,
    SENSITIVITY,
    load_trained_graph,
    measured_with,
    start_stage,
)


def main() -> None:
    all_params = start_stage("sensitivity")
    params, weights = all_params.sensitivity, all_params.quantize_weights
    arrays = load_arrays(ARRAYS)
    _, graph, checkpoint = load_trained_graph(all_params.train.model, "sensitivity", all_params.quantize_weights.equalize)
    try:
        images, labels = held_out_images(arrays.train_images, arrays.train_labels, params.num_samples, params.seed,
                                         checkpoint["mean"], checkpoint["std"])
    except ValueError as error:
        sys.exit(f"[sensitivity] {error}")
    quantizer = (weights.calibrator, weights.granularity, weights.calibrator_settings)
    float_accuracy = weight_quantized_accuracy(graph, images, labels, {})
    table = layer_sensitivity(graph, images, labels, params.bits, *quantizer)
    # At the narrowest width's size the only allocation is every layer at it: no mixed point to compare.
    curve = size_accuracy_curve(graph, images, labels, noise_by_layer(table), sorted(params.bits[1:], reverse=True),
                                *quantizer)
    num_weights = layer_sizes(graph)
    write_json(SENSITIVITY, {
        "split": "train", "num_samples": params.num_samples, "seed": params.seed,
        "measured_with": measured_with(all_params.train.model, weights),
        "float_accuracy": float_accuracy,
        "num_weights": num_weights,
        "layers": table_json(table),
        # By width: every layer at it ("uniform"), and the allocation at its packed size ("mixed").
        "size_accuracy": curve_json(curve),
    })
    write_sensitivity_plots(table, curve, float_accuracy, PLOTS_DIR)
    logging.info("%d held-out training images\n%s", params.num_samples, sensitivity_table(table, num_weights, float_accuracy))
    for point in curve:
        logging.info("%-7s at the %d-bit size: %7d packed bytes, held-out %.2f%%, bits %s", point.series, point.width,
                     point.packed_bytes, point.accuracy, " ".join(f"{layer}:{bits}" for layer, bits in point.bits.items()))


if __name__ == "__main__":
    main()
