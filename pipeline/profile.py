"""Activation profiling on calibration data from the training split.

Observers (``pipeline.quant.observers``) record, in constant memory, the statistics of
every scale group's observed tensors (``pipeline.quant.scale_groups.scale_groups``: the tensors
a rescaling node reads) while the float model runs over a calibration subset; a
calibrator (``pipeline.quant.calibrators``) then turns each group's statistics into a
symmetric range, which maps onto the qmax of the group's integer range
(``pipeline.quant.scale_groups.group_ranges``: 127 for signed int8, 255 for a full-range unsigned
8-bit group). The test split is never used here.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from pipeline.graph.file import RecordedTrace
from pipeline.graph.nodes import FloatGraph, check_output_layer
from pipeline.graph.run import run_float
from pipeline.graph.trace import record_trace, replay_trace
from pipeline.quant.calibrators import activation_range
from pipeline.quant.observers import (
    ActivationObserver,
    ActivationStats,
    clipped_fraction,
)
from pipeline.quant.ranges import ZERO_RANGE_SCALE, ActivationFormat, scale_from_range
from pipeline.quant.scale_groups import scale_groups
from pipeline.transforms import normalized_batches

logger = logging.getLogger(__name__)


@torch.no_grad()
def profile_activations(
    graph: FloatGraph,
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int = 500,
    progress: bool | None = None,
    original: RecordedTrace | None = None,
    with_logits: bool = False,
) -> dict[str, dict[str, Any]]:
    """Statistics of every scale group over uint8 images (N, 32, 32, 3), by group root, in graph order.

    With ``with_logits``, also those of the float logits (the last layer's output, not a scale group),
    last, under that tensor's name (``logits_tensor``): int8 logits are calibrated from them.

    The observed values are the trained model's own (BatchNorm not folded): ``original``, its recorded calls
    (the graph file's), or those of ``graph.traced`` for a graph captured here. An equalized graph has neither
    (between its pairs the trained model's tensors are not its own): the graph itself runs.
    Each entry: the observer's ``stats()`` plus ``observed`` (the tensors merged into it) and
    ``read_by`` (the nodes whose inputs they are).
    """
    if original is None and graph.traced is not None:
        original = record_trace(graph.traced)
    groups = scale_groups(graph)
    observed = {root: (group.observed, group.read_by) for root, group in groups.items()}
    if with_logits:
        observed[logits_tensor(graph)] = ((logits_tensor(graph),), ())
    observers = {root: ActivationObserver() for root in observed}
    group_of = {name: root for root, (names, _) in observed.items() for name in names}

    def observe(name: str, value: torch.Tensor) -> None:
        try:
            observers[group_of[name]].observe(value)
        except ValueError as error:  # name the tensor: "observed tensor" alone says nothing of where
            raise ValueError(f"tensor {name!r}: {error}") from None

    def observe_grouped(name: str, value: torch.Tensor) -> None:
        if name in group_of:
            observe(name, value)

    for batch in normalized_batches(images, mean, std, batch_size, "profile", progress):
        if original is None:
            run_float(graph, batch, observe=observe_grouped)
        else:
            replay_trace(original, batch, group_of, observe)
    return {
        root: observers[root].stats() | {"observed": list(names), "read_by": list(read_by)}
        for root, (names, read_by) in observed.items()
    }


def logits_tensor(graph: FloatGraph) -> str:
    """The float logits' tensor: the last layer's output (the graph's output may be a flatten of it)."""
    return check_output_layer(graph).output


def calibrate_ranges(
    group_stats: dict[str, dict[str, Any]],
    calibrator: str,
    settings: Any = None,
    integer_ranges: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per scale group: the calibrated range, its integer range and scale, and the share of observed values
    beyond the range.

    ``settings`` are the calibrator's (``pipeline.quant.calibrators``), None for its defaults;
    ``integer_ranges`` each group's [qmin, qmax] (``scale_groups.group_ranges``), None for signed int8 everywhere.
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
            "clipped_fraction": clipped_fraction(ActivationStats.from_json(stats), value_range),
        }
    return calibrated


def _zero_range_warning(name: str) -> str:
    """What a calibration range of 0 for scale group ``name`` means. Every calibrator's range is 0 only when every
    observed value is 0 (the searching ones try ranges in (0, max|x|] only)."""
    return (f"activation {name!r}: calibration range 0 (every calibration value is 0): scale {ZERO_RANGE_SCALE} used, "
            "so it quantizes to 0; a layer that never activates on the calibration images?")
