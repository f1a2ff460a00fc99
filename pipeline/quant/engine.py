"""Running an ``IntegerModel``: the integer engine, its float simulation, and weight-only quantization.

``run_integer`` runs each node by its op's ``run`` (``pipeline.quant.ops``), exactly. For
speed it holds the integers in floating-point tensors and uses float units wherever they are
provably exact (``ops.conv.layer_plan`` says which path each layer takes, and why):

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

import torch
from torch import Tensor

from pipeline.graph.nodes import numel
from pipeline.quant.ir import IntegerModel, int_node_inputs
from pipeline.quant.ops.conv import IntConv, PreparedLayer
from pipeline.quant.ops.maxpool import IntMaxPool, maxpool
from pipeline.quant.ops.registry import op_of
from pipeline.quant.ranges import dequantize, fake_quantize, int_range, quantize

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

def _prepare(model: IntegerModel, device: torch.device) -> list[object]:
    """Per node, what its op's ``run`` needs ready (``IntegerOp.prepare``): layers' weights in their exact dtype,
    every rescale checked for the float path, from each input's own range (128 for int8, 255 for uint8)."""
    return [op_of(node).prepare(node, model, device) for node in model.nodes]


def _integer_node(node: object, prepared: object, values: dict[str, Tensor]) -> Tensor:
    """One node on integer-valued tensors (any dtype); the result holds the node's integers."""
    return op_of(node).run(node, prepared, values)


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
            layer: PreparedLayer = prepared[index]
            values[pool.output] = layer.finish(maxpool(pool, layer.accumulate(values[node.input])))
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


def run_simulated(model: IntegerModel, x_normalized: Tensor) -> Tensor:
    """Float64 logits of the float simulation of ``model`` (fake quantization, float scales)."""

    def one_pass(images: Tensor) -> Tensor:
        values = {model.input: fake_quantize(images.to(torch.float64), model.input_scale,
                                             *model.tensors[model.input].range)}
        for node in model.nodes:
            values[node.output] = op_of(node).simulate(node, model, values)
        return values[model.output]

    return _in_passes(one_pass, x_normalized, pass_images(model))


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
    "PASS_VALUES", "QuantizedNet", "pass_images", "dequantize_logits",
    "integer_tensor_outputs", "quantize_input", "quantize_model_input", "run_integer", "run_simulated",
]
