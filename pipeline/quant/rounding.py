"""Rounding methods: how each layer's float weights become integers at the calibrator's scales. Adding one is adding
one function here and its name and settings class to ``pipeline.quant.settings.ROUNDING_SETTINGS``.

Every method has one signature, ``(graph, quantization, inputs) -> RoundedWeights``: ``quantization`` is the whole
``WeightQuantization`` (bits, calibration, the method's settings), ``inputs`` what a method that learns may learn
from. All return the same artifact (int8 weights and scales by layer), so bias quantization, the integer engine and
the exporters do not know which method made it.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from pipeline.graph.nodes import FloatGraph
from pipeline.quant.adaround import adaround_model_weights
from pipeline.quant.settings import ROUNDING_SETTINGS, WeightQuantization
from pipeline.quant.weights import quantize_model_weights

ActivationQuantizer = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class RoundingInputs:
    """What a rounding method may learn from: uint8 calibration images of the training split with the
    normalization, and a loader of the integer model's activation quantization (``scale_groups.activation_quantizer``),
    called only by a method whose settings ask for quantized activations."""

    images: Tensor | None = None
    mean: Sequence[float] = ()
    std: Sequence[float] = ()
    activations: Callable[[], ActivationQuantizer] | None = None


@dataclass(frozen=True)
class RoundedWeights:
    """Each layer's (int8 weight, float64 scale) by name, and what the method reports for the artifact's meta."""

    weights: dict[str, tuple[Tensor, Tensor]]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Rounding:
    """A registry entry: the method's function and whether it learns from ``RoundingInputs.images``."""

    round: Callable[[FloatGraph, WeightQuantization, RoundingInputs], RoundedWeights]
    learns_from_images: bool = False


def nearest_rounding(graph: FloatGraph, quantization: WeightQuantization, inputs: RoundingInputs) -> RoundedWeights:
    """Round half to even, each weight on its own (the seed's)."""
    calibration = quantization.calibration
    return RoundedWeights(quantize_model_weights(graph, quantization.bits, calibration.calibrator,
                                                 calibration.granularity, calibration.settings))


# How the log names the rounding each layer kept (``adaround_model_weights``' "kept").
KEPT_ROUNDING = {"adaround": "learned rounding", "nearest": "round-to-nearest"}


def learned_rounding(graph: FloatGraph, quantization: WeightQuantization, inputs: RoundingInputs) -> RoundedWeights:
    """AdaRound (``pipeline.quant.adaround``); reports its settings and each layer's reconstruction errors."""
    settings = quantization.rounding_settings
    if inputs.images is None:
        raise ValueError("rounding 'adaround' learns from calibration images; RoundingInputs.images is None")
    if settings.quantized_activations and inputs.activations is None:
        raise ValueError("adaround.quantized_activations: value True needs the integer model's activation "
                         "quantization; RoundingInputs.activations is None")
    activations = inputs.activations() if settings.quantized_activations else None
    weights, errors = adaround_model_weights(graph, inputs.images, inputs.mean, inputs.std, quantization.bits,
                                             quantization.calibration, settings, activations=activations)
    for name, error in errors.items():
        logging.info("%-6s reconstruction error: nearest %.4g, adaround %.4g: kept %s", name, error["nearest"],
                     error["adaround"], KEPT_ROUNDING[error["kept"]])
    return RoundedWeights(weights, {"adaround": dataclasses.asdict(settings), "reconstruction_error": errors})


_ROUNDINGS = {"nearest": Rounding(nearest_rounding), "adaround": Rounding(learned_rounding, learns_from_images=True)}
# In ROUNDING_SETTINGS' order: params.yaml's choices and this registry name the same methods.
ROUNDINGS: dict[str, Rounding] = {name: _ROUNDINGS[name] for name in ROUNDING_SETTINGS}


def rounding_method(name: str) -> Rounding:
    """The registry entry of ``name``, or a ValueError naming the methods there are."""
    if name not in ROUNDINGS:
        raise ValueError(f"unknown rounding {name!r}; allowed: {', '.join(ROUNDINGS)}")
    return ROUNDINGS[name]


def round_weights(graph: FloatGraph, quantization: WeightQuantization,
                  inputs: RoundingInputs = RoundingInputs()) -> RoundedWeights:
    """The model's integer weights with ``quantization``'s rounding method."""
    return rounding_method(quantization.rounding).round(graph, quantization, inputs)


__all__ = ["KEPT_ROUNDING", "ROUNDINGS", "RoundedWeights", "Rounding", "RoundingInputs", "learned_rounding",
           "nearest_rounding", "round_weights", "rounding_method"]
