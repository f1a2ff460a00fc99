"""The integer semantics of every node of the integer graph, as pure functions, each with a slow reference.

All rescaling is ``fixed_point.requantize``: y = clamp(floor(acc * M + 1/2), lo, hi) with
M = multiplier * 2^(shift - 31), one rounding, half up. On top of it:

- conv2d / linear (any groups, depthwise included): acc = bias + sum(w * x) in int32 (the
  worst case of every output channel is checked below 2^31 when the model is built), then
  requantized by M = S_in * S_w / S_out, or left as int32 logits;
- add (TFLite's ADD): with S_max = max(S_a, S_b) and a left shift L (20 for int8 inputs),
  each input q is lifted to q * 2^L, rescaled by M_i = S_i / (2 S_max) (<= 1/2, so the sum
  cannot leave int32) to the common grid S_c = 2 S_max / 2^L, the two summed in int32, and the
  sum requantized by M_out = S_c / S_out with the output's saturation (a fused ReLU's clamp);
- average pool: the int32 sum of each window (zero padding adds 0), requantized by
  M = S_in / (S_out * window area), so the division by the area is inside the one rounding;
- concat: each input requantized to the output scale by M = S_in / S_out (skipped when the
  scales are equal: M = 1 maps every integer to itself);
- max pool, standalone ReLU / ReLU6 (a clamp at the input's scale) and flatten act on the
  integers as they are.

The ``*_reference`` functions compute one output value in plain Python integers.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.quant.fixed_point import requantize, requantize_reference
from pipeline.quant.ir import Requantize
from pipeline.quant.ranges import INT32_MAX, INT32_MIN

ADD_LEFT_SHIFT = 20  # TFLite's for 8-bit inputs: |q| * 2^20 <= 2^27 leaves headroom in int32


def channel_shape(values: Tensor, ndim: int) -> Tensor:
    """A per-channel (C,) vector shaped to line up with dim 1 of an ``ndim``-dim batch; a 0-D one unchanged."""
    return values.reshape((1, -1) + (1,) * (ndim - 2)) if values.ndim else values


def apply_requantize(acc: Tensor, rq: Requantize) -> Tensor:
    """``fixed_point.requantize`` of int32 values ``acc`` (N, C, ...) by ``rq`` (per tensor or per channel)."""
    multiplier = channel_shape(rq.multiplier.to(acc.device, torch.int64), acc.ndim)
    shift = channel_shape(rq.shift.to(acc.device, torch.int64), acc.ndim)
    return requantize(acc, multiplier, shift, rq.clamp_min, rq.clamp_max)


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


def add_integers(a: Tensor, b: Tensor, left_shift: int, input_rq: tuple[Requantize, Requantize],
                 output_rq: Requantize) -> Tensor:
    """The integer residual add (module docstring) of int8 tensors ``a`` and ``b``, as int64."""
    scaled = [
        apply_requantize(x.to(torch.int64) << left_shift, rq)
        for x, rq in zip((a, b), input_rq, strict=True)
    ]
    return apply_requantize(scaled[0] + scaled[1], output_rq)


def add_reference(a: int, b: int, left_shift: int, input_rq: tuple[Requantize, Requantize],
                  output_rq: Requantize) -> int:
    """``add_integers`` for one pair of values, in Python integers."""
    total = sum(
        requantize_reference(x << left_shift, int(rq.multiplier), int(rq.shift), rq.clamp_min, rq.clamp_max)
        for x, rq in zip((a, b), input_rq, strict=True)
    )
    return requantize_reference(total, int(output_rq.multiplier), int(output_rq.shift),
                                output_rq.clamp_min, output_rq.clamp_max)


def window_sums(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """int64 sum of every pooling window of ``x`` (N, C, H, W); zero padding adds nothing.

    float64 holds these sums exactly (|sum| <= 128 * window area).
    """
    sums = F.avg_pool2d(x.to(torch.float64), kernel, stride, padding, count_include_pad=True, divisor_override=1)
    return sums.to(torch.int64)


def avgpool_integers(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                     rq: Requantize) -> Tensor:
    """The integer average pool: window sums requantized by M = S_in / (S_out * area), as int64."""
    return apply_requantize(window_sums(x, kernel, stride, padding), rq)


def avgpool_reference(window: list[int], rq: Requantize) -> int:
    """One output of ``avgpool_integers`` from the values of its window (padding as zeros), in Python integers."""
    return requantize_reference(sum(window), int(rq.multiplier), int(rq.shift), rq.clamp_min, rq.clamp_max)


def concat_integers(inputs: list[Tensor], input_rq: tuple[Requantize | None, ...]) -> Tensor:
    """Each input requantized to the output scale (None: unchanged), concatenated on channels, as int64."""
    parts = [
        x.to(torch.int64) if rq is None else apply_requantize(x.to(torch.int64), rq)
        for x, rq in zip(inputs, input_rq, strict=True)
    ]
    return torch.cat(parts, dim=1)


def concat_reference(value: int, rq: Requantize | None) -> int:
    """One value of one input of ``concat_integers``, in Python integers."""
    if rq is None:
        return value
    return requantize_reference(value, int(rq.multiplier), int(rq.shift), rq.clamp_min, rq.clamp_max)


def clamp_integers(x: Tensor, clamp_min: int, clamp_max: int) -> Tensor:
    """A standalone ReLU / ReLU6 on integers at an unchanged scale."""
    return x.clamp(clamp_min, clamp_max)


__all__ = [
    "ADD_LEFT_SHIFT", "INT32_MAX", "INT32_MIN", "add_integers", "add_reference", "apply_requantize",
    "avgpool_integers", "avgpool_reference", "channel_shape", "clamp_integers", "concat_integers",
    "concat_reference", "conv_accumulators", "window_sums",
]
