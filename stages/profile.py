"""profile stage: statistics of every scale group and of the logits on training-split calibration images, and the
calibrated ranges.

It also fixes the activation format (``profile.activation_bits``, ``profile.unsigned_activations``): each
group's range maps onto its integer range's qmax, and quantize-biases builds the model with the format
recorded in data/profile.json.
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import torch

from pipeline.arrays import load_arrays
from pipeline.io import write_json
from pipeline.profile import calibrate_ranges, logits_tensor, profile_activations
from pipeline.quant.ranges import ActivationFormat
from pipeline.quant.scale_groups import group_ranges
from pipeline.transforms import calibration_indices
from stages.common import ARRAYS, PROFILE, start_stage
from stages.inputs import load_stage_graph


def main() -> None:
    params = start_stage("profile").profile
    train_images = load_arrays(ARRAYS).train_images
    graph_file = load_stage_graph()
    graph = graph_file.graph
    try:
        indices = calibration_indices(len(train_images), params.num_samples, params.seed)
    except ValueError as error:
        sys.exit(f"[profile] {error}")
    try:
        # The trained model's own calls (BatchNorm not folded), replayed: what it computes, bit for bit.
        group_stats = profile_activations(
            graph, torch.from_numpy(train_images[indices]), graph_file.mean, graph_file.std, params.batch_size,
            original=graph_file.original, with_logits=True,
        )
    except ValueError as error:  # finite weights can still overflow to inf in a layer's input
        sys.exit(f"[profile] {error}")
    settings = params.calibrator_settings
    activation_format = ActivationFormat(params.activation_bits, params.unsigned_activations)
    logits_name = logits_tensor(graph)
    logits_stats = {logits_name: group_stats.pop(logits_name)}
    calibrated = calibrate_ranges(group_stats, params.calibrator, settings, group_ranges(graph, activation_format))
    # int8 logits (quantize_biases.logits), signed [-128, 127] whatever the activation format: TFLite's output
    logits = calibrate_ranges(logits_stats, params.calibrator, settings)[logits_name]
    write_json(
        PROFILE,
        {
            "split": "train",
            "num_samples": params.num_samples,
            "seed": params.seed,
            "calibrator": params.calibrator,
            "calibrator_options": dataclasses.asdict(settings),
            "activation_format": dataclasses.asdict(activation_format),
            # One entry per scale group (pipeline.quant.scale_groups.scale_groups), by its first tensor's name.
            "activations": {name: {"stats": group_stats[name], **calibrated[name]} for name in group_stats},
            # The float logits (the last layer's output), calibrated as an int8 tensor.
            "logits": {"tensor": logits_name, "stats": logits_stats[logits_name], **logits},
            "indices": indices.tolist(),
        },
    )
    for name, chosen in calibrated.items():
        logging.info("%-6s (read by %s) range %.4f onto [%d, %d] (scale %.6f, %.4f%% clipped)", name,
                     ", ".join(group_stats[name]["read_by"]), chosen["range"], chosen["qmin"], chosen["qmax"],
                     chosen["scale"],
                     100 * chosen["clipped_fraction"])
    logging.info("logits (%s) range %.4f onto [-128, 127] (scale %.6f, %.4f%% clipped)", logits_name, logits["range"],
                 logits["scale"], 100 * logits["clipped_fraction"])


if __name__ == "__main__":
    main()
