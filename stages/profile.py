"""profile stage: statistics of every scale group on training-split calibration images, and the calibrated ranges.

It also fixes the activation format (``profile.activation_bits``, ``profile.unsigned_activations``): each
group's range maps onto its integer range's qmax, and quantize-biases builds the model with the format
recorded in data/profile.json.
"""
from __future__ import annotations

import dataclasses
import logging
import sys

import torch

from pipeline.data import load_arrays
from pipeline.io import write_json
from pipeline.profile import calibrate_ranges, calibration_indices, profile_activations
from pipeline.quant.build import group_ranges
from stages.common import ARRAYS, PROFILE, load_trained_graph, start_stage


def main() -> None:
    all_params = start_stage("profile")
    params = all_params.profile
    train_images = load_arrays(ARRAYS).train_images
    _, graph, checkpoint = load_trained_graph(all_params.train.model, "profile", all_params.quantize_weights.equalize)
    try:
        indices = calibration_indices(len(train_images), params.num_samples, params.seed)
    except ValueError as error:
        sys.exit(f"[profile] {error}")
    try:
        group_stats = profile_activations(
            graph, torch.from_numpy(train_images[indices]), checkpoint["mean"], checkpoint["std"], params.batch_size
        )
    except ValueError as error:  # finite weights can still overflow to inf in a layer's input
        sys.exit(f"[profile] {error}")
    settings = params.calibrator_settings
    activation_format = params.activation_format
    calibrated = calibrate_ranges(group_stats, params.calibrator, settings, group_ranges(graph, activation_format))
    write_json(
        PROFILE,
        {
            "split": "train",
            "num_samples": params.num_samples,
            "seed": params.seed,
            "calibrator": params.calibrator,
            "calibrator_options": dataclasses.asdict(settings),
            "activation_format": dataclasses.asdict(activation_format),
            # One entry per scale group (pipeline.quant.build.scale_groups), by its first tensor's name.
            "activations": {name: {"stats": group_stats[name], **calibrated[name]} for name in group_stats},
            "indices": indices.tolist(),
        },
    )
    for name, chosen in calibrated.items():
        logging.info("%-6s (read by %s) range %.4f onto [%d, %d] (scale %.6f, %.4f%% clipped)", name,
                     ", ".join(group_stats[name]["read_by"]), chosen["range"], chosen["qmin"], chosen["qmax"],
                     chosen["scale"],
                     100 * chosen["clipped_fraction"])


if __name__ == "__main__":
    main()
