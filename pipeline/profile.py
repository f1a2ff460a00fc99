"""Activation profiling on calibration data from the training split.

Observers (``pipeline.quant.observers``) record, in constant memory, the
statistics of the input of every quantized layer while the float model runs
over a calibration subset; a calibrator (``pipeline.quant.calibrators``) then
turns each layer's statistics into a symmetric int8 range. The test split is
never used here.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.data import sample_indices
from pipeline.quant.calibrators import activation_range
from pipeline.quant.graph import quantized_layer_names
from pipeline.quant.observers import register_observers
from pipeline.quant.ranges import ACTIVATION_QMAX, scale_from_range
from pipeline.train import normalized_batches


def calibration_indices(num_train: int, num_samples: int, seed: int) -> np.ndarray:
    """A sorted random subset of ``num_samples`` training indices, reproducible from ``seed``."""
    if not 1 <= num_samples <= num_train:
        raise ValueError(f"profile.num_samples: value {num_samples} is out of range; allowed: 1..{num_train} (training images)")
    return sample_indices(num_train, num_samples, seed)


@torch.no_grad()
def profile_activations(
    model: nn.Sequential,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 500,
    progress: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Statistics of the input of every Conv2d/Linear child over uint8 images (N, 32, 32, 3), by layer name."""
    model.eval()
    observers, handles = register_observers(model, quantized_layer_names(model))
    try:
        for batch in normalized_batches(images, mean, std, batch_size, "profile", progress):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: observer.stats() for name, observer in observers.items()}


def calibrate_ranges(
    layer_stats: dict[str, dict[str, Any]], calibrator: str, options: dict[str, Any]
) -> dict[str, dict[str, float]]:
    """Per layer: the calibrated input range, its int8 scale, and the share of observed values beyond the range."""
    calibrated = {}
    for name, stats in layer_stats.items():
        input_range = activation_range(stats, calibrator, **options)
        calibrated[name] = {
            "range": input_range,
            "scale": scale_from_range(input_range, ACTIVATION_QMAX),
            "clipped_fraction": clipped_fraction(stats, input_range),
        }
    return calibrated


def clipped_fraction(stats: dict[str, Any], clip_range: float) -> float:
    """Share of observed values with |x| > clip_range, from the histogram (exact to one bin)."""
    counts = np.asarray(stats["hist_counts"], dtype=np.float64)
    span, bins = stats["hist_span"], stats["num_bins"]
    if span == 0 or clip_range >= stats["abs_max"]:
        return 0.0
    centers = -span + (np.arange(bins) + 0.5) * (2 * span / bins)
    return float(counts[np.abs(centers) > clip_range].sum() / counts.sum())
