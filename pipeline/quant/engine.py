"""Running an ``IntegerModel``: the integer engine, its float simulation, and weight-only quantization.

``run_integer`` computes the integer semantics of ``integer_ops`` node by node, exactly. For
speed it holds the integers in floating-point tensors and uses float units wherever they are
provably exact (``layer_plan`` says which path each layer takes, and why):

- a convolution or linear layer runs in float32 when its checked worst-case accumulator
  (``ranges.accumulator_bound``, bias included) is below 2^24: every partial sum, in any
  order the kernel adds them, is an integer of magnitude at most that bound, and float32
  represents every integer below 2^24, so nothing is ever rounded. Above 2^24 it runs in
  float64 (exact below 2^53; the bound is below 2^31);
- a rescale y = floor(v * 2^lift * multiplier * 2^(shift - 31) + 1/2) runs in float64 when
  |v| * multiplier + 2^(30 - shift - lift) <= 2^53 for the largest |v| the tensor can hold:
  then v * M and v * M + 1/2 are exact (M's 31-bit multiplier times a power of two, and
  the sum's bits span less than 53), and floor is exact. Otherwise it runs in int64
  (``fixed_point.requantize``, exact for any int32 value);
- max-pool, clamps, concatenation and window sums only compare or add small integers.

``run_simulated`` is the same graph in float64 real units: dequantized weights and biases,
tensors fake-quantized at their scales (round half to even), the same clamps. It differs from
the integer engine only where the fixed-point multiplier or the rounding rule moves a value by
one step.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.graph.nodes import FloatGraph, numel
from pipeline.graph.run import run_float
from pipeline.quant.build import raw_accumulator_clamp
from pipeline.quant.integer_ops import apply_requantize
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
from pipeline.quant.ranges import (
    accumulator_bound,
    check_accumulator,
    dequantize,
    fake_quantize,
    int_range,
    largest_magnitude,
    quantize,
)

# Values of the largest tensor per pass through the engine and its simulation (the results do not
# depend on it). A pass's tensors then stay within a few MB, in cache: measured on 2 cores, Net ran
# fastest in passes of about 200 images and ResNet-20 of 64 (larger passes of ResNet-20 were up to
# 2x slower), which is 2^20 values of their largest tensor (conv1's output, 4,704 and 16,384 values
# an image). Very large float64 buffers are also served by glibc as fresh mappings, page-faulted on
# every use (passes of 1,000 Net images once spent most of their time in the kernel).
PASS_VALUES = 2**20


def pass_images(model: IntegerModel) -> int:
    """Images per pass: PASS_VALUES over the largest tensor's values per image (at least 1)."""
    largest = max(numel(info.shape) for info in model.tensors.values())
    return max(1, PASS_VALUES // largest)


def _passes(x: Tensor, images: int) -> tuple[Tensor, ...]:
    """``x`` split along the batch into runs of at most ``images`` images (an empty batch stays one)."""
    return x.split(images) if len(x) else (x,)


def _in_passes(run: Callable[[Tensor], Tensor], x: Tensor, images: int) -> Tensor:
    """``run`` on at most ``images`` images at a time, the outputs concatenated along the batch."""
    return torch.cat([run(batch) for batch in _passes(x, images)])


def quantize_input(x_normalized: Tensor, input_scale: float, bits: int = 8) -> Tensor:
    """The normalized float input as int8: round half to even, saturate to the signed ``bits``-wide range
    (``model.tensors[model.input].bits``; int8: [-128, 127]). The input is always signed."""
    return quantize(x_normalized, input_scale, *int_range(bits)).to(torch.int8)


def quantize_model_input(model: IntegerModel, x_normalized: Tensor) -> Tensor:
    """``quantize_input`` at ``model``'s input scale and width: the int8 images its engine, C and ONNX take."""
    return quantize_input(x_normalized, model.input_scale, model.tensors[model.input].bits)


# ---------------------------------------------------------------- the integer engine

FLOAT32_EXACT = 2**24  # float32 represents every integer of magnitude <= 2^24
FLOAT64_EXACT = 2**53


def conv_dtype(bound: int) -> torch.dtype:
    """float32 when every partial sum (|.| <= ``bound``) is an integer float32 holds exactly, else float64."""
    return torch.float32 if bound < FLOAT32_EXACT else torch.float64


def float_rescale_is_exact(largest: Tensor | int, rq: Requantize, lift: int = 0) -> bool:
    """Whether a rescale of values |v| <= ``largest`` (per channel or one bound) is exact in float64."""
    multiplier = rq.multiplier.to(torch.int64)
    total_shift = 31 - rq.shift.to(torch.int64) - lift
    if bool((total_shift < 1).any()):
        return False
    worst = torch.as_tensor(largest, dtype=torch.int64) * multiplier + (1 << (total_shift - 1))
    return bool((worst <= FLOAT64_EXACT).all())


@dataclass(frozen=True)
class _Rescale:
    """A ``Requantize`` prepared for values |v| <= some bound: float64 where exact, else int64."""

    rq: Requantize
    lift: int
    real: Tensor | None  # float64 M * 2^lift, shaped per channel; None: the int64 path

    @classmethod
    def prepare(cls, rq: Requantize, largest: Tensor | int, lift: int = 0) -> _Rescale:
        if not float_rescale_is_exact(largest, rq, lift):
            return cls(rq, lift, None)
        real = rq.multiplier.to(torch.float64) * torch.exp2(rq.shift.to(torch.float64) + (lift - 31))
        return cls(rq, lift, real)

    def __call__(self, values: Tensor) -> Tensor:
        """clamp(floor(v * 2^lift * M + 1/2)) of integer-valued ``values`` (N, C, ...), exactly, as float64."""
        if self.real is None:
            lifted = values.to(torch.int64) << self.lift if self.lift else values.to(torch.int64)
            return apply_requantize(lifted, self.rq).to(torch.float64)
        # A dimensioned float64 factor, so the product is float64 (a 0-D one would keep float32) and new:
        # the input is never changed in place.
        factor = self.real.to(values.device).reshape((1, -1) + (1,) * (values.ndim - 2) if self.real.ndim
                                                     else (1,) * values.ndim)
        return (values * factor).add_(0.5).floor_().clamp_(self.rq.clamp_min, self.rq.clamp_max)


@dataclass(frozen=True)
class _Layer:
    """An ``IntConv`` prepared once per run: its weights in the conv's exact dtype and its rescale."""

    node: IntConv
    weight: Tensor
    bias: Tensor
    rescale: _Rescale | None

    @classmethod
    def prepare(cls, node: IntConv, input_range: tuple[int, int], device: torch.device) -> _Layer:
        bound = accumulator_bound(node.weight, node.bias, input_range)
        check_accumulator(f"layer {node.name!r}", node.weight, node.bias, input_range)
        dtype = conv_dtype(int(bound.max()))
        rescale = None if node.requantize is None else _Rescale.prepare(node.requantize, bound)
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


def layer_plan(model: IntegerModel, node: IntConv) -> dict[str, object]:
    """How the engine computes ``node`` exactly: the accumulator bound (for its input's range), the conv's and
    the rescale's units."""
    input_range = model.tensors[node.input].range
    layer = _Layer.prepare(node, input_range, torch.device("cpu"))
    bound = int(accumulator_bound(node.weight, node.bias, input_range).max())
    plan: dict[str, object] = {"layer": node.name, "accumulator_bound": bound,
                               "conv": str(layer.weight.dtype).removeprefix("torch.")}
    if layer.rescale is None:
        plan["rescale"] = "none (int32 logits)"
    else:
        plan["rescale"] = "int64" if layer.rescale.real is None else "float64"
    return plan


def _prepare(model: IntegerModel, device: torch.device) -> list[object]:
    """Per node, what the engine needs ready: layers' weights in their dtype, every rescale checked.

    The bounds come from each input's own range (``TensorInfo.range``): 128 for int8, 255 for uint8.
    """

    def largest(name: str) -> int:
        return largest_magnitude(model.tensors[name].range)

    prepared: list[object] = []
    for node in model.nodes:
        if isinstance(node, IntConv):
            prepared.append(_Layer.prepare(node, model.tensors[node.input].range, device))
        elif isinstance(node, IntAdd):
            inputs = tuple(_Rescale.prepare(rq, largest(name), node.left_shift)
                           for rq, name in zip(node.input_requantize, node.inputs, strict=True))
            # Each scaled input is at most |q| * 2^left_shift / 2 + 1 in magnitude (M_i <= 1/2).
            total = sum(largest(name) for name in node.inputs) << max(node.left_shift - 1, 0)
            prepared.append((inputs, _Rescale.prepare(node.output_requantize, total + 2)))
        elif isinstance(node, IntAvgPool):
            prepared.append(_Rescale.prepare(node.requantize, largest(node.input) * node.kernel[0] * node.kernel[1]))
        elif isinstance(node, IntConcat):
            prepared.append(tuple(None if rq is None else _Rescale.prepare(rq, largest(name))
                                  for rq, name in zip(node.input_requantize, node.inputs, strict=True)))
        else:
            prepared.append(None)
    return prepared


def _integer_node(node: IntNode, prepared: object, values: dict[str, Tensor]) -> Tensor:
    """One node on integer-valued tensors (any dtype); the result holds the node's integers."""
    if isinstance(node, IntConv):
        return prepared.finish(prepared.accumulate(values[node.input]))
    if isinstance(node, IntAdd):
        inputs, output = prepared
        a, b = (rescale(values[name]) for rescale, name in zip(inputs, node.inputs, strict=True))
        return output(a.add_(b))
    if isinstance(node, IntAvgPool):
        # float64 sums of at most kernel-area int8 values are exact integers
        sums = F.avg_pool2d(values[node.input].to(torch.float64), node.kernel, node.stride, node.padding,
                            count_include_pad=True, divisor_override=1)
        return prepared(sums)
    if isinstance(node, IntConcat):
        parts = [values[name].to(torch.float64) if rescale is None else rescale(values[name])
                 for rescale, name in zip(prepared, node.inputs, strict=True)]
        return torch.cat(parts, dim=1)
    if isinstance(node, IntMaxPool):
        return _maxpool(node, values[node.input])
    if isinstance(node, IntClamp):
        return values[node.input].clamp(node.clamp_min, node.clamp_max)
    if isinstance(node, IntReshape):
        return values[node.input].flatten(1)
    raise TypeError(f"unknown integer node {node!r}")


def _maxpool(node: IntMaxPool, x: Tensor) -> Tensor:
    # max-pool only compares (padding is -inf); float32 holds int8 values and these accumulators exactly
    return F.max_pool2d(x.to(torch.float32) if x.dtype != torch.float64 else x, node.kernel, node.stride,
                        node.padding)


def _pool_before_rescale(model: IntegerModel) -> dict[int, int]:
    """Layer index -> index of the max-pool that alone reads its output.

    A rescale is non-decreasing in its input (multiplier >= 0, floor and clamp are monotonic), so
    max-pooling the accumulators and then rescaling gives the same integers as rescaling and then
    pooling, on a quarter of the values for a 2x2 pool.
    """
    readers: dict[str, list[int]] = {}
    for index, node in enumerate(model.nodes):
        for name in int_node_inputs(node):
            readers.setdefault(name, []).append(index)
    fused = {}
    for index, node in enumerate(model.nodes):
        only = readers.get(node.output, [])
        if isinstance(node, IntConv) and node.requantize is not None and len(only) == 1:
            if isinstance(model.nodes[only[0]], IntMaxPool):
                fused[index] = only[0]
    return fused


def _integer_values(model: IntegerModel, prepared: list[object], x_int8: Tensor, keep: bool) -> dict[str, Tensor]:
    """Every tensor of one pass (``keep``) or only the output, integer-valued, for int8 images."""
    if x_int8.dtype != torch.int8:
        raise TypeError(f"x_int8 must have dtype torch.int8, got {x_int8.dtype}; use quantize_input")
    qmin, qmax = model.tensors[model.input].range
    if x_int8.numel() and (int(x_int8.min()) < qmin or int(x_int8.max()) > qmax):
        raise ValueError(f"x_int8 holds values in [{int(x_int8.min())}, {int(x_int8.max())}], outside the input's "
                         f"range [{qmin}, {qmax}]; use quantize_model_input")
    values = {model.input: x_int8.to(torch.float32)}
    remaining = _last_reads(model)
    pooled = {} if keep else _pool_before_rescale(model)
    skipped: set[int] = set()
    for index, node in enumerate(model.nodes):
        if index in skipped:
            continue
        if index in pooled:
            pool = model.nodes[pooled[index]]
            layer = prepared[index]
            values[pool.output] = layer.finish(_maxpool(pool, layer.accumulate(values[node.input])))
            skipped.add(pooled[index])
        else:
            values[node.output] = _integer_node(node, prepared[index], values)
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
    prepared = _prepare(model, x_int8.device)
    return _in_passes(lambda images: _integer_values(model, prepared, images, keep=False)[model.output]
                      .to(torch.int64).to(torch.int32), x_int8, pass_images(model))


def integer_tensor_outputs(model: IntegerModel, x_int8: Tensor) -> dict[str, Tensor]:
    """Every node's integer output tensor (int64), by tensor name."""
    prepared = _prepare(model, x_int8.device)
    passes = [_integer_values(model, prepared, images, keep=True) for images in _passes(x_int8, pass_images(model))]
    return {node.output: torch.cat([values[node.output] for values in passes]).to(torch.int64) for node in model.nodes}


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
        return torch.cat([_fake(values[name], scale, tensors[node.output].range) for name in node.inputs], 1)
    if isinstance(node, IntMaxPool):
        return F.max_pool2d(values[node.input], node.kernel, node.stride, node.padding)
    if isinstance(node, IntClamp):
        return _fake(values[node.input], tensors[node.input].scale, (node.clamp_min, node.clamp_max))
    return values[node.input].flatten(1)


def run_simulated(model: IntegerModel, x_normalized: Tensor) -> Tensor:
    """Float64 logits of the float simulation of ``model`` (fake quantization, float scales)."""

    def one_pass(images: Tensor) -> Tensor:
        values = {model.input: fake_quantize(images.to(torch.float64), model.input_scale,
                                             *model.tensors[model.input].range)}
        for node in model.nodes:
            values[node.output] = _simulated_node(model, node, values)
        return values[model.output]

    return _in_passes(one_pass, x_normalized, pass_images(model))


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
        logits = run_integer(self.integer_model, quantize_model_input(self.integer_model, x_normalized))
        return dequantize_logits(self.integer_model, logits).to(torch.float32)


__all__ = [
    "PASS_VALUES", "QuantizedNet", "pass_images", "dequantize_logits", "layer_plan", "dequantized_weights",
    "integer_tensor_outputs", "quantize_input", "quantize_model_input", "run_integer", "run_simulated", "run_weight_only",
]
