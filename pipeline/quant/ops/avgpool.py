"""Average pool: the int32 sum of each window (zero padding adds 0), requantized to the output's scale.

A window pool's multiplier is M = S_in / (S_out * area), the division by the area inside the rounding.
Its sums are lifted first, by the largest left shift L that keeps them within 2^30, and requantized by
M / 2^L (as TFLite's ADD lifts its inputs by 2^20): a sum of a few small integers times M is only a
few units, and double rounding's first rounding of it to an integer would move it by up to half a unit
(with single rounding the lift changes nothing: M / 2^L has M's multiplier, its shift lowered by L).
A global pool (one window over the whole H x W map, no padding) follows TFLite's int8 MEAN, so that a
``.tflite`` MEAN runs it bit-exact: M = S_in / S_out is quantized first (``fixed_point``), then 1/n is
folded into its integer multiplier, (multiplier << s) / n with C's integer division, and its shift
lowered by s = min(floor(log2 n), 32, 31 + shift). For n a power of two that is exactly the multiplier
of M / n; otherwise the multiplier may fall below 2^30 (it stays above 2^29).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.graph.nodes import AvgPool
from pipeline.quant.fixed_point import MIN_SHIFT, quantize_multiplier
from pipeline.quant.ops.base import BuildContext, IntegerOp, Requantize
from pipeline.quant.ops.geometry import IntWindow, window_shape
from pipeline.quant.ops.rescale import (
    ExactRescale,
    apply_requantize,
    check_requantize,
    requantize_one,
)
from pipeline.quant.ranges import fake_quantize, largest_magnitude


@dataclass(frozen=True)
class IntAvgPool(IntWindow):
    requantize: Requantize  # M / 2^left_shift, M = S_in / (S_out * kernel_h * kernel_w); a global pool's as TFLite's MEAN
    left_shift: int = 0  # the window sums are scaled by 2^left_shift before the rescale (0 for a global pool)

    def requantizations(self) -> list[Requantize]:
        return [self.requantize]


def is_global(kernel: tuple[int, int], padding: tuple[int, int], input_shape: tuple[int, ...]) -> bool:
    """Whether a pool is one window over its whole (C, H, W) input: TFLite's MEAN over H and W."""
    return tuple(kernel) == tuple(input_shape[1:]) and tuple(padding) == (0, 0)


def mean_requantization(real_multiplier: float, count: int, clamp: tuple[int, int], rounding: str) -> Requantize:
    """The rescale of a sum of ``count`` values to their mean times ``real_multiplier``, as TFLite's int8 MEAN
    computes it (module docstring)."""
    multiplier, shift = quantize_multiplier(real_multiplier)
    fold = min(count.bit_length() - 1, 32, 31 + shift)
    return Requantize(torch.tensor((multiplier << fold) // count, dtype=torch.int32),
                      torch.tensor(shift - fold, dtype=torch.int32), *clamp, rounding)


def build(node: AvgPool, context: BuildContext) -> IntAvgPool:
    area = node.kernel[0] * node.kernel[1]
    ratio = context.scale(node.input) / context.scale(node.output)
    clamp = context.tensors[node.output].range
    if is_global(node.kernel, node.padding, context.tensors[node.input].shape):
        rq = mean_requantization(ratio, area, clamp, context.rounding)
        return IntAvgPool(node.name, node.input, node.output, node.kernel, node.stride, node.padding, rq)
    real_multiplier = ratio / area
    _, shift = quantize_multiplier(real_multiplier)
    largest_sum = largest_magnitude(context.tensors[node.input].range) * area
    lift = max(0, min(30 - largest_sum.bit_length(), shift - MIN_SHIFT))  # sums < 2^30, shift - lift >= -31
    rq = context.requantization(real_multiplier / 2**lift, clamp)
    return IntAvgPool(node.name, node.input, node.output, node.kernel, node.stride, node.padding, rq, lift)


def output_shape(node: IntAvgPool, shapes: list[tuple[int, ...]], where: str) -> tuple[int, ...]:
    return (shapes[0][0], *window_shape(shapes[0], node.kernel, node.stride, node.padding, where))


def check(node: IntAvgPool, model, where: str) -> None:
    check_requantize(node.requantize, 1, where)


def window_sums(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]) -> Tensor:
    """int64 sum of every pooling window of ``x`` (N, C, H, W); zero padding adds nothing.

    float64 holds these sums exactly (|sum| <= 128 * window area).
    """
    sums = F.avg_pool2d(x.to(torch.float64), kernel, stride, padding, count_include_pad=True, divisor_override=1)
    return sums.to(torch.int64)


def avgpool_integers(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                     rq: Requantize, left_shift: int = 0) -> Tensor:
    """The integer average pool: window sums lifted by 2^left_shift, requantized by ``rq``, as int64."""
    return apply_requantize(window_sums(x, kernel, stride, padding) << left_shift, rq)


def avgpool_reference(window: list[int], rq: Requantize, left_shift: int = 0) -> int:
    """One output of ``avgpool_integers`` from the values of its window (padding as zeros), in Python integers."""
    return requantize_one(sum(window) << left_shift, rq)


def prepare(node: IntAvgPool, model, device: torch.device) -> ExactRescale:
    return ExactRescale.prepare(node.requantize,
                                largest_magnitude(model.tensors[node.input].range) * node.kernel[0] * node.kernel[1],
                                node.left_shift)


def run(node: IntAvgPool, prepared: ExactRescale, values: dict[str, Tensor]) -> Tensor:
    # float64 sums of at most kernel-area int8 values are exact integers
    sums = F.avg_pool2d(values[node.input].to(torch.float64), node.kernel, node.stride, node.padding,
                        count_include_pad=True, divisor_override=1)
    return prepared(sums)


def simulate(node: IntAvgPool, model, values: dict[str, Tensor]) -> Tensor:
    y = F.avg_pool2d(values[node.input], node.kernel, node.stride, node.padding)
    rq = node.requantize
    return fake_quantize(y, model.tensors[node.output].scale, rq.clamp_min, rq.clamp_max)


OP = IntegerOp(IntAvgPool, (AvgPool,), build, output_shape, prepare, run, simulate, check=check)

__all__ = ["OP", "IntAvgPool", "avgpool_integers", "avgpool_reference", "window_sums"]
