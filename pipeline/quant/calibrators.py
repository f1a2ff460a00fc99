"""Calibrators: statistics in, clipping range out. Adding one is adding one function.

A range is the largest magnitude kept; the scale follows as range / qmax
(``pipeline.quant.ranges.scale_from_range``).

Activation calibrators, in ``ACTIVATION_CALIBRATORS``, map an observer's
``stats()`` dict (``pipeline.quant.observers``), the tensor's integer qmax and
their settings to a float range. They work on the histogram of |x|, folded from
the observer's symmetric histogram of x, and treat the grid as qmax steps from 0
to the range: 127 for signed int8, 255 for an unsigned (non-negative) 8-bit
tensor, 7 for signed 4-bit; the searching calibrators (mse, entropy) use it.

Weight calibrators, in ``WEIGHT_CALIBRATORS``, map a float64 matrix of shape
(groups, values) and the integer qmax to one range per group. ``weight_range``
makes the groups from the granularity: one group for ``PerTensor()``, one per
output channel (index of ``axis``) for ``PerChannel(axis)``, so every weight
calibrator serves both granularities.

Each calibrator's options are one frozen settings dataclass
(``pipeline.quant.settings``: ``SigmaSettings``, ``PercentileSettings``, ...)
whose fields are the range function's keyword arguments: the defaults live
there, checked once when the settings are made, and ``params.yaml`` nests them under the
calibrator's name (``quantize_weights.sigma.k``), so no stage branches on the
calibrator to pick its options.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.quant.ranges import (
    ActivationFormat,
    dequantize,
    quantize,
    scale_from_range,
)
from pipeline.quant.settings import (
    ACTIVATION_CALIBRATOR_SETTINGS,
    WEIGHT_CALIBRATOR_SETTINGS,
    NoSettings,
)

# ---------------------------------------------------------------- granularity


@dataclass(frozen=True)
class PerTensor:
    """One scale for the whole tensor."""


@dataclass(frozen=True)
class PerChannel:
    """One scale per index of ``axis`` (axis 0 is the output channel of Conv2d and Linear weights)."""

    axis: int = 0


Granularity = PerTensor | PerChannel
GRANULARITIES: dict[str, Granularity] = {"per_tensor": PerTensor(), "per_channel": PerChannel(0)}


def parse_granularity(granularity: str | Granularity) -> Granularity:
    """A granularity object from itself or its name in ``GRANULARITIES``."""
    if isinstance(granularity, (PerTensor, PerChannel)):
        return granularity
    try:
        return GRANULARITIES[granularity]
    except (KeyError, TypeError):
        raise ValueError(f"unknown granularity {granularity!r}; allowed: {sorted(GRANULARITIES)}") from None


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Calibrator:
    """A registry entry: the range function and the dataclass of its keyword options."""

    range: Callable[..., Any]
    settings: type = NoSettings


def _calibrate(kind: str, registry: dict[str, Calibrator], name: str, settings: Any, *args: Any) -> Any:
    """Call ``registry[name]`` with ``settings`` (its defaults when None), naming the calibrator in errors."""
    if name not in registry:
        raise ValueError(f"unknown {kind} calibrator {name!r}; allowed: {sorted(registry)}")
    entry = registry[name]
    settings = entry.settings() if settings is None else settings
    if type(settings) is not entry.settings:
        raise ValueError(f"{kind} calibrator {name!r} takes {entry.settings.__name__}, got {settings!r}")
    return entry.range(*args, **dataclasses.asdict(settings))


# ---------------------------------------------------------------- activations


def abs_histogram(stats: dict[str, Any]) -> tuple[np.ndarray, float]:
    """(counts, bin_width): counts[j] is the number of |x| in [j * bin_width, (j + 1) * bin_width).

    Folds the observer's histogram of x over [-R, R) at zero (negative bins
    are half-open on the other side; that edge case moves at most the values
    lying exactly on an edge by one bin).
    """
    counts = np.asarray(stats["hist_counts"], dtype=np.float64)
    half = counts.size // 2
    bin_width = 2 * stats["hist_span"] / counts.size
    return counts[half:] + counts[:half][::-1], bin_width


def seed_range(stats: dict[str, Any], qmax: int) -> float:
    """The seed's rule: max(4 * std, max|x|). It never clips."""
    return max(4 * stats["std"], stats["abs_max"])


def minmax_range(stats: dict[str, Any], qmax: int) -> float:
    """max|x|: no clipping, coarsest steps."""
    return stats["abs_max"]


