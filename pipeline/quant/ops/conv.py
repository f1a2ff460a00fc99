"""conv2d (any groups, depthwise included) and linear: int32 accumulators, then one rescale (or the int32 logits).

acc = bias + sum(w * x) in int32 (the worst case of every output channel is checked below 2^31 when
the model is built: ``ranges.check_accumulator``), then requantized by M = S_in * S_w / S_out with the
output's saturation (a fused ReLU / ReLU6 is that clamp), or left as int32 logits.

The last layer gives int8 logits when the model has a logits scale (``build_integer_model``'s
``logits_range``: TFLite's FULLY_CONNECTED writes int8), requantized like any layer; otherwise int32
logits: its accumulators at scale S_in * S_w with per-tensor weights; with per-channel weights they are
requantized (same rule, saturating to int32) to one common scale, the largest S_in * S_w_c, so the class
is the argmax of integers, with no float step.

The engine runs a layer in float32 when its checked worst-case accumulator (bias included) is below
2^24: every partial sum, in any order the kernel adds them, is an integer of magnitude at most that
bound, and float32 represents every integer below 2^24, so nothing is ever rounded. Above 2^24 it runs
in float64 (exact below 2^53; the bound is below 2^31).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.graph.nodes import ActivationKind, Conv, Linear, UnsupportedModelError
from pipeline.quant.ops.base import (
    BuildContext,
    IntegerOp,
    Requantize,
    TensorInfo,
    activation_clamp,
)
from pipeline.quant.ops.geometry import window_shape
from pipeline.quant.ops.rescale import ExactRescale, check_requantize
from pipeline.quant.ranges import (
    INT32_MAX,
    INT32_MIN,
    accumulator_bound,
    check_accumulator,
    dequantize,
    fake_quantize,
)

FLOAT32_EXACT = 2**24  # float32 represents every integer of magnitude <= 2^24


@dataclass(frozen=True)
class IntConv:
    """A conv2d (``kind`` "conv2d") or linear layer; a linear weight is (out, in)."""

    name: str
    kind: str  # "conv2d" | "linear"
    input: str
    output: str
    weight: Tensor  # int8 (out, in / groups, kh, kw) or (out, in)
    bias: Tensor  # int32 (out,) at scale S_in * S_w
    weight_scale: Tensor  # float64, 0-D or (out,)
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    activation: ActivationKind
    requantize: Requantize | None  # None: output the raw int32 accumulators (clamped at 0 for a ReLU)

    def requantizations(self) -> list[Requantize]:
        return [self.requantize] if self.requantize is not None else []


def raw_accumulator_clamp(layer: IntConv) -> tuple[int, int]:
    """The saturation of a layer without requantization: int32, at 0 below with a fused ReLU."""
    return (0 if layer.activation == "relu" else INT32_MIN), INT32_MAX


# ---------------------------------------------------------------- building


def quantize_bias(bias: Tensor, input_scale: float, weight_scale: Tensor, layer_name: str) -> Tensor:
    """q_b = round(b / (S_in * S_w)) (half to even) as int32; ``OverflowError`` naming the layer if out of int32."""
    bias_scale = input_scale * torch.as_tensor(weight_scale, dtype=torch.float64)
    q_bias = torch.round(bias.detach().to(torch.float64) / bias_scale)
    out_of_range = (q_bias < INT32_MIN) | (q_bias > INT32_MAX)
    if bool(out_of_range.any()):
        channel = int(out_of_range.nonzero()[0, 0])
        raise OverflowError(
            f"layer {layer_name!r}: bias[{channel}] = {float(bias[channel])} at scale S_in*S_w = "
            f"{float(bias_scale.expand_as(q_bias)[channel])} quantizes to "
            f"{float(q_bias[channel])}, outside int32 [{INT32_MIN}, {INT32_MAX}]; "
            "the input or weight scale is too small for this bias"
        )
    return q_bias.to(torch.int32)


def build(node: Conv | Linear, context: BuildContext) -> IntConv:
    """The integer layer; the last layer (``context.logits_layer``) also sets the logits' ``TensorInfo``."""
    tensors = context.tensors
    q_weight, weight_scale = context.quantized_weights[node.name]
    input_scale = context.scale(node.input)
    bias = node.bias if node.bias is not None else torch.zeros(q_weight.shape[0])
    q_bias = quantize_bias(bias, input_scale, weight_scale, node.name)
    check_accumulator(f"layer {node.name!r}", q_weight, q_bias, tensors[node.input].range)
    accumulator_scale = input_scale * weight_scale
    is_conv = isinstance(node, Conv)
    kind = "conv2d" if is_conv else "linear"
    geometry = (node.stride, node.padding, node.groups) if is_conv else ((1, 1), (0, 0), 1)
    if node is context.logits_layer and node.output not in tensors:  # int32 logits
        return _int32_logits_layer(node, context, kind, geometry, q_weight, q_bias, weight_scale, accumulator_scale)
    output_scale = context.scale(node.output)
    clamp = activation_clamp(node.activation, output_scale, *tensors[node.output].range)
    requantize = context.requantization(multiplier_scale(kind, accumulator_scale) / output_scale, clamp)
    return IntConv(node.name, kind, node.input, node.output, q_weight, q_bias, weight_scale, *geometry,
                   node.activation, requantize)


