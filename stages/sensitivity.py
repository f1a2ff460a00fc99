"""sensitivity stage: each layer's held-out accuracy and output SQNR at each weight width with only that layer
quantized, and the size-accuracy curve of uniform and mixed-precision weights (pipeline.quant.mixed_precision).

The held-out images are a seeded random subset of the training split, never the test split. They may
overlap the profile and AdaRound calibration images on purpose: nothing measured here was fitted on
those (round-to-nearest weights, float activations), and keeping the subsets independent spares this
stage a dependency on the profile and calibration params. The weight quantizer measured is the section's own
(``sensitivity.calibrator``, ...): keep it quantize_weights', or a size budget refuses the measurement.
"""
from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from pipeline.arrays import load_arrays
from pipeline.io import atomic_path, write_json
from pipeline.quant.mixed_precision import (
    CurvePoint,
    curve_json,
    curve_rows,
    heat_map_rows,
    held_out_images,
    layer_sensitivity,
    layer_sizes,
    noise_by_layer,
    sensitivity_table,
    size_accuracy_curve,
    table_json,
    weight_quantized_accuracy,
)
from stages.common import ARRAYS, PLOTS_DIR, SENSITIVITY, measured_with, start_stage
from stages.inputs import load_stage_graph

SENSITIVITY_CSV = "sensitivity.csv"  # the layers x bits heat maps (dvc.yaml's plots)
SIZE_ACCURACY_CSV = "size_accuracy.csv"  # the size-accuracy curve, uniform and mixed widths


def write_plot_data(table: Mapping[str, Mapping[int, Mapping[str, float]]], curve: Sequence[CurvePoint],
                    float_accuracy: float, out_dir: Path) -> None:
    """The stage's plot data: one row per layer and width, one per curve point."""
    for name, rows in ((SENSITIVITY_CSV, heat_map_rows(table, float_accuracy)), (SIZE_ACCURACY_CSV, curve_rows(curve))):
        with atomic_path(out_dir / name) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")


def main() -> None:
    params = start_stage("sensitivity").sensitivity
    arrays = load_arrays(ARRAYS)
    graph_file = load_stage_graph()
    graph = graph_file.graph
    try:
        images, labels = held_out_images(arrays.train_images, arrays.train_labels, params.num_samples, params.seed,
                                         graph_file.mean, graph_file.std)
    except ValueError as error:
        sys.exit(f"[sensitivity] {error}")
    calibration = params.weight_calibration
    float_accuracy = weight_quantized_accuracy(graph, images, labels, {})
    table = layer_sensitivity(graph, images, labels, params.bits, calibration)
    # At the narrowest width's size the only allocation is every layer at it: no mixed point to compare.
    curve = size_accuracy_curve(graph, images, labels, noise_by_layer(table), sorted(params.bits[1:], reverse=True),
                                calibration)
    num_weights = layer_sizes(graph)
    write_json(SENSITIVITY, {
        "split": "train", "num_samples": params.num_samples, "seed": params.seed,
        "measured_with": measured_with(graph_file.checkpoint["model"], graph_file.equalized, calibration),
        "float_accuracy": float_accuracy,
        "num_weights": num_weights,
        "layers": table_json(table),
        # By width: every layer at it ("uniform"), and the allocation at its packed size ("mixed").
        "size_accuracy": curve_json(curve),
    })
    write_plot_data(table, curve, float_accuracy, PLOTS_DIR)
    logging.info("%d held-out training images\n%s", params.num_samples, sensitivity_table(table, num_weights, float_accuracy))
    for point in curve:
        logging.info("%-7s at the %d-bit size: %7d packed bytes, held-out %.2f%%, bits %s", point.series, point.width,
                     point.packed_bytes, point.accuracy, " ".join(f"{layer}:{bits}" for layer, bits in point.bits.items()))


if __name__ == "__main__":
    main()
