"""Running an ``IntegerModel``: the integer engine, its float simulation, and weight-only quantization.

``run_integer`` uses integer arithmetic only. Convolutions and matrix products
run in float64 on integer values, which is exact: every product and partial
sum is an integer of magnitude at most sum(|q_w|) * 128 + |q_b| < 2^31 (checked
for each layer, see ``pipeline.quant.model.accumulator_bound``), far below
2^53, where float64 stops representing every integer. The result is cast to
int64, the int32 bias added, and ``fixed_point.requantize`` (round half up)
produces the next int8 activation; max-pool compares integers.

``run_simulated`` is the same model in float64 real units: dequantized weights
and biases, activations fake-quantized at the float scales (round half to
even), the same clamps. It differs from the integer engine only where the
fixed-point multiplier or the rounding rule moves a value by one step.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.quant.calibrators import Granularity
from pipeline.quant.fixed_point import INT32_MAX, requantize
from pipeline.quant.graph import fold_batchnorm
from pipeline.quant.model import (
    IntegerModel,
    accumulator_bound,
    quantize_model_weights,
)
from pipeline.quant.ranges import ACTIVATION_QMAX, ACTIVATION_QMIN, dequantize, fake_quantize, int_range, quantize


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


def _channel_shape(ndim: int) -> tuple[int, ...]:
    """Shape that lines a per-output-channel vector up with dim 1 of an ``ndim``-dim activation."""
    return (1, -1) + (1,) * (ndim - 2)


def _integer_layer(op: dict[str, Any], x: Tensor) -> Tensor:
    bound = accumulator_bound(op["weight"], op["bias"])
    if bound > INT32_MAX:  # also guarantees the float64 products below are exact (2^31 << 2^53)
        raise OverflowError(f"layer {op['name']!r}: worst-case accumulator {bound} exceeds int32 max {INT32_MAX}")
    x64 = x.to(torch.float64)
    weight64 = op["weight"].to(device=x.device, dtype=torch.float64)
    if op["op"] == "conv2d":
        products = F.conv2d(x64, weight64, None, op["stride"], op["padding"])
    else:
        products = F.linear(x64, weight64)
    shape = _channel_shape(products.ndim)
    acc = products.to(torch.int64).add_(op["bias"].to(x.device, torch.int64).reshape(shape))
    if not op["requantize"]:
        return acc.clamp_(min=0) if op["relu"] else acc
    qmin, qmax = output_range(op)
    multiplier = op["multiplier"].to(x.device).reshape(shape) if op["multiplier"].ndim else op["multiplier"]
    shift = op["shift"].to(x.device).reshape(shape) if op["shift"].ndim else op["shift"]
    output = requantize(acc, multiplier, shift, qmin, qmax)
    return output.to(torch.int8) if op["output_bits"] == 8 else output


def output_range(op: dict[str, Any]) -> tuple[int, int]:
    """The saturation range of a layer's requantized output; a fused ReLU is the lower clamp."""
    qmin, qmax = int_range(op["output_bits"])
    return (0 if op["relu"] else qmin), qmax


def _maxpool(op: dict[str, Any], x: Tensor) -> Tensor:
    # float64 holds these integers exactly; max-pool only compares them (padding is -inf).
    return F.max_pool2d(x.to(torch.float64), op["kernel"], op["stride"], op["padding"]).to(x.dtype)


def run_integer(model: IntegerModel, x_int8: Tensor) -> Tensor:
    """Integer logits (the last layer's int32 output, at its ``output_scale``) for an int8 input batch.

    The class is the argmax of these integers, for any weight granularity.
    """
    return _in_passes(lambda images: _integer_outputs(model, images)[-1].to(torch.int32), x_int8)


def integer_layer_outputs(model: IntegerModel, x_int8: Tensor) -> dict[str, Tensor]:
    """Each Conv2d/Linear op's integer output (after its fused ReLU and requantization), by layer name."""
    passes = [_integer_outputs(model, images) for images in _passes(x_int8)]
    return {
        op["name"]: torch.cat([outputs[index] for outputs in passes])
        for index, op in enumerate(model.ops)
        if op["op"] in ("conv2d", "linear")
    }