def percentile_range(stats: dict[str, Any], qmax: int, percent: float) -> float:
    """The ``percent``-th percentile of |x|, interpolated linearly inside its histogram bin."""
    counts, bin_width = abs_histogram(stats)
    if stats["abs_max"] == 0:
        return 0.0
    target = percent / 100 * counts.sum()
    cumulative = np.cumsum(counts)
    index = min(int(np.searchsorted(cumulative, target)), counts.size - 1)  # first bin reaching the target
    below = cumulative[index - 1] if index > 0 else 0.0
    fraction = (target - below) / counts[index] if counts[index] else 1.0
    return min((index + fraction) * bin_width, stats["abs_max"])


def mse_range(stats: dict[str, Any], qmax: int, num_candidates: int, samples_per_bin: int) -> float:
    """The range minimizing the expected squared quantization error of |x| on a grid of ``qmax`` steps.

    Each histogram bin's count is spread uniformly over the bin, sampled at
    ``samples_per_bin`` points; candidates are ``num_candidates`` ranges evenly
    spaced in (0, max|x|]. The error counts both rounding (inside the range)
    and clipping (beyond it).
    """
    counts, bin_width = abs_histogram(stats)
    abs_max = stats["abs_max"]
    if abs_max == 0:
        return 0.0
    used = int(np.flatnonzero(counts)[-1]) + 1
    offsets = (np.arange(samples_per_bin) + 0.5) / samples_per_bin
    points = (np.arange(used)[:, None] + offsets[None, :]) * bin_width  # (bins, samples)
    weights = counts[:used] / samples_per_bin
    candidates = np.linspace(abs_max / num_candidates, abs_max, num_candidates)
    errors = []
    for candidate in candidates:
        step = candidate / qmax
        snapped = np.clip(np.rint(points / step), 0, qmax) * step
        errors.append(float(((points - snapped) ** 2).sum(axis=1) @ weights))
    return float(candidates[int(np.argmin(errors))])


# The grid ``num_quantized_bins`` is given for: signed int8's 128 levels of |x| (0..127), TensorRT's.
ENTROPY_REFERENCE_LEVELS = ActivationFormat().range(signed=True)[1] + 1


