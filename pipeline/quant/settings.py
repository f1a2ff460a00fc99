"""Typed settings of the quantization methods: each method's options, their defaults and rules, in one place.

Frozen dataclasses, checked once when made (``pipeline.validation``). ``params.yaml``
nests them under the method's name (``quantize_weights.sigma.k``,
``profile.percentile.percent``, ``quantize_weights.adaround.iterations``), and
``pipeline.params`` parses them with the same rules, naming the full key. This module
imports no torch, so validating ``params.yaml`` does not load the methods themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.validation import CheckedSettings, bounds

# ---------------------------------------------------------------- calibrators (fields: the range function's keywords)


@dataclass(frozen=True)
class NoSettings(CheckedSettings):
    """A calibrator without options (seed, minmax)."""


@dataclass(frozen=True)
class PercentileSettings(CheckedSettings):
    percent: float = field(default=99.99, metadata=bounds(0.0, 100.0, low_open=True))  # of |x|, in percent


@dataclass(frozen=True)
class HistogramMseSettings(CheckedSettings):
    num_candidates: int = field(default=256, metadata=bounds(1))  # ranges tried, evenly spaced in (0, max|x|]
    samples_per_bin: int = field(default=16, metadata=bounds(1))  # points standing for a histogram bin's values


@dataclass(frozen=True)
class EntropySettings(CheckedSettings):
    num_quantized_bins: int = field(default=128, metadata=bounds(1))  # levels of the quantized distribution Q


@dataclass(frozen=True)
class SigmaSettings(CheckedSettings):
    k: float = field(default=3.0, metadata=bounds(0.0, low_open=True))  # range = |mean| + k std, the seed's 3


@dataclass(frozen=True)
class WeightMseSettings(CheckedSettings):
    num_candidates: int = field(default=100, metadata=bounds(1))  # ranges tried: r * max|w|, r in (0, 1]


# ---------------------------------------------------------------- methods that learn from images


@dataclass(frozen=True)
class CalibrationImages(CheckedSettings):
    """The training images that AdaRound and bias correction learn from: a seeded random subset."""

    num_samples: int = field(default=1024, metadata=bounds(1))  # images of the training split
    seed: int = field(default=0, metadata=bounds(0, 2**63 - 1))  # picks them


@dataclass(frozen=True)
class AdaRoundSettings(CheckedSettings):
    """``pipeline.quant.adaround``: learned rounding, layer by layer, on calibration images of the training split."""

    seed: int = field(default=0, metadata=bounds(0, 2**63 - 1))  # picks the batches
    iterations: int = field(default=1000, metadata=bounds(1))  # Adam steps per layer
    batch_size: int = field(default=32, metadata=bounds(1))  # images per step
    lr: float = field(default=0.01, metadata=bounds(0.0, low_open=True))  # Adam's learning rate on the logits
    regularizer: float = field(default=0.01, metadata=bounds(0.0, low_open=True))  # weight of the rounding term
    # Learn from inputs whose activations are quantized as in the integer model (the profile's ranges and format),
    # as BRECQ and QDrop do, so the rounding also makes up for activation quantization; False: float activations.
    quantized_activations: bool = False
