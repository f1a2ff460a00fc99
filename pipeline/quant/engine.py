"""Running an ``IntegerModel``: the integer engine, its float simulation, and weight-only quantization.

``run_integer`` computes the integer semantics of ``integer_ops`` node by node. It is exact
integer arithmetic throughout; where floating-point units do a step, they do it on integers
they represent exactly (``integer_ops.conv_accumulators`` and the fast paths of ``_conv``).

``run_simulated`` is the same graph in float64 real units: dequantized weights and biases,
tensors fake-quantized at their scales (round half to even), the same clamps. It differs from
the integer engine only where the fixed-point multiplier or the rounding rule moves a value by
one step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.graph import FloatGraph, run_float
from pipeline.quant.build import raw_accumulator_clamp
from pipeline.quant.integer_ops import (
    add_integers,
    apply_requantize,
    avgpool_integers,
    clamp_integers,
    concat_integers,
    conv_accumulators,
)
from pipeline.quant.ir import (
    IntAdd,
    IntAvgPool,
    IntClamp,
    IntConcat,
    IntConv,
    IntegerModel,
    IntMaxPool,
    IntNode,
    IntReshape,
    Requantize,
    int_node_inputs,
)
from pipeline.quant.ranges import ACTIVATION_QMAX, ACTIVATION_QMIN, dequantize, fake_quantize, quantize

# Images per pass through the engine and its simulation; the results do not depend on it. Their
# convolutions run in float64, which the CPU unfolds into one buffer per call (conv1 of Net: 470 KB
# an image), and glibc serves buffers over 32 MB with fresh mappings that are page-faulted on every
# use: in passes of 1,000 images, 10,000 test images through run_integer took 6.2-6.9 s, mostly
# system time (5.7-6.6 s on 2 cores); in passes of 64, 2.6-3.4 s with almost none.
PASS_IMAGES = 64


def _passes(x: Tensor) -> tuple[Tensor, ...]:
    """``x`` split along the batch into runs of at most PASS_IMAGES images (an empty batch stays one)."""
    return x.split(PASS_IMAGES) if len(x) else (x,)


def _in_passes(run: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``run`` on at most PASS_IMAGES images at a time, the outputs concatenated along the batch."""
    return torch.cat([run(images) for images in _passes(x)])


def quantize_input(x_normalized: Tensor, input_scale: float) -> Tensor:
    """The normalized float input as int8: round half to even, saturate to [-128, 127]."""
    return quantize(x_normalized, input_scale, ACTIVATION_QMIN, ACTIVATION_QMAX).to(torch.int8)


# ---------------------------------------------------------------- the integer engine


def _conv(node: IntConv, x: Tensor) -> Tensor:
    acc = conv_accumulators(x, node.weight, node.bias, node.stride, node.padding, node.groups)
    if node.requantize is None:
        return acc.clamp_(*raw_accumulator_clamp(node))
    return apply_requantize(acc, node.requantize)


def _maxpool(node: IntMaxPool, x: Tensor) -> Tensor:
    # float64 holds these integers exactly; max-pool only compares them (padding is -inf).
    return F.max_pool2d(x.to(torch.float64), node.kernel, node.stride, node.padding).to(torch.int64)


def _integer_node(node: IntNode, values: dict[str, Tensor]) -> Tensor:
    if isinstance(node, IntConv):
        return _conv(node, values[node.input])
    if isinstance(node, IntAdd):
        a, b = (values[name] for name in node.inputs)
        return add_integers(a, b, node.left_shift, node.input_requantize, node.output_requantize)
    if isinstance(node, IntAvgPool):
        return avgpool_integers(values[node.input], node.kernel, node.stride, node.padding, node.requantize)
    if isinstance(node, IntConcat):
        return concat_integers([values[name] for name in node.inputs], node.input_requantize)
    if isinstance(node, IntMaxPool):
        return _maxpool(node, values[node.input])
    if isinstance(node, IntClamp):
        return clamp_integers(values[node.input], node.clamp_min, node.clamp_max)
    if isinstance(node, IntReshape):
        return values[node.input].flatten(1)
    raise TypeError(f"unknown integer node {node!r}")


def _integer_values(model: IntegerModel, x_int8: Tensor, keep: bool) -> dict[str, Tensor]:
    """Every tensor of one pass (``keep``) or only the output, as int64, for int8 images."""
    if x_int8.dtype != torch.int8:
        raise TypeError(f"x_int8 must have dtype torch.int8, got {x_int8.dtype}; use quantize_input")
    values = {model.input: x_int8.to(torch.int64)}
    remaining = _last_reads(model)
    for index, node in enumerate(model.nodes):
        values[node.output] = _integer_node(node, values)
        if not keep:  # free what no later node reads
            for name in [name for name, last in remaining.items() if last == index and name != model.output]:
                values.pop(name, None)
    return values


def _last_reads(model: IntegerModel) -> dict[str, int]:
    """For each tensor, the index of the last node that reads it."""
    last: dict[str, int] = {}
    for index, node in enumerate(model.nodes):
        for name in int_node_inputs(node):
            last[name] = index
    return last