def entropy_range(stats: dict[str, Any], qmax: int, num_quantized_bins: int) -> float:
    """KL-divergence calibration as in TensorRT (in ONNX Runtime's and MXNet's form).

    ``num_quantized_bins`` is the number of levels for signed int8 (qmax 127: TensorRT's 128);
    another grid scales it by (qmax + 1) / 128, so an unsigned 8-bit tensor (qmax 255) gets twice
    the levels and a signed 4-bit one (qmax 7) a sixteenth.

    For each candidate threshold (a bin edge, from ``num_quantized_bins`` bins
    up): P is the |x| histogram clipped there, its outliers added to the last
    kept bin; Q merges the kept bins into ``num_quantized_bins`` levels and
    spreads each level's count evenly over the bins where P is nonzero. Both
    are smoothed (``_smooth``) so an empty bin cannot make KL infinite. The
    threshold with the smallest KL(P || Q) wins (the largest one on ties). As
    in TensorRT, the zero bin, inflated by ReLU, takes its neighbour's count first.
    """
    num_quantized_bins = max(1, num_quantized_bins * (qmax + 1) // ENTROPY_REFERENCE_LEVELS)
    counts, bin_width = abs_histogram(stats)
    abs_max = stats["abs_max"]
    if abs_max == 0:
        return 0.0
    if counts.size <= num_quantized_bins:
        return abs_max
    counts = counts.copy()
    counts[0] = counts[1]
    best_divergence, best_bins = math.inf, counts.size
    for kept_bins in range(num_quantized_bins, counts.size + 1):
        divergence = _clipped_kl_divergence(counts, kept_bins, num_quantized_bins)
        if divergence <= best_divergence:
            best_divergence, best_bins = divergence, kept_bins
    return min(best_bins * bin_width, abs_max)


def _clipped_kl_divergence(counts: np.ndarray, kept_bins: int, num_quantized_bins: int) -> float:
    kept = counts[:kept_bins]
    reference = kept.copy()
    reference[-1] += counts[kept_bins:].sum()  # clipped values land on the threshold
    nonzero = reference > 0
    level = np.arange(kept_bins) * num_quantized_bins // kept_bins
    level_totals = np.bincount(level, weights=kept, minlength=num_quantized_bins)
    level_nonzero = np.bincount(level, weights=nonzero, minlength=num_quantized_bins)
    candidate = np.where(nonzero, level_totals[level] / np.maximum(level_nonzero[level], 1), 0.0)
    p, q = _smooth(reference), _smooth(candidate)
    if p is None or q is None:
        return math.inf
    p, q = p / p.sum(), q / q.sum()
    return float((p * np.log(p / q)).sum())


def _smooth(counts: np.ndarray, epsilon: float = 1e-4) -> np.ndarray | None:
    """Give every empty bin ``epsilon``, taken evenly from the others (None if that empties one)."""
    empty = counts == 0
    num_filled = counts.size - int(empty.sum())
    if num_filled == 0:
        return None
    taken = epsilon * int(empty.sum()) / num_filled
    smoothed = counts + np.where(empty, epsilon, -taken)
    return smoothed if bool((smoothed > 0).all()) else None


_ACTIVATION_RANGES = {"seed": seed_range, "minmax": minmax_range, "percentile": percentile_range, "mse": mse_range,
                      "entropy": entropy_range}
ACTIVATION_CALIBRATORS: dict[str, Calibrator] = {
    name: Calibrator(_ACTIVATION_RANGES[name], settings) for name, settings in ACTIVATION_CALIBRATOR_SETTINGS.items()
}


def activation_range(stats: dict[str, Any], calibrator: str, settings: Any = None,
                     qmax: int = ActivationFormat().range(signed=True)[1]) -> float:
    """The clipping range of one layer's input from its observer statistics (``settings``: the calibrator's, or its
    defaults), for a tensor whose range maps onto integer ``qmax`` (default: signed int8's 127)."""
    if stats.get("count", 0) <= 0:
        raise ValueError(f"stats must describe at least one observed value, got count {stats.get('count')!r}")
    return float(_calibrate("activation", ACTIVATION_CALIBRATORS, calibrator, settings, stats, qmax))


# ---------------------------------------------------------------- weights


def sigma_weight_range(groups: Tensor, qmax: int, k: float) -> Tensor:
    """The seed's k-sigma rule: max(|mean - k * std|, |mean + k * std|) per group.

    ``std`` has Bessel's correction, like the seed's ``Tensor.std()``; a
    one-value group has std 0.
    """
    mean = groups.mean(dim=1)
    std = groups.std(dim=1) if groups.shape[1] > 1 else torch.zeros_like(mean)
    return torch.maximum((mean - k * std).abs(), (mean + k * std).abs())


def minmax_weight_range(groups: Tensor, qmax: int) -> Tensor:
    """max|w| per group: no clipping."""
    return groups.abs().amax(dim=1)


def mse_weight_range(groups: Tensor, qmax: int, num_candidates: int) -> Tensor:
    """Per group, the range r * max|w| (r in (0, 1], ``num_candidates`` steps) minimizing ||w - fq(w)||^2."""
    abs_max = groups.abs().amax(dim=1)
    best_error = torch.full_like(abs_max, math.inf)
    best_range = abs_max.clone()
    for ratio in torch.linspace(1 / num_candidates, 1, num_candidates, dtype=torch.float64).tolist():
        candidate = ratio * abs_max
        scale = scale_from_range(candidate, qmax)
        error = ((groups - dequantize(quantize(groups, scale, -qmax, qmax), scale)) ** 2).sum(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_range = torch.where(better, candidate, best_range)
    return best_range


_WEIGHT_RANGES = {"sigma": sigma_weight_range, "minmax": minmax_weight_range, "mse": mse_weight_range}
WEIGHT_CALIBRATORS: dict[str, Calibrator] = {
    name: Calibrator(_WEIGHT_RANGES[name], settings) for name, settings in WEIGHT_CALIBRATOR_SETTINGS.items()
}


def weight_range(
    weight: Tensor, qmax: int, calibrator: str, granularity: str | Granularity = "per_tensor", settings: Any = None
) -> Tensor:
    """The weight's clipping range: a 0-D float64 tensor per tensor, or one value per channel along the axis."""
    granularity = parse_granularity(granularity)
    weight64 = weight.detach().to(torch.float64)
    if isinstance(granularity, PerTensor):
        return _calibrate("weight", WEIGHT_CALIBRATORS, calibrator, settings, weight64.reshape(1, -1), qmax)[0]
    if not -weight.ndim <= granularity.axis < weight.ndim:
        raise ValueError(f"PerChannel axis must be in [{-weight.ndim}, {weight.ndim}), got {granularity.axis}")
    groups = weight64.movedim(granularity.axis, 0).reshape(weight.shape[granularity.axis], -1)
    return _calibrate("weight", WEIGHT_CALIBRATORS, calibrator, settings, groups, qmax)
