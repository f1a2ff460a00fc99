"""Observers: activation statistics in bounded memory.

An observer only observes: it returns its input unchanged and keeps running
statistics; calibrators (``pipeline.quant.calibrators``) turn the statistics
into ranges. State is constant-size whatever the number of samples:

- count, min, max, and mean and M2 (sum of squared deviations) merged batch
  by batch with Chan et al.'s parallel form of Welford's update, in float64;
- a histogram of x with a fixed number of bins over [-R, R). R is a power of
  two, the smallest one above every |x| seen so far. When a value reaches R,
  R doubles and pairs of adjacent bins merge, so bin edges stay nested and the
  histogram equals the one that would have been built with the final R from
  the start. 0 always falls in bin ``num_bins // 2``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

DEFAULT_NUM_BINS = 2048


class ActivationObserver:
    """Running min/max/mean/std and a self-widening histogram of everything it is called on."""

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 4 or num_bins % 4:
            raise ValueError(f"num_bins must be a positive multiple of 4, got {num_bins!r}")
        self.num_bins = num_bins
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self.hist_span = 0.0  # R; 0 until a nonzero value is seen
        self.hist_counts = torch.zeros(num_bins, dtype=torch.int64)

    def __call__(self, x: Tensor) -> Tensor:
        self.observe(x)
        return x

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Merge the values of ``x`` (any shape) into the statistics."""
        values = x.detach().reshape(-1).to(torch.float64)
        if values.numel() == 0:
            return
        if not bool(torch.isfinite(values).all()):
            raise ValueError("observed tensor has non-finite values (NaN or inf)")
        self._merge_moments(values)
        self._widen_histogram(float(values.abs().max()))
        self._add_to_histogram(values)

    def _merge_moments(self, values: Tensor) -> None:
        batch_count = values.numel()
        batch_mean = float(values.mean())
        batch_m2 = float(((values - batch_mean) ** 2).sum())
        total = self.count + batch_count
        delta = batch_mean - self.mean
        self.mean += delta * batch_count / total
        self.m2 += batch_m2 + delta * delta * self.count * batch_count / total
        self.count = total
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))

    def _widen_histogram(self, abs_max: float) -> None:
        if abs_max == 0:
            return
        _, exponent = math.frexp(abs_max)  # 2^(exponent-1) <= abs_max < 2^exponent
        needed_span = math.ldexp(1.0, exponent)
        if self.hist_span == 0:
            self.hist_span = needed_span  # only zeros so far, and they sit in the middle bin for any span
            return
        while self.hist_span < needed_span:
            merged = self.hist_counts.reshape(-1, 2).sum(dim=1)
            quarter = self.num_bins // 4
            self.hist_counts = torch.zeros_like(self.hist_counts)
            self.hist_counts[quarter : 3 * quarter] = merged
            self.hist_span *= 2

    def _add_to_histogram(self, values: Tensor) -> None:
        half = self.num_bins // 2
        if self.hist_span == 0:
            self.hist_counts[half] += values.numel()
            return
        bin_width = 2 * self.hist_span / self.num_bins  # a power of two, so x / bin_width is exact
        indices = (torch.floor(values / bin_width) + half).clamp(0, self.num_bins - 1).to(torch.int64)
        self.hist_counts += torch.bincount(indices, minlength=self.num_bins).cpu()

    def statistics(self) -> ActivationStats:
        """The statistics seen so far (at least one value)."""
        if self.count == 0:
            raise ValueError("observer has seen no values; run calibration data through the model first")
        return ActivationStats(
            count=self.count,
            min=self.min,
            max=self.max,
            abs_max=max(-self.min, self.max),
            mean=self.mean,
            std=math.sqrt(self.m2 / self.count),
            num_bins=self.num_bins,
            hist_span=self.hist_span,
            hist_counts=tuple(self.hist_counts.tolist()),
        )

    def stats(self) -> dict[str, Any]:
        """``statistics()`` in its JSON form (what the calibrators and data/profile.json read)."""
        return self.statistics().to_json()


@dataclass(frozen=True)
class ActivationStats:
    """An observer's statistics. ``std`` is the population standard deviation. Histogram bin k covers
    [-hist_span + k * w, -hist_span + (k + 1) * w) with w = 2 * hist_span / num_bins."""

    count: int
    min: float
    max: float
    abs_max: float
    mean: float
    std: float
    num_bins: int
    hist_span: float
    hist_counts: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """The JSON form: one key per field, in field order, the histogram as a list."""
        return {field.name: getattr(self, field.name) for field in fields(self)} | {"hist_counts": list(self.hist_counts)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ActivationStats:
        """The statistics of ``to_json``'s form; other keys (data/profile.json's ``observed``, ``read_by``) are left.
        A missing key is a ValueError naming it."""
        names = [field.name for field in fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"activation statistics lack keys {missing}; expected {names} "
                             "(ActivationStats.to_json, ActivationObserver.stats)")
        return cls(**{name: data[name] for name in names} | {"hist_counts": tuple(data["hist_counts"])})


def clipped_fraction(stats: ActivationStats, clip_range: float) -> float:
    """Share of observed values with |x| > clip_range, from the histogram (exact to one bin)."""
    counts = np.asarray(stats.hist_counts, dtype=np.float64)
    span, bins = stats.hist_span, stats.num_bins
    if span == 0 or clip_range >= stats.abs_max:
        return 0.0
    centers = -span + (np.arange(bins) + 0.5) * (2 * span / bins)
    return float(counts[np.abs(centers) > clip_range].sum() / counts.sum())