def run_integer(model: IntegerModel, x_int8: Tensor) -> Tensor:
    """Integer logits (int32, at ``model.output_scale``) for an int8 input batch.

    The class is the argmax of these integers, for any weight granularity.
    """
    return _in_passes(lambda images: _integer_values(model, images, keep=False)[model.output].to(torch.int32), x_int8)


def integer_tensor_outputs(model: IntegerModel, x_int8: Tensor) -> dict[str, Tensor]:
    """Every node's integer output tensor (int64), by tensor name."""
    passes = [_integer_values(model, images, keep=True) for images in _passes(x_int8)]
    return {node.output: torch.cat([values[node.output] for values in passes]) for node in model.nodes}


def dequantize_logits(model: IntegerModel, logits: Tensor) -> Tensor:
    """Integer logits times their scale: float64 logits in real units."""
    return dequantize(logits, model.output_scale)


# ---------------------------------------------------------------- the float simulation


def _fake(x: Tensor, scale: float | Tensor, rq: Requantize | tuple[int, int]) -> Tensor:
    low, high = (rq.clamp_min, rq.clamp_max) if isinstance(rq, Requantize) else rq
    return fake_quantize(x, scale, low, high)


def _simulated_node(model: IntegerModel, node: IntNode, values: dict[str, Tensor]) -> Tensor:
    tensors = model.tensors
    if isinstance(node, IntConv):
        x = values[node.input]
        weight = dequantize(node.weight, node.weight_scale).to(x.device)
        bias = dequantize(node.bias, tensors[node.input].scale * node.weight_scale).to(x.device)
        if node.kind == "conv2d":
            y = F.conv2d(x, weight, bias, node.stride, node.padding, 1, node.groups)
        else:
            y = F.linear(x, weight, bias)
        if node.requantize is None:
            low, _ = raw_accumulator_clamp(node)
            return y.clamp(min=0) if low == 0 else y
        return _fake(y, tensors[node.output].scale, node.requantize)
    if isinstance(node, IntAdd):
        y = values[node.inputs[0]] + values[node.inputs[1]]
        return _fake(y, tensors[node.output].scale, node.output_requantize)
    if isinstance(node, IntAvgPool):
        y = F.avg_pool2d(values[node.input], node.kernel, node.stride, node.padding)
        return _fake(y, tensors[node.output].scale, node.requantize)
    if isinstance(node, IntConcat):
        scale = tensors[node.output].scale
        return torch.cat([_fake(values[name], scale, (ACTIVATION_QMIN, ACTIVATION_QMAX)) for name in node.inputs], 1)
    if isinstance(node, IntMaxPool):
        return F.max_pool2d(values[node.input], node.kernel, node.stride, node.padding)
    if isinstance(node, IntClamp):
        return _fake(values[node.input], tensors[node.input].scale, (node.clamp_min, node.clamp_max))
    return values[node.input].flatten(1)


def run_simulated(model: IntegerModel, x_normalized: Tensor) -> Tensor:
    """Float64 logits of the float simulation of ``model`` (fake quantization, float scales)."""

    def one_pass(images: Tensor) -> Tensor:
        values = {model.input: fake_quantize(images.to(torch.float64), model.input_scale, ACTIVATION_QMIN,
                                             ACTIVATION_QMAX)}
        for node in model.nodes:
            values[node.output] = _simulated_node(model, node, values)
        return values[model.output]

    return _in_passes(one_pass, x_normalized)


# ---------------------------------------------------------------- weight-only quantization


def dequantized_weights(quantized_weights: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Each layer's quantized-then-dequantized weight (float32), by layer name."""
    return {
        name: dequantize(q_weight, weight_scale, axis=0).to(torch.float32)
        for name, (q_weight, weight_scale) in quantized_weights.items()
    }


def run_weight_only(graph: FloatGraph, x_normalized: Tensor, quantized_weights: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """The float graph with its weights quantized and dequantized (activations and biases float)."""
    return run_float(graph, x_normalized, dequantized_weights(quantized_weights))


class QuantizedNet(torch.nn.Module):
    """The seed's name for the quantized network: ``forward(x_normalized)`` runs the integer engine.

    Returns float32 logits in real units (``dequantize_logits`` of the int32 logits), so
    ``argmax`` ranks classes correctly for any weight granularity.
    """

    def __init__(self, integer_model: IntegerModel) -> None:
        super().__init__()
        self.integer_model = integer_model

    def forward(self, x_normalized: Tensor) -> Tensor:
        logits = run_integer(self.integer_model, quantize_input(x_normalized, self.integer_model.input_scale))
        return dequantize_logits(self.integer_model, logits).to(torch.float32)


__all__ = [
    "PASS_IMAGES", "QuantizedNet", "dequantize_logits", "dequantized_weights",
    "integer_tensor_outputs", "quantize_input", "run_integer", "run_simulated", "run_weight_only",
]
