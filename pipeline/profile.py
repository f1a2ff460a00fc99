"""Activation profiling on calibration data from the training split.

Observers (``pipeline.quant.observers``) record, in constant memory, the statistics of
every scale group's observed tensors (``pipeline.quant.build.scale_groups``: the tensors
a rescaling node reads) while the float model runs over a calibration subset; a
calibrator (``pipeline.quant.calibrators``) then turns each group's statistics into a
symmetric range, which maps onto the qmax of the group's integer range
(``pipeline.quant.build.group_ranges``: 127 for signed int8, 255 for a full-range unsigned
8-bit group). The test split is never used here.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.data import sample_indices
from pipeline.graph.capture import observe_original
from pipeline.graph.nodes import FloatGraph
from pipeline.graph.run import run_float
from pipeline.quant.build import scale_groups
from pipeline.quant.calibrators import activation_range
from pipeline.quant.observers import ActivationObserver
from pipeline.quant.ranges import ZERO_RANGE_SCALE, ActivationFormat, scale_from_range
from pipeline.train import normalized_batches

logger = logging.getLogger(__name__)


def calibration_indices(num_train: int, num_samples: int, seed: int, key: str = "profile.num_samples") -> np.ndarray:
    """A sorted random subset of ``num_samples`` training indices, reproducible from ``seed`` (``key``: the param, for errors)."""
    if not 1 <= num_samples <= num_train:
        raise ValueError(f"{key}: value {num_samples} is out of range; allowed: 1..{num_train} (training images)")
    return sample_indices(num_train, num_samples, seed)


@torch.no_grad()
def profile_activations(
    graph: FloatGraph,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 500,
    progress: bool | None = None,
) -> dict[str, dict[str, Any]]:
    """Statistics of every scale group over uint8 images (N, 32, 32, 3), by group root, in graph order.

    Each entry: the observer's ``stats()`` plus ``observed`` (the tensors merged into it) and
    ``read_by`` (the nodes whose inputs they are).
    """
    groups = scale_groups(graph)
    observers = {root: ActivationObserver() for root in groups}
    group_of = {name: root for root, group in groups.items() for name in group.observed}

    def observe(name: str, value: torch.Tensor) -> None:
        try:
            observers[group_of[name]].observe(value)
        except ValueError as error:  # name the tensor: "observed tensor" alone says nothing of where
            raise ValueError(f"tensor {name!r}: {error}") from None

    def observe_grouped(name: str, value: torch.Tensor) -> None:
        if name in group_of:
            observe(name, value)

    for batch in normalized_batches(images, mean, std, batch_size, "profile", progress):
        if graph.traced is None:  # an equalized graph: between its pairs, the trained model's tensors are not its own
            run_float(graph, batch, observe=observe_grouped)
        else:
            observe_original(graph, batch, group_of, observe)
    return {
        root: observers[root].stats() | {"observed": list(group.observed), "read_by": list(group.read_by)}
        for root, group in groups.items()
    }


def calibrate_ranges(
    group_stats: dict[str, dict[str, Any]],
    calibrator: str,
    settings: Any = None,
    integer_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per scale group: the calibrated range, its integer range and scale, and the share of observed values
    beyond the range.

    ``settings`` are the calibrator's (``pipeline.quant.calibrators``), None for its defaults;
    ``integer_ranges`` each group's [qmin, qmax] (``build.group_ranges``), None for signed int8 everywhere.
    """
    calibrated = {}
    for name, stats in group_stats.items():
        qmin, qmax = ActivationFormat().range(signed=True) if integer_ranges is None else integer_ranges[name]
        value_range = activation_range(stats, calibrator, settings, qmax)
        if value_range == 0:
            logger.warning(_zero_range_warning(name))
        calibrated[name] = {
            "range": value_range,
            "qmin": qmin,
            "qmax": qmax,
            "scale": scale_from_range(value_range, qmax),
            "clipped_fraction": clipped_fraction(stats, value_range),
        }
    return calibrated


def _zero_range_warning(name: str) -> str:
    """What a calibration range of 0 for scale group ``name`` means. Every calibrator's range is 0 only when every
    observed value is 0 (the searching ones try ranges in (0, max|x|] only)."""
    return (f"activation {name!r}: calibration range 0 (every calibration value is 0): scale {ZERO_RANGE_SCALE} used, "
            "so it quantizes to 0; a layer that never activates on the calibration images?")


def clipped_fraction(stats: dict[str, Any], clip_range: float) -> float:
    """Share of observed values with |x| > clip_range, from the histogram (exact to one bin)."""
    counts = np.asarray(stats["hist_counts"], dtype=np.float64)
    span, bins = stats["hist_span"], stats["num_bins"]
    if span == 0 or clip_range >= stats["abs_max"]:
        return 0.0
    centers = -span + (np.arange(bins) + 0.5) * (2 * span / bins)
    return float(counts[np.abs(centers) > clip_range].sum() / counts.sum())