def multiplier_scale(kind: str, accumulator_scale: Tensor) -> Tensor:
    """The numerator S_in * S_w of a layer's multiplier as TensorFlow Lite Micro computes it from float32 scales: in
    float64, except a per-tensor FULLY_CONNECTED's, whose product is a float32 multiplication
    (``GetQuantizedConvolutionMultipler``), so that the ``.tflite`` of this model derives the same multiplier."""
    if kind == "linear" and accumulator_scale.ndim == 0:
        return accumulator_scale.to(torch.float32).to(torch.float64)
    return accumulator_scale


def _int32_logits_layer(node: Conv | Linear, context: BuildContext, kind: str, geometry: tuple,
                        q_weight: Tensor, q_bias: Tensor, weight_scale: Tensor, accumulator_scale: Tensor) -> IntConv:
    """The last layer giving int32 logits (the module docstring), its ``TensorInfo`` set."""
    logits_shape = context.graph.shapes[node.output]
    if accumulator_scale.ndim == 0:  # raw accumulators are the logits
        if node.activation == "relu6":
            raise UnsupportedModelError(
                f"layer {node.name!r}: a ReLU6 on the logits needs a requantized output; remove it or set "
                "quantize_weights.granularity=per_channel"
            )
        context.tensors[node.output] = TensorInfo(logits_shape, 32, accumulator_scale.clone())
        return IntConv(node.name, kind, node.input, node.output, q_weight, q_bias, weight_scale, *geometry,
                       node.activation, None)
    # Per-channel weights give every class its own accumulator scale. Rescale the logits to one
    # common int32 scale (the largest, so every M <= 1 and nothing saturates) so that the class is
    # the argmax of integers, with no float step.
    logits_scale = accumulator_scale.max()
    context.tensors[node.output] = TensorInfo(logits_shape, 32, logits_scale)
    clamp = activation_clamp(node.activation, float(logits_scale), INT32_MIN, INT32_MAX)
    requantize = context.requantization(accumulator_scale / logits_scale, clamp)
    return IntConv(node.name, kind, node.input, node.output, q_weight, q_bias, weight_scale, *geometry,
                   node.activation, requantize)


