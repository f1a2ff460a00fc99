"""Empirical bias correction (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization
and Bias Correction", section 4.2, with calibration images instead of BatchNorm statistics).

Quantizing a layer's weights W to W_q shifts its pre-activation output by (W_q - W) x. Its
mean over images and positions is not zero in general (rounding and clipping errors do not
cancel per output channel), and a ReLU after the layer turns that shift into a loss of
accuracy. Bias correction measures the mean shift of each output channel on calibration
images of the training split,

    shift_c = mean over images and positions of ((W_q - W) x)_c,

and subtracts it from the float bias before the bias is quantized to int32, so the
quantized layer's mean output equals the float layer's on those images. Layers are
corrected in the graph's topological order, and x is the layer's input when every earlier
layer already has its quantized weights and corrected bias, so a layer also absorbs the mean
shift its input carries from the layers before (as the integer model will see it).

The result is one float bias per layer (a layer without a bias gets one); the weights, the
integer semantics, the engine, C and ONNX are unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from pipeline.graph.nodes import (
    Conv,
    FloatGraph,
    Linear,
    folded_state_dict,
    with_weights,
)
from pipeline.graph.run import run_layer, tensor_values
from pipeline.progress import progress_items
from pipeline.quant.weights import dequantized_weights
from pipeline.transforms import normalize


def output_shift(node: Conv | Linear, inputs: Tensor, weight_error: Tensor) -> Tensor:
    """Mean of the layer's pre-activation output change ``weight_error`` * x per output channel (float64).

    ``weight_error`` is W_q - W, shaped like the layer's weight; ``inputs`` are (N, C, ...) inputs.
    """
    linear_part = replace(node, bias=None, activation="none")
    with torch.no_grad():
        change = run_layer(linear_part, inputs.to(torch.float64), weight_error.to(torch.float64))
    return change.transpose(0, 1).reshape(change.shape[1], -1).mean(dim=1)


def corrected_biases(
    graph: FloatGraph,
    quantized_weights: Mapping[str, tuple[Tensor, Tensor]],
    images: Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    progress: bool | None = None,
) -> dict[str, Tensor]:
    """Each layer's float32 bias minus its mean output shift from weight quantization, by layer name.

    ``quantized_weights`` is ``quantize_model_weights``' (or AdaRound's) result; ``images`` are
    uint8 calibration images (N, 32, 32, 3) of the training split.
    """
    x = normalize(images, mean, std)
    dequantized = dequantized_weights(quantized_weights)
    state = folded_state_dict(graph, dequantized)
    biases: dict[str, Tensor] = {}
    for node in progress_items(graph.layers(), "bias correction", progress, name=lambda layer: layer.name):
        inputs = tensor_values(with_weights(graph, state), x, node.input)
        shift = output_shift(node, inputs, dequantized[node.name] - node.weight.detach())
        float_bias = node.bias.detach() if node.bias is not None else torch.zeros(len(shift))
        biases[node.name] = (float_bias.to(torch.float64) - shift).to(torch.float32)
        state[f"{node.name}.bias"] = biases[node.name]
    return biases


__all__ = ["corrected_biases", "output_shift"]
