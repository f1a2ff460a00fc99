"""Typed settings of the quantization methods: each method's options, their defaults and rules, in one place.

Frozen dataclasses, checked once when made (``pipeline.validation``). ``params.yaml``
nests them under the method's name (``quantize_weights.sigma.k``,
``profile.percentile.percent``, ``quantize_weights.adaround.iterations``), and
``pipeline.params`` parses them with the same rules, naming the full key. This module
imports no torch, so validating ``params.yaml`` does not load the methods themselves.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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


# The calibrators by name, with their settings: params.yaml's choices, checked without importing the range
# functions (pipeline.quant.calibrators pairs each name with its function in the same order).
ACTIVATION_CALIBRATOR_SETTINGS: dict[str, type] = {
    "seed": NoSettings,
    "minmax": NoSettings,
    "percentile": PercentileSettings,
    "mse": HistogramMseSettings,
    "entropy": EntropySettings,
}
WEIGHT_CALIBRATOR_SETTINGS: dict[str, type] = {"sigma": SigmaSettings, "minmax": NoSettings, "mse": WeightMseSettings}


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


# ---------------------------------------------------------------- weight quantization, whole

# The granularities of the weight scales (pipeline.quant.calibrators.GRANULARITIES has their objects).
GRANULARITY_NAMES = ("per_tensor", "per_channel")
# The rounding methods by name, with their settings (pipeline.quant.rounding pairs each name with its function).
ROUNDING_SETTINGS: dict[str, type] = {"nearest": NoSettings, "adaround": AdaRoundSettings}
ROUNDING_NAMES = tuple(ROUNDING_SETTINGS)
# How every rescale of the integer model rounds (pipeline.quant.fixed_point): "double", TFLite's and TensorFlow
# Lite Micro's default (what CMSIS-NN follows), or "single" (one rounding, half up: the rule before "double").
REQUANTIZE_ROUNDINGS = ("double", "single")
# What the last layer writes: int8 logits at the profiled range (TFLite's FULLY_CONNECTED output) or int32 accumulators.
LOGITS_TYPES = ("int8", "int32")


def _check_named_settings(owner: str, kind: str, name: str, settings: Any, settings_by_name: dict[str, type]) -> None:
    """``name`` is one of ``settings_by_name`` and ``settings`` is an instance of its settings class."""
    if name not in settings_by_name:
        raise ValueError(f"{owner}.{kind}: value {name!r} is not allowed; allowed: {', '.join(settings_by_name)}")
    expected = settings_by_name[name]
    if type(settings) is not expected:
        raise ValueError(f"{owner}.{kind}_settings: {kind} {name!r} takes {expected.__name__}, got {settings!r}")


@dataclass(frozen=True)
class WeightCalibration:
    """How each layer's weight scale is chosen: the calibrator, its settings and the granularity.

    ``settings`` left None are the calibrator's defaults.
    """

    calibrator: str = "sigma"
    settings: Any = None
    granularity: str = "per_tensor"

    def __post_init__(self) -> None:
        if self.settings is None and self.calibrator in WEIGHT_CALIBRATOR_SETTINGS:
            object.__setattr__(self, "settings", WEIGHT_CALIBRATOR_SETTINGS[self.calibrator]())
        _check_named_settings("WeightCalibration", "calibrator", self.calibrator, self.settings,
                              WEIGHT_CALIBRATOR_SETTINGS)
        if self.granularity not in GRANULARITY_NAMES:
            raise ValueError(f"WeightCalibration.granularity: value {self.granularity!r} is not allowed; allowed: "
                             f"{', '.join(GRANULARITY_NAMES)}")


@dataclass(frozen=True)
class WeightQuantization:
    """Everything that makes a model's integer weights: each layer's bits (one width, or one per layer name), how the
    scales are calibrated, and the rounding method with its settings (None: the method's defaults)."""

    bits: int | Mapping[str, int] = 8
    calibration: WeightCalibration = field(default_factory=WeightCalibration)
    rounding: str = "nearest"
    rounding_settings: Any = None

    def __post_init__(self) -> None:
        if self.rounding_settings is None and self.rounding in ROUNDING_SETTINGS:
            object.__setattr__(self, "rounding_settings", ROUNDING_SETTINGS[self.rounding]())
        _check_named_settings("WeightQuantization", "rounding", self.rounding, self.rounding_settings,
                              ROUNDING_SETTINGS)


# The seed's weight quantizer: 3-sigma ranges, per tensor (the default of every function taking a calibration).
SEED_WEIGHT_CALIBRATION = WeightCalibration()
