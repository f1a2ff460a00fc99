"""Weight quantization: each layer's float weights as narrow-range integers and their scales, and the
weight-only model (the float graph with those weights dequantized).

Weights are int8 in the narrow range [-(2^(b-1) - 1), 2^(b-1) - 1], S_w = range / (2^(b-1) - 1), per
tensor or per output channel; the range comes from a calibrator (``pipeline.quant.calibrators``).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from pipeline.graph.nodes import FloatGraph
from pipeline.graph.run import run_float
from pipeline.quant.calibrators import (
    Granularity,
    PerChannel,
    parse_granularity,
    weight_range,
)
from pipeline.quant.ranges import (
    check_bits,
    check_layer_bits,
    dequantize,
    int_range,
    layer_bits,
    quantize,
    scale_from_range,
)


def quantize_layer_weights(
    weight: Tensor,
    bits: int = 8,
    calibrator: str = "sigma",
    granularity: str | Granularity = "per_tensor",
    settings: Any = None,
) -> tuple[Tensor, Tensor]:
    """(q_weight int8, weight_scale float64) with weight ~= q_weight * weight_scale.

    q_weight is in the narrow range [-(2^(bits-1) - 1), 2^(bits-1) - 1];
    weight_scale is 0-D per tensor or one value per index of the PerChannel axis.
    ``settings`` are the calibrator's (``pipeline.quant.calibrators``), None for its defaults.
    The seed's default: 8 bits, 3-sigma range, per tensor.
    """
    check_bits(bits, "bits (weights are stored as int8)")
    granularity = parse_granularity(granularity)
    qmin, qmax = int_range(bits, narrow=True)
    weight_scale = scale_from_range(weight_range(weight, qmax, calibrator, granularity, settings), qmax)
    axis = granularity.axis if isinstance(granularity, PerChannel) else 0
    return quantize(weight, weight_scale, qmin, qmax, axis).to(torch.int8), weight_scale


def quantize_model_weights(
    graph: FloatGraph,
    weight_bits: int | Mapping[str, int] = 8,
    weight_calibrator: str = "sigma",
    granularity: str | Granularity = "per_tensor",
    weight_settings: Any = None,
) -> dict[str, tuple[Tensor, Tensor]]:
    """``quantize_layer_weights`` for every Conv/Linear node of the (BatchNorm-folded) graph, by layer name.

    ``weight_bits`` is one width for every layer or a width per layer name (mixed precision; every
    layer must be named).
    """
    check_layer_bits(weight_bits, [node.name for node in graph.layers()])
    granularity = parse_granularity(granularity)
    if isinstance(granularity, PerChannel) and granularity.axis != 0:
        raise ValueError(f"granularity must be per tensor or PerChannel(axis=0) (output channels), got {granularity}")
    return {
        node.name: quantize_layer_weights(node.weight, layer_bits(weight_bits, node.name), weight_calibrator, granularity,
                                          weight_settings)
        for node in graph.layers()
    }


def dequantized_weights(quantized_weights: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Each layer's quantized-then-dequantized weight (float32), by layer name."""
    return {
        name: dequantize(q_weight, weight_scale, axis=0).to(torch.float32)
        for name, (q_weight, weight_scale) in quantized_weights.items()
    }


def run_weight_only(graph: FloatGraph, x_normalized: Tensor, quantized_weights: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """The float graph with its weights quantized and dequantized (activations and biases float)."""
    return run_float(graph, x_normalized, dequantized_weights(quantized_weights))