def _integer_outputs(model: IntegerModel, x_int8: Tensor) -> list[Tensor]:
    """The output of every op of ``model``, in order, for one pass of int8 images."""
    if x_int8.dtype != torch.int8:
        raise TypeError(f"x_int8 must have dtype torch.int8, got {x_int8.dtype}; use quantize_input")
    outputs, x = [], x_int8
    for op in model.ops:
        if op["op"] in ("conv2d", "linear"):
            x = _integer_layer(op, x)
        elif op["op"] == "maxpool2d":
            x = _maxpool(op, x)
        else:
            x = x.flatten(1)
        outputs.append(x)
    return outputs


def dequantize_logits(model: IntegerModel, logits: Tensor) -> Tensor:
    """Integer logits times the last layer's output scale S_in * S_w: float64 logits in real units."""
    last_layer = [op for op in model.ops if op["op"] in ("conv2d", "linear")][-1]
    return dequantize(logits, last_layer["output_scale"], axis=1)


def run_simulated(model: IntegerModel, x_normalized: Tensor) -> Tensor:
    """Float64 logits of the float simulation of ``model`` (fake quantization, float scales)."""
    return _in_passes(lambda images: _simulated_pass(model, images), x_normalized)


def _simulated_pass(model: IntegerModel, x_normalized: Tensor) -> Tensor:
    x = fake_quantize(x_normalized.to(torch.float64), model.input_scale, ACTIVATION_QMIN, ACTIVATION_QMAX)
    for op in model.ops:
        if op["op"] in ("conv2d", "linear"):
            weight = dequantize(op["weight"], op["weight_scale"]).to(x.device)
            bias = dequantize(op["bias"], op["input_scale"] * op["weight_scale"]).to(x.device)
            if op["op"] == "conv2d":
                x = F.conv2d(x, weight, bias, op["stride"], op["padding"])
            else:
                x = F.linear(x, weight, bias)
            if op["requantize"]:
                # Real units: y / S_out is the accumulator times M = S_in * S_w / S_out.
                x = fake_quantize(x, op["output_scale"], *output_range(op))
            elif op["relu"]:
                x = x.clamp(min=0)
        elif op["op"] == "maxpool2d":
            x = F.max_pool2d(x, op["kernel"], op["stride"], op["padding"])
        else:
            x = x.flatten(1)
    return x


def weight_only_model(
    float_model: nn.Sequential,
    weight_bits: int = 8,
    weight_calibrator: str = "sigma",
    granularity: str | Granularity = "per_tensor",
    weight_options: dict[str, Any] | None = None,
    quantized_weights: dict[str, tuple[Tensor, Tensor]] | None = None,
) -> nn.Sequential:
    """A float copy (BatchNorm folded) whose Conv2d/Linear weights are their quantized-then-dequantized values.

    Activations and biases stay float: this isolates the error of weight
    quantization. ``quantized_weights`` as in ``build_integer_model``.
    """
    if quantized_weights is None:
        quantized_weights = quantize_model_weights(
            float_model, weight_bits, weight_calibrator, granularity, weight_options
        )
    model = fold_batchnorm(float_model)
    layers = dict(model.named_children())
    for name, (q_weight, weight_scale) in quantized_weights.items():
        with torch.no_grad():
            layers[name].weight.copy_(dequantize(q_weight, weight_scale, axis=0).to(layers[name].weight.dtype))
    return model


class QuantizedNet(nn.Module):
    """The seed's name for the quantized network: ``forward(x_normalized)`` runs the integer engine.

    Returns float32 logits in real units (``dequantize_logits`` of the int32
    accumulators), so ``argmax`` ranks classes correctly for any weight granularity.
    """

    def __init__(self, integer_model: IntegerModel) -> None:
        super().__init__()
        self.integer_model = integer_model

    def forward(self, x_normalized: Tensor) -> Tensor:
        logits = run_integer(self.integer_model, quantize_input(x_normalized, self.integer_model.input_scale))
        return dequantize_logits(self.integer_model, logits).to(torch.float32)