def output_shape(node: IntConv, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    shape, weight = shapes[0], node.weight
    if node.kind == "linear":
        if len(shape) != 1 or weight.ndim != 2 or weight.shape[1] != shape[0]:
            raise ValueError(f"{where} needs a flat input of {weight.shape[1]} values and a 2-D weight, got {shape}")
        return (int(weight.shape[0]),)
    if weight.ndim != 4 or len(shape) != 3 or weight.shape[1] * node.groups != shape[0]:
        raise ValueError(
            f"{where} has weight {tuple(weight.shape)} with groups {node.groups} for input {shape}"
        )
    if weight.shape[0] % node.groups:
        raise ValueError(f"{where}: {weight.shape[0]} output channels are not a multiple of groups {node.groups}")
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    return (int(weight.shape[0]), *window_shape(shape, kernel, node.stride, node.padding, where))


def check(node: IntConv, model, where: str) -> None:
    """The worst-case accumulator below 2^31, the rescale valid, and raw accumulators only as the int32 logits."""
    check_accumulator(where, node.weight, node.bias, model.tensors[node.input].range)
    if node.requantize is not None:
        check_requantize(node.requantize, int(node.weight.shape[0]), where)
    elif model.tensors[node.output].bits != 32:
        raise ValueError(f"{where} is not requantized, but only the logits may be raw accumulators")


# ---------------------------------------------------------------- the reference


def conv_accumulators(
    x: Tensor, weight: Tensor, bias: Tensor, stride: tuple[int, int], padding: tuple[int, int], groups: int
) -> Tensor:
    """int64 bias + sum(w * x) of a conv2d (4-D weight) or linear layer (2-D weight), exactly.

    Computed in float64 on integer values, which is exact: every partial sum, in any order, is an
    integer below the layer's checked bound 2^31, far inside float64's 2^53.
    """
    x64, weight64 = x.to(torch.float64), weight.to(x.device, torch.float64)
    bias64 = bias.to(x.device, torch.float64)
    if weight.ndim == 2:
        products = F.linear(x64, weight64, bias64)
    else:
        products = F.conv2d(x64, weight64, bias64, stride, padding, 1, groups)
    return products.to(torch.int64)


# ---------------------------------------------------------------- the engine


def conv_dtype(bound: int) -> torch.dtype:
    """float32 when every partial sum (|.| <= ``bound``) is an integer float32 holds exactly, else float64."""
    return torch.float32 if bound < FLOAT32_EXACT else torch.float64


@dataclass(frozen=True)
class PreparedLayer:
    """An ``IntConv`` prepared once per run: its weights in the conv's exact dtype and its rescale."""

    node: IntConv
    weight: Tensor
    bias: Tensor
    rescale: ExactRescale | None

    @classmethod
    def prepare(cls, node: IntConv, input_range: tuple[int, int], device: torch.device) -> PreparedLayer:
        bound = accumulator_bound(node.weight, node.bias, input_range)
        check_accumulator(f"layer {node.name!r}", node.weight, node.bias, input_range)
        dtype = conv_dtype(int(bound.max()))
        rescale = None if node.requantize is None else ExactRescale.prepare(node.requantize, bound)
        return cls(node, node.weight.to(device, dtype), node.bias.to(device, dtype), rescale)

    def accumulate(self, x: Tensor) -> Tensor:
        node, inputs = self.node, x.to(self.weight.dtype)
        if node.kind == "conv2d":
            return F.conv2d(inputs, self.weight, self.bias, node.stride, node.padding, 1, node.groups)
        return F.linear(inputs, self.weight, self.bias)

    def finish(self, acc: Tensor) -> Tensor:
        if self.rescale is None:
            return acc.to(torch.int64).clamp_(*raw_accumulator_clamp(self.node))
        return self.rescale(acc)


def prepare(node: IntConv, model, device: torch.device) -> PreparedLayer:
    return PreparedLayer.prepare(node, model.tensors[node.input].range, device)


def run(node: IntConv, prepared: PreparedLayer, values: dict[str, Tensor]) -> Tensor:
    return prepared.finish(prepared.accumulate(values[node.input]))


def layer_plan(model, node: IntConv) -> dict[str, object]:
    """How the engine computes ``node`` exactly: the accumulator bound (for its input's range), the conv's and
    the rescale's units."""
    input_range = model.tensors[node.input].range
    layer = PreparedLayer.prepare(node, input_range, torch.device("cpu"))
    bound = int(accumulator_bound(node.weight, node.bias, input_range).max())
    plan: dict[str, object] = {"layer": node.name, "accumulator_bound": bound,
                               "conv": str(layer.weight.dtype).removeprefix("torch.")}
    if layer.rescale is None:
        plan["rescale"] = "none (int32 logits)"
    else:
        plan["rescale"] = "int64" if layer.rescale.real is None else "float64"
    return plan


# ---------------------------------------------------------------- the float simulation


def simulate(node: IntConv, model, values: dict[str, Tensor]) -> Tensor:
    tensors = model.tensors
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
    rq = node.requantize
    return fake_quantize(y, tensors[node.output].scale, rq.clamp_min, rq.clamp_max)


OP = IntegerOp(IntConv, (Conv, Linear), build, output_shape, prepare, run, simulate, check=check)

__all__ = [
    "FLOAT32_EXACT", "OP", "IntConv", "PreparedLayer", "conv_accumulators", "conv_dtype", "layer_plan", "multiplier_scale",
    "quantize_bias", "raw_accumulator_clamp",
]
